"""Evaluation reports: JSON for machines, a markdown table laid out like MMEB's, a PNG chart.

Every level of the table is there: datasets, categories (CLS/QA/RET/GD, ...), meta scores
(Image, Video, VisDoc) and All. Scores are stored as fractions in the JSON and shown as
percentages, as the MMEB tables do. Given the previous report, each level gets a delta.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rzenembed.evaluation.categories import COLUMNS, META_ORDER
from rzenembed.evaluation.runner import DatasetScore

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(
    scores: Sequence[DatasetScore],
    model: dict[str, Any],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict; ``previous`` (an earlier report) adds deltas."""
    if not scores:
        raise ValueError("no dataset was scored; nothing to report")
    categories: dict[str, dict[str, Any]] = {}
    for s in scores:
        key = f"{s.meta}/{s.column}"
        entry = categories.setdefault(key, {"meta": s.meta, "column": s.column, "datasets": []})
        entry["datasets"].append(s.name)
    for key, entry in categories.items():
        entry["score"] = _mean([s.score for s in scores if f"{s.meta}/{s.column}" == key])
    meta = {
        m: {"score": _mean([s.score for s in scores if s.meta == m]),
            "datasets": sum(s.meta == m for s in scores)}
        for m in META_ORDER if any(s.meta == m for s in scores)
    }  # fmt: skip
    report: dict[str, Any] = {
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "datasets": {s.name: s.to_json() for s in scores},
        "categories": dict(sorted(categories.items(), key=lambda kv: _order(kv[0]))),
        "meta": meta,
        "all": {"score": _mean([s.score for s in scores]), "datasets": len(scores)},
    }
    if previous is not None:
        report["previous"] = {"model": previous.get("model"), "created": previous.get("created")}
        report["delta"] = deltas(report, previous)
    return report


def _order(key: str) -> tuple[int, int]:
    meta, column = key.split("/")
    return META_ORDER.index(meta), COLUMNS[meta].index(column)


def levels(report: dict[str, Any]) -> dict[str, float]:
    """Every score of a report by a flat key: ``All``, ``Image``, ``Image/CLS``, ``dataset:x``."""
    flat = {"All": report["all"]["score"]}
    flat.update({m: v["score"] for m, v in report["meta"].items()})
    flat.update({k: v["score"] for k, v in report["categories"].items()})
    flat.update({f"dataset:{k}": v["score"] for k, v in report["datasets"].items()})
    return flat


def deltas(report: dict[str, Any], previous: dict[str, Any]) -> dict[str, float]:
    """This report minus the previous one, for every level both have."""
    now, before = levels(report), levels(previous)
    return {k: now[k] - before[k] for k in now if before.get(k) is not None}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def to_markdown(report: dict[str, Any]) -> str:
    delta = report.get("delta", {})
    lines = [f"# Evaluation of {report['model'].get('path', 'a model')}", ""]
    digest = report["model"].get("digest")
    if report.get("previous"):
        before = (report["previous"].get("model") or {}).get("path", "an earlier report")
        lines += [f"Δ rows and columns compare with {before}.", ""]
    lines += [f"Model digest `{digest}`. " if digest else "", f"Created {report['created']}. "
              f"{report['all']['datasets']} datasets; scores in % (Hit@1 for image and video, "
              f"NDCG@k for visual documents).", ""]  # fmt: skip
    # The MMEB layout: one column per category, then the meta score, then All.
    header, row, change = ["model"], ["this model"], ["Δ vs previous"]
    present = {k for k in report["categories"]}
    for meta in META_ORDER:
        for column in COLUMNS[meta]:
            key = f"{meta}/{column}"
            header.append(f"{meta} {column}")
            row.append(_pct(report["categories"][key]["score"]) if key in present else "–")
            change.append(_signed(delta.get(key)))
        header.append(f"**{meta}**")
        row.append(f"**{_pct(report['meta'].get(meta, {}).get('score'))}**")
        change.append(_signed(delta.get(meta)))
    header.append("**All**")
    row.append(f"**{_pct(report['all']['score'])}**")
    change.append(_signed(delta.get("All")))
    table = [header, ["---"] * len(header), row] + ([change] if delta else [])
    lines += ["## Summary (MMEB-V2 layout)", ""] + ["| " + " | ".join(r) + " |" for r in table]
    lines += ["", "## Categories", "", "| meta | category | datasets | score | Δ |",
              "|---|---|---|---|---|"]  # fmt: skip
    for key, entry in report["categories"].items():
        lines.append(f"| {entry['meta']} | {entry['column']} | {len(entry['datasets'])} | "
                     f"{_pct(entry['score'])} | {_signed(delta.get(key))} |")  # fmt: skip
    for meta, entry in report["meta"].items():
        lines.append(f"| **{meta}** | all | {entry['datasets']} | **{_pct(entry['score'])}** | "
                     f"{_signed(delta.get(meta))} |")  # fmt: skip
    lines.append(f"| **All** | | {report['all']['datasets']} | **{_pct(report['all']['score'])}**"
                 f" | {_signed(delta.get('All'))} |")  # fmt: skip
    lines += [
        "",
        "## Datasets",
        "",
        "| dataset | category | ranking | queries | candidates | metric | score | hit@1 | "
        "ndcg | recall@5 | MRR | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in report["datasets"].items():
        m = d["metrics"]
        ndcg = next((v for k, v in m.items() if k.startswith("ndcg@")), None)
        lines.append(
            f"| {name} | {d['meta']} {d['column']} | {d['ranking']} | {d['queries']} | "
            f"{d['candidates']} | {d['metric']} | **{_pct(d['score'])}** | {_pct(m['hit@1'])} | "
            f"{_pct(ndcg)} | {_pct(m.get('recall@5'))} | {_pct(m['mrr'])} | "
            f"{_signed(delta.get(f'dataset:{name}'))} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path, previous: dict[str, Any] | None = None) -> Path:
    """Horizontal bars of every category, meta score and All (previous beside, if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*report["categories"], *report["meta"], "All"]
    now = levels(report)
    before = levels(previous) if previous else {}
    labels = [k.replace("/", " ") for k in keys]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(keys) + 1.2))
    positions = list(range(len(keys)))[::-1]
    height = 0.38 if before else 0.7
    values = [100 * now[k] for k in keys]
    ax.barh([p + (height / 2 if before else 0) for p in positions], values, height,
            label="this model", color="#2f6db3")  # fmt: skip
    if before:
        old = [100 * before[k] if before.get(k) is not None else 0 for k in keys]
        ax.barh([p - height / 2 for p in positions], old, height, label="previous",
                color="#b0b7c3")  # fmt: skip
    for p, v in zip(positions, values, strict=True):
        ax.text(v + 1, p + (height / 2 if before else 0), f"{v:.1f}", va="center", fontsize=8)
    ax.set_yticks(positions, labels)
    ax.set_xlim(0, 105)
    ax.set_xlabel("score (%)")
    ax.set_title("MMEB-style scores by category")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    scores: Sequence[DatasetScore],
    out_dir: str | Path,
    model: dict[str, Any],
    previous: str | Path | dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and report.png under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(previous, str | Path):
        previous = json.loads(Path(previous).read_text())
    report = build_report(scores, model, previous)
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD, "png": out / REPORT_PNG}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(to_markdown(report), encoding="utf-8")
    plot(report, paths["png"], previous)
    return paths
