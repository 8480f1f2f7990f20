"""The project's layers, checked on the source: ``vfs`` imports nothing from ``daemon``
or ``cli``; ``cli`` talks to the daemon only through its protocol; no module imports
itself back through others at load time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vfs", "daemon", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """The project modules ``module`` imports (at load time only, if asked)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # for type checkers only
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import) and not (top_level_only and inner):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not (top_level_only and inner):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return {name for name in names if name.split(".")[0] in PACKAGES}


def test_vfs_imports_nothing_of_the_daemon_or_the_cli() -> None:
    bad = {module: sorted(n for n in _imports(path, module, top_level_only=False)
                          if n.split(".")[0] in ("daemon", "cli"))
           for module, path in _modules().items() if module.split(".")[0] == "vfs"}
    assert not {m: n for m, n in bad.items() if n}


def test_the_cli_uses_only_the_daemons_protocol() -> None:
    bad = {module: sorted(n for n in _imports(path, module, top_level_only=False)
                          if n.startswith("daemon") and not n.startswith("daemon.protocol"))
           for module, path in _modules().items() if module.split(".")[0] == "cli"}
    assert not {m: n for m, n in bad.items() if n}


def test_no_import_cycles_at_load_time() -> None:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(path, module, top_level_only=True):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)
