"""What mining did to one dataset, for a person: JSON, markdown and a picture.

The figures a user needs to trust mined negatives: how many queries got how many, how many
candidates each rule removed (``rules.RULES``), and where the scores lie: the queries'
positives, the mined negatives, and random in-batch candidates (one uniformly drawn other
positive per query, what training would otherwise contrast against). Mined negatives
should sit well above random ones and below the positives; a distribution of mined scores
pressed against the positives' says the false-negative rules are too loose.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from rzenembed.data.folders import write_bytes, write_text
from rzenembed.data.storage import join
from rzenembed.mining.rules import RULES, Selection

FALSE_NEGATIVE_RULES = (*RULES[:5], "judged_relevant")

REPORT_FILES = {"json": "mining.json", "markdown": "mining.md", "png": "mining.png"}
EXAMPLES = 3
DISTRIBUTION_SAMPLES = 5000  # scores per distribution kept for the picture


def summary(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return {"count": 0}
    p10, p50, p90 = np.percentile(data, [10, 50, 90])
    return {
        "count": int(data.size),
        "mean": float(data.mean()),
        "p10": float(p10),
        "median": float(p50),
        "p90": float(p90),
    }


def _sampled(values: Sequence[float] | np.ndarray, most: int = DISTRIBUTION_SAMPLES) -> list[float]:
    data = np.asarray(values, dtype=np.float64)
    if data.size > most:
        data = data[np.linspace(0, data.size - 1, most).astype(np.int64)]
    return [round(float(v), 4) for v in data]


def build_report(
    dataset: str,
    selection: Selection,
    random_scores: np.ndarray,
    ids: Sequence[str],
    texts: Sequence[str],
    index: str,
    mining: dict[str, Any],
    model: dict[str, str],
) -> dict[str, Any]:
    counts = [len(c) for c in selection.chosen]
    mined = [s for scores in selection.scores for s in scores]
    examples = [
        {"id": ids[i], "query": texts[i], "mined": [ids[c] for c in selection.chosen[i]]}
        for i in range(len(ids))
        if selection.chosen[i]
    ][:EXAMPLES]
    return {
        "dataset": dataset,
        "queries": len(ids),
        "pool": len(ids),
        "index": index,
        "negatives_per_query": float(np.mean(counts)) if counts else 0.0,
        "negatives": int(sum(counts)),
        "short_queries": int(selection.short),
        "removed": {rule: int(selection.removed.get(rule, 0)) for rule in RULES},
        "scores": {
            "positive": summary(selection.positive_scores),
            "mined": summary(mined),
            "random": summary(random_scores),
        },
        # Scores for the picture: evenly spaced samples, rounded (a report, not a dataset).
        "distributions": {
            "positive": _sampled(selection.positive_scores),
            "mined": _sampled(mined),
            "random": _sampled(random_scores),
        },
        "examples": examples,
        "mining": mining,
        "model": model,
    }


def one_line(report: dict[str, Any]) -> str:
    """The flow's line for a dataset: what was mined, what the rules removed, the scores."""
    # The false-negative rules only; the window's and the draw's counts are in the report.
    removed = ", ".join(
        f"{k} {v}" for k, v in report["removed"].items() if v and k in FALSE_NEGATIVE_RULES
    )
    scores = report["scores"]
    mean = {k: scores[k].get("mean") for k in ("positive", "mined", "random")}
    shown = " / ".join(f"{k} {'–' if v is None else f'{v:.3f}'}" for k, v in mean.items())
    return (
        f"mine/{report['dataset']}: {report['queries']} queries, "
        f"{report['negatives_per_query']:.1f} negatives each ({report['short_queries']} short); "
        f"false negatives removed: {removed or 'none'}; mean score {shown}"
    )


def to_markdown(report: dict[str, Any]) -> str:
    scores = report["scores"]
    lines = [
        f"# Mined negatives: {report['dataset']}",
        "",
        f"{report['queries']} queries over a pool of {report['pool']} ({report['index']} "
        f"search), {report['negatives_per_query']:.2f} negatives per query, "
        f"{report['short_queries']} queries with fewer than asked. Model "
        f"`{report['model'].get('digest', '')[:16]}`.",
        "",
        "| rule | candidates removed |",
        "|---|---|",
        *(f"| {rule} | {n} |" for rule, n in report["removed"].items()),
        "",
        "| scores | count | mean | p10 | median | p90 |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("positive", "mined", "random"):
        s = scores[name]
        if not s.get("count"):
            lines.append(f"| {name} | 0 | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {s['count']} | {s['mean']:.3f} | {s['p10']:.3f} | "
            f"{s['median']:.3f} | {s['p90']:.3f} |"
        )
    lines += ["", f"![score distributions]({REPORT_FILES['png']})", "", "Examples:", ""]
    lines += [f"- `{e['id']}` {e['query']!r}: {', '.join(e['mined'])}" for e in report["examples"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    colours = {"positive": "#2f9e44", "mined": "#2f6db3", "random": "#b0b7c3"}
    for name, colour in colours.items():
        values = report["distributions"][name]
        if values:
            ax.hist(values, bins=30, alpha=0.6, color=colour, label=f"{name} ({len(values)})")
    ax.set_xlabel("score under the mining model (cosine)")
    ax.set_ylabel("count")
    ax.set_title(f"mined negatives: {report['dataset']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report_files(report: dict[str, Any], folder_uri: str, endpoint: str | None) -> None:
    """mining.json, mining.md and mining.png under ``folder_uri``."""
    write_text(
        join(folder_uri, REPORT_FILES["json"]), json.dumps(report, indent=2) + "\n", endpoint
    )
    write_text(join(folder_uri, REPORT_FILES["markdown"]), to_markdown(report), endpoint)
    write_bytes(join(folder_uri, REPORT_FILES["png"]), plot(report), endpoint)
