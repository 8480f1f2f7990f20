"""``vfsctl pipeline graph``: the lineage graph as text, Graphviz dot, Mermaid or JSON."""

from __future__ import annotations

import json

import click

from cli.options import Options, pass_options
from vfs.pipeline.lineage import Edge, Graph, lineage

FORMATS = ("text", "dot", "mermaid", "json")


@click.command("graph")
@click.option("--format", "form", type=click.Choice(FORMATS), default="text",
              show_default=True, help="text for people; dot (Graphviz) or mermaid to draw.")
@pass_options
def pipeline_graph(options: Options, form: str) -> None:
    """The whole DAG: which repositories each pipeline reads (every input) and writes."""
    graph = lineage(options.store())
    click.echo({"text": _text, "dot": _dot, "mermaid": _mermaid,
                "json": lambda g: json.dumps(g.to_dict(), indent=2)}[form](graph))


def _input_label(edge: Edge) -> str:
    name = f" as {edge.input}" if edge.input and edge.input != edge.source else ""
    under = f" [{edge.combinator}]" if edge.combinator else ""
    return f"{edge.branch} {edge.glob}{name}{under}"


def _text(graph: Graph) -> str:
    if not graph.pipelines:
        return "no pipelines (repositories: " + (", ".join(graph.repos) or "none") + ")"
    lines = []
    for pipeline in graph.pipelines:
        lines.append(f"pipeline {pipeline}")
        for edge in graph.edges:
            if edge.target == pipeline and edge.kind == "input":
                lines.append(f"  <- {edge.source}@{_input_label(edge)}")
        for edge in graph.edges:
            if edge.source == pipeline and edge.kind == "output":
                lines.append(f"  -> {edge.target}@{edge.branch}")
    read = {e.source for e in graph.edges if e.kind == "input"}
    written = {e.target for e in graph.edges if e.kind == "output"}
    alone = [repo for repo in graph.repos if repo not in read | written]
    if alone:
        lines.append("repositories no pipeline reads or writes: " + ", ".join(alone))
    return "\n".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot(graph: Graph) -> str:
    lines = ["digraph vfs {", "  rankdir=LR;"]
    for repo in graph.repos:
        lines.append(f"  {_quote('repo:' + repo)} [label={_quote(repo)}, shape=box];")
    for pipeline in graph.pipelines:
        lines.append(f"  {_quote('pipeline:' + pipeline)} [label={_quote(pipeline)}, "
                     "shape=ellipse];")
    for edge in graph.edges:
        if edge.kind == "input":
            lines.append(f"  {_quote('repo:' + edge.source)} -> "
                         f"{_quote('pipeline:' + edge.target)} "
                         f"[label={_quote(_input_label(edge))}];")
        else:
            lines.append(f"  {_quote('pipeline:' + edge.source)} -> "
                         f"{_quote('repo:' + edge.target)} [label={_quote(edge.branch)}];")
    lines.append("}")
    return "\n".join(lines)


def _mermaid(graph: Graph) -> str:
    ids: dict[str, str] = {}

    def node(key: str) -> str:
        return ids.setdefault(key, f"n{len(ids)}")

    lines = ["graph LR"]
    for repo in graph.repos:
        lines.append(f"  {node('repo:' + repo)}[\"{repo}\"]")
    for pipeline in graph.pipelines:
        lines.append(f"  {node('pipeline:' + pipeline)}((\"{pipeline}\"))")
    for edge in graph.edges:
        if edge.kind == "input":
            label = _input_label(edge).replace('"', "'")
            lines.append(f"  {node('repo:' + edge.source)} -->|\"{label}\"| "
                         f"{node('pipeline:' + edge.target)}")
        else:
            lines.append(f"  {node('pipeline:' + edge.source)} -->|\"{edge.branch}\"| "
                         f"{node('repo:' + edge.target)}")
    return "\n".join(lines)


__all__ = ["pipeline_graph"]
