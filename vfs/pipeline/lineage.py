"""The lineage graph: which repositories every pipeline reads and writes.

Repositories and pipelines are the nodes; an edge goes from a repository to each
pipeline reading it (one per input, with its name, branch and glob, and the
combinator it is under) and from a pipeline to its output repository. Read from
the registry only, so it works from any node without a daemon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vfs.pipeline import registry
from vfs.pipeline.inputs import Combine, Input, Leaf


@dataclass(frozen=True)
class Edge:
    source: str  # a repository (into a pipeline) or a pipeline (into its output)
    target: str
    kind: str  # "input" or "output"
    branch: str
    input: str = ""  # the input's name (kind "input")
    glob: str = ""
    combinator: str = ""  # cross, union, join or group above the input ("": none)


@dataclass
class Graph:
    repos: list[str] = field(default_factory=list)
    pipelines: list[str] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"repos": self.repos, "pipelines": self.pipelines,
                "edges": [asdict(edge) for edge in self.edges]}


def lineage(store) -> Graph:
    """Every repository, every existing pipeline and the edges between them."""
    graph = Graph(repos=sorted(repo.name for repo in store.list_repos()))
    for version in registry.list_pipelines(store.objects):
        spec = version.spec
        if spec is None:
            continue
        graph.pipelines.append(spec.pipeline)
        for leaf, combinator in _leaves_under(spec.input, ""):
            graph.edges.append(Edge(leaf.repo, spec.pipeline, "input", leaf.branch,
                                    leaf.name, leaf.glob, combinator))
        graph.edges.append(Edge(spec.pipeline, spec.pipeline, "output", spec.output_branch))
    return graph


def _leaves_under(expression: Input, op: str):
    if isinstance(expression, Leaf):
        yield expression, op
        return
    assert isinstance(expression, Combine)
    for child in expression.inputs:
        yield from _leaves_under(child, expression.op)


__all__ = ["Edge", "Graph", "lineage"]
