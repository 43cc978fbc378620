"""Evaluation reports: JSON for machines, a markdown table laid out like MMEB's, a PNG chart.

Every level of the table is there: datasets, categories (CLS/QA/RET/GD, ...), meta scores
(Image, Video, VisDoc) and All. Scores are stored as fractions in the JSON and shown as
percentages, as the MMEB tables do. Given the previous report, each level gets a delta.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rzenembed.evaluation import compact_report, comparison
from rzenembed.evaluation.categories import COLUMNS, META_ORDER
from rzenembed.evaluation.formatting import bounds, pct, signed
from rzenembed.evaluation.leaderboard import LEADERBOARD_JSON, write_leaderboard
from rzenembed.evaluation.published import Scores, read_scores_text
from rzenembed.evaluation.runner import DatasetScore
from rzenembed.evaluation.uncertainty import CONFIDENCE, RESAMPLES, SEED, report_intervals

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluation_digest(scores: Sequence[DatasetScore]) -> str:
    """One digest of every dataset a report scored (its content digest): two reports are
    comparable only when theirs are equal."""
    payload = json.dumps(sorted((s.name, s.digest) for s in scores))
    return hashlib.sha256(payload.encode()).hexdigest()


def build_report(
    scores: Sequence[DatasetScore],
    model: dict[str, Any],
    previous: dict[str, Any] | None = None,
    skipped: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict; ``previous`` (an earlier report) adds deltas;
    ``skipped`` (datasets an import left out, with why) is carried into it."""
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
        m: {
            "score": _mean([s.score for s in scores if s.meta == m]),
            "datasets": sum(s.meta == m for s in scores),
        }
        for m in META_ORDER
        if any(s.meta == m for s in scores)
    }
    report: dict[str, Any] = {
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "datasets": {s.name: s.to_json() for s in scores},
        "categories": dict(sorted(categories.items(), key=lambda kv: _order(kv[0]))),
        "meta": meta,
        "all": {"score": _mean([s.score for s in scores]), "datasets": len(scores)},
        "evaluation_digest": evaluation_digest(scores),
        "skipped": dict(skipped or {}),
    }
    # Beside every score, never instead of it: 95% bootstrap intervals over queries.
    report["intervals"] = report_intervals(report)
    report["confidence"] = {
        "level": CONFIDENCE,
        "method": "percentile bootstrap over queries, each dataset resampled on its own",
        "resamples": RESAMPLES,
        "seed": SEED,
    }
    compact = compact_report.compact_section(report)
    if compact is not None:  # nested dimensions and precisions (one embedding pass)
        report["compact"] = compact
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


def _interval(report: dict[str, Any], level: str) -> str:
    """``[low, high]`` in % for a level, or – when its datasets kept no per-query scores."""
    return bounds(report.get("intervals", {}).get(level))


