"""Lineage a person reads: the text tree prints a shared input once, and the graph forms
(DOT, Mermaid, SVG) draw each input as one node with an edge to every output that read
it, on a tree shaped like a pipeline's (two sources cleaned against the same evaluation
sets, a manifest, an adapter, the registered model)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from rzenembed.lineage_graph import graph_of, to_dot, to_mermaid, to_svg
from rzenembed.tracking import LineageNode, LineageRef, render

SETS = [f"/data/eval/set-{i}" for i in range(14)]


def node(
    kind: str,
    name: str,
    digest: str,
    run: str | None = None,
    step: str | None = None,
    inputs: tuple[LineageNode, ...] = (),
    **extra,
) -> LineageNode:
    """A lineage node whose URI is derived from its name (each name is one thing here)."""
    ref = LineageRef(kind, name, f"/{kind}/{name}", digest * 64, run, extra=extra)
    return LineageNode(ref, step, list(inputs))


def pipeline_tree() -> LineageNode:
    evalsets = LineageRef(
        "eval-sets", "decontamination", ",".join(SETS), "e" * 64, extra={"sets": SETS}
    )

    def cleaned(name: str) -> LineageNode:
        raw = node("raw", name, name[0])
        ingested = node("dataset", f"{name}/ingest", "1", f"r-{name}-i", "ingest", (raw,), rows=10)
        return node(
            "dataset",
            f"{name}/clean",
            "2",
            f"r-{name}-c",
            "clean",
            (ingested, LineageNode(evalsets)),
            rows=9,
        )

    manifest = node(
        "stage-manifest", "stage1", "3", "r-mix", "mixture", (cleaned("captions"), cleaned("pairs"))
    )
    adapter = node("adapter", "stage1/all", "4", "r-train", "stage1", (manifest,))
    return node("registered-model", "rzenembed v1", "5", "r-reg", "register", (adapter,))


def test_the_text_tree_prints_the_shared_evaluation_sets_once_by_count():
    text = render(pipeline_tree())
    sets_lines = [x for x in text.splitlines() if "eval-sets decontamination" in x]
    assert len(sets_lines) == 2
    assert sets_lines[0].endswith("[eeeeeeeeeeee] 14 sets")
    assert sets_lines[1].endswith("[eeeeeeeeeeee] (as above)")
    assert "/data/eval/set-0" not in text
    assert max(len(x) for x in text.splitlines()) < 120


def test_each_input_is_one_node_with_an_edge_to_every_reader():
    graph = graph_of(pipeline_tree())
    kinds = sorted(ref.kind for ref in graph.nodes.values())
    assert kinds.count("eval-sets") == 1 and kinds.count("raw") == 2 and len(kinds) == 10
    evalsets = next(n for n, ref in graph.nodes.items() if ref.kind == "eval-sets")
    readers = sorted(graph.nodes[dst].name for src, dst, _ in graph.edges if src == evalsets)
    assert readers == ["captions/clean", "pairs/clean"]
    assert len(graph.edges) == 10
    depth = graph.depth()
    assert depth[graph.root] == 5 and {
        depth[n] for n, r in graph.nodes.items() if r.kind == "raw"
    } == {0}


def test_dot_and_mermaid_name_every_node_and_step():
    tree = pipeline_tree()
    dot, mermaid = to_dot(tree), to_mermaid(tree)
    assert dot.startswith("digraph lineage {") and dot.count("->") == 10
    assert dot.count("eval-sets: decontamination") == 1 and "14 sets" in dot
    assert mermaid.startswith("flowchart LR") and mermaid.count("-->") == 10
    for step in ("ingest", "clean", "mixture", "stage1", "register"):
        assert f'[label="{step}"]' in dot and f"|{step}|" in mermaid


def test_the_svg_is_well_formed_with_a_box_per_node_and_a_path_per_edge():
    svg = to_svg(pipeline_tree(), "models:/rzenembed/1: lineage")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    boxes = [r for r in root.iter(f"{ns}rect") if r.get("rx")]
    assert len(boxes) == 10 and len(list(root.iter(f"{ns}path"))) == 10 + 1  # + the marker
    assert "models:/rzenembed/1: lineage" in svg
