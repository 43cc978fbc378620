"""A registered model's lineage as a graph a person can look at: DOT, Mermaid, or a
self-contained SVG (``rzenembed lineage --format dot|mermaid|svg``).

The text tree of ``rzenembed.tracking.render`` repeats an input under every output that
read it; here each input is one node, whatever reads it: the evaluation sets every clean
step decontaminated against appear once, with an edge to each clean step's output. Nodes
are laid out in columns by how far they are from the raw sources (raw sources left, the
registered model right), so the picture reads as the pipeline ran.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass, field

from rzenembed.tracking import LineageNode, LineageRef

# Fill colour per kind of node (the SVG's legend is these).
KIND_COLOURS = {
    "raw": "#e8eef7",
    "eval-sets": "#f7efe0",
    "dataset": "#e6f2e6",
    "stage-manifest": "#eef7e6",
    "model": "#efe8f7",
    "adapter": "#f3e6f2",
    "report": "#fdf3d6",
    "registered-model": "#ffd9c2",
}


@dataclass
class LineageGraph:
    """Nodes by id (one per distinct ref) and edges ``(input id, output id, step)``."""

    nodes: dict[str, LineageRef] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)
    root: str = ""

    def depth(self) -> dict[str, int]:
        """Each node's column: the longest path from a node with no inputs."""
        inputs: dict[str, list[str]] = {n: [] for n in self.nodes}
        for src, dst, _ in self.edges:
            inputs[dst].append(src)
        found: dict[str, int] = {}

        def visit(node: str) -> int:
            if node not in found:
                found[node] = 1 + max((visit(i) for i in inputs[node]), default=-1)
            return found[node]

        for node in self.nodes:
            visit(node)
        return found


def node_id(ref: LineageRef) -> str:
    """The same input read by several steps is one node: kind, URI and digest name it."""
    key = "\0".join(ref.identity)
    return "n" + hashlib.sha256(key.encode()).hexdigest()[:10]


def graph_of(tree: LineageNode) -> LineageGraph:
    graph = LineageGraph(root=node_id(tree.ref))
    seen_edges: set[tuple[str, str, str]] = set()

    def walk(node: LineageNode) -> None:
        here = node_id(node.ref)
        graph.nodes.setdefault(here, node.ref)
        for child in node.children:
            edge = (node_id(child.ref), here, node.step or "")
            if edge not in seen_edges:
                seen_edges.add(edge)
                graph.edges.append(edge)
            walk(child)

    walk(tree)
    return graph


def label(ref: LineageRef) -> str:
    """Two short lines: kind and name, then the digest's first 12 characters (and how many
    sets an evaluation-set node stands for, instead of their comma-joined paths)."""
    second = ref.digest[:12]
    if ref.kind == "eval-sets":
        second += f" · {len(ref.extra.get('sets', []))} sets"
    elif "rows" in ref.extra:
        second += f" · {ref.extra['rows']} rows"
    return f"{ref.kind}: {ref.name}\n{second}"


def to_dot(tree: LineageNode) -> str:
    graph = graph_of(tree)
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled"];']
    for nid, ref in graph.nodes.items():
        text = label(ref).replace('"', "'").replace("\n", "\\n")
        colour = KIND_COLOURS.get(ref.kind, "#ffffff")
        lines.append(f'  {nid} [label="{text}", fillcolor="{colour}"];')
    for src, dst, step in graph.edges:
        lines.append(f'  {src} -> {dst} [label="{step}"];' if step else f"  {src} -> {dst};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(tree: LineageNode) -> str:
    graph = graph_of(tree)
    lines = ["flowchart LR"]
    for nid, ref in graph.nodes.items():
        text = label(ref).replace('"', "'").replace("\n", "<br/>")
        lines.append(f'  {nid}["{text}"]')
    for src, dst, step in graph.edges:
        lines.append(f"  {src} -->|{step}| {dst}" if step else f"  {src} --> {dst}")
    return "\n".join(lines) + "\n"


BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 230, 44, 70, 14, 20


def to_svg(tree: LineageNode, title: str = "") -> str:
    """The graph drawn in columns (raw sources left, the registered model right), one box
    per node coloured by kind, an arrow per edge labelled with the step that read it."""
    graph = graph_of(tree)
    depth = graph.depth()
    columns: dict[int, list[str]] = {}
    for nid in sorted(graph.nodes, key=lambda n: (graph.nodes[n].kind, graph.nodes[n].name)):
        columns.setdefault(depth[nid], []).append(nid)
    tallest = max(len(c) for c in columns.values())
    top = MARGIN + (28 if title else 0)
    width = 2 * MARGIN + len(columns) * BOX_W + (len(columns) - 1) * GAP_X
    height = top + MARGIN + tallest * (BOX_H + GAP_Y)
    place: dict[str, tuple[float, float]] = {}
    for col, nids in columns.items():
        offset = (tallest - len(nids)) * (BOX_H + GAP_Y) / 2
        for row, nid in enumerate(nids):
            place[nid] = (MARGIN + col * (BOX_W + GAP_X), top + offset + row * (BOX_H + GAP_Y))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(
            f'<text x="{MARGIN}" y="{MARGIN + 12}" font-size="15" font-weight="bold">'
            f"{html.escape(title)}</text>"
        )
    for src, dst, step in graph.edges:
        (x1, y1), (x2, y2) = place[src], place[dst]
        x1, y1, x2, y2 = x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2
        out.append(
            f'<path d="M{x1},{y1} C{x1 + GAP_X / 2},{y1} {x2 - GAP_X / 2},{y2} {x2},{y2}" '
            f'fill="none" stroke="#999" marker-end="url(#arrow)"><title>'
            f"{html.escape(step)}</title></path>"
        )
    for nid, ref in graph.nodes.items():
        x, y = place[nid]
        first, second = label(ref).split("\n", 1)
        colour = KIND_COLOURS.get(ref.kind, "#ffffff")
        border = "#c0502b" if nid == graph.root else "#8a8a8a"
        out += [
            f"<g><title>{html.escape(ref.uri)}</title>",
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{colour}" '
            f'stroke="{border}"/>',
            f'<text x="{x + 8}" y="{y + 18}">{html.escape(_clip(first, 36))}</text>',
            f'<text x="{x + 8}" y="{y + 34}" fill="#555">{html.escape(_clip(second, 38))}</text>',
            "</g>",
        ]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _clip(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"