def to_markdown(report: dict[str, Any]) -> str:
    delta = report.get("delta", {})
    lines = [f"# Evaluation of {report['model'].get('path', 'a model')}", ""]
    digest = report["model"].get("digest")
    if report.get("previous"):
        before = (report["previous"].get("model") or {}).get("path", "an earlier report")
        lines += [f"Δ rows and columns compare with {before}.", ""]
    lines += [
        f"Model digest `{digest}`. " if digest else "",
        f"Created {report['created']}. "
        f"{report['all']['datasets']} datasets; scores in % (Hit@1 for image and video, "
        f"NDCG@k for visual documents).",
        "",
    ]
    # The MMEB layout: one column per category, then the meta score, then All.
    header, row, change = ["model"], ["this model"], ["Δ vs previous"]
    present = {k for k in report["categories"]}
    for meta in META_ORDER:
        for column in COLUMNS[meta]:
            key = f"{meta}/{column}"
            header.append(f"{meta} {column}")
            row.append(pct(report["categories"][key]["score"]) if key in present else "–")
            change.append(signed(delta.get(key)))
        header.append(f"**{meta}**")
        row.append(f"**{pct(report['meta'].get(meta, {}).get('score'))}**")
        change.append(signed(delta.get(meta)))
    header.append("**All**")
    row.append(f"**{pct(report['all']['score'])}**")
    change.append(signed(delta.get("All")))
    table = [header, ["---"] * len(header), row] + ([change] if delta else [])
    lines += ["## Summary (MMEB-V2 layout)", ""] + ["| " + " | ".join(r) + " |" for r in table]
    confidence = report.get("confidence", {})
    lines += [
        "",
        "## Categories",
        "",
        f"Intervals: {100 * confidence.get('level', CONFIDENCE):.0f}% percentile bootstrap "
        f"over queries ({confidence.get('resamples', RESAMPLES)} resamples, seed "
        f"{confidence.get('seed', SEED)}); an aggregate resamples each of its datasets.",
        "",
        "| meta | category | datasets | score | 95% interval | Δ |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in report["categories"].items():
        lines.append(
            f"| {entry['meta']} | {entry['column']} | {len(entry['datasets'])} | "
            f"{pct(entry['score'])} | {_interval(report, key)} | {signed(delta.get(key))} |"
        )
    for meta, entry in report["meta"].items():
        lines.append(
            f"| **{meta}** | all | {entry['datasets']} | **{pct(entry['score'])}** | "
            f"{_interval(report, meta)} | {signed(delta.get(meta))} |"
        )
    lines.append(
        f"| **All** | | {report['all']['datasets']} | **{pct(report['all']['score'])}**"
        f" | {_interval(report, 'All')} | {signed(delta.get('All'))} |"
    )
    lines += [
        "",
        "## Datasets",
        "",
        "Scores are exact under ties (the expectation over tie orders). *first listed* is "
        "the score when ties go to the candidate listed first, the reference harness's "
        "convention; it is shown only where the two differ.",
        "",
        "| dataset | category | ranking | queries | candidates | frames | metric | score | "
        "95% interval | first listed | hit@1 | ndcg | recall@5 | MRR | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in report["datasets"].items():
        m = d["metrics"]
        ndcg = next((v for k, v in m.items() if k.startswith("ndcg@")), None)
        listed = m.get(f"first_listed:{d['metric']}")
        differs = listed is not None and abs(listed - d["score"]) > 5e-4
        lines.append(
            f"| {name} | {d['meta']} {d['column']} | {d['ranking']} | {d['queries']} | "
            f"{d['candidates']} | {d.get('frames') or '–'} | {d['metric']} | "
            f"**{pct(d['score'])}** | {_interval(report, f'dataset:{name}')} | "
            f"{pct(listed) if differs else ''} | {pct(m['hit@1'])} | "
            f"{pct(ndcg)} | {pct(m.get('recall@5'))} | {pct(m['mrr'])} | "
            f"{signed(delta.get(f'dataset:{name}'))} |"
        )
    releases = Counter(
        f"{p['source']} release `{p['release']}`"
        for p in (d.get("provenance") or {} for d in report["datasets"].values())
        if p.get("release")
    )
    if releases:
        named = "; ".join(f"{k} ({n} datasets)" for k, n in sorted(releases.items()))
        lines += ["", f"Imported sets: {named}; annotation digests in report.json."]
    skipped = report.get("skipped", {})
    incomplete = {k: v for k, v in skipped.items() if v.get("kind") != "absent"}
    absent = sorted(k for k, v in skipped.items() if v.get("kind") == "absent")
    if incomplete:
        lines += ["", "## Skipped (not scored: a part is missing)", ""]
        lines += ["| dataset | why |", "|---|---|"]
        lines += [f"| {k} | {v['reason']} |" for k, v in sorted(incomplete.items())]
    if absent:
        lines += ["", f"Not in the imported release ({len(absent)}): {', '.join(absent)}."]
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
    ax.barh(
        [p + (height / 2 if before else 0) for p in positions],
        values,
        height,
        label="this model",
        color="#2f6db3",
    )
    if before:
        old = [100 * before[k] if before.get(k) is not None else 0 for k in keys]
        ax.barh([p - height / 2 for p in positions], old, height, label="previous", color="#b0b7c3")
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
    skipped: dict[str, dict[str, Any]] | None = None,
    references: Sequence[Scores] = (),
) -> dict[str, Path]:
    """Write report.json, report.md, report.png and leaderboard.json (the benchmark's
    datasets in the MMEB-V2 score-file shape) under ``out_dir``; return their paths.
    ``references`` (published score files, read) add a section beside them, in the
    report and in comparison.json / comparison.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(previous, str | Path):
        previous = json.loads(Path(previous).read_text())
    report = build_report(scores, model, previous, skipped)
    paths = {
        "json": out / REPORT_JSON,
        "markdown": out / REPORT_MD,
        "png": out / REPORT_PNG,
        "leaderboard": out / LEADERBOARD_JSON,
    }
    name = model.get("name") or Path(str(model.get("path", "model"))).name
    markdown = to_markdown(report)
    if "compact" in report:
        paths["dimensions"] = out / compact_report.DIMENSIONS_PNG
        compact_report.plot(report["compact"], paths["dimensions"])
        markdown += "\n" + compact_report.to_markdown(report["compact"], paths["dimensions"].name)
    if references:
        ours = read_scores_text(report, str(paths["json"]), name="this model")
        report["comparison"] = comparison.compare_all(ours, references)
        paths["comparison"] = out / comparison.COMPARISON_PNG
        comparison.plot(report["comparison"], paths["comparison"])
        markdown += "\n" + comparison.to_markdown(report["comparison"], paths["comparison"].name)
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown, encoding="utf-8")
    plot(report, paths["png"], previous)
    write_leaderboard(report, paths["leaderboard"], name)
    return paths
