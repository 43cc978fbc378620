"""Our model beside published ones: per dataset, category, modality and All.

A published score file rarely covers what we scored, and we rarely score all 78 datasets:
the v2.1 page-fixed files list 22 visual-document sets, a run on part of the release scores
what was downloaded. Every level is therefore computed on the datasets *both* sides have,
ours and theirs on the same datasets, and a level computed on fewer datasets than the
benchmark gives it is labelled (``12 of 78*``), so a partial mean is never read as the
leaderboard's number. What each side lacks is named.

Our 95% interval on a level comes from the report's per-query scores, resampled as the
report's own intervals are (``rzenembed.evaluation.uncertainty``), on exactly the datasets
compared; a published file has no per-query scores, so its number is a point and the
difference's interval is ours shifted by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rzenembed.evaluation.benchmark import benchmark_dataset, mmeb_v2
from rzenembed.evaluation.categories import COLUMNS, META_ORDER, category_of
from rzenembed.evaluation.formatting import bounds, pct
from rzenembed.evaluation.published import Scores
from rzenembed.evaluation.uncertainty import dataset_draws, percentile_interval

COMPARISON_JSON, COMPARISON_MD, COMPARISON_PNG = (
    "comparison.json",
    "comparison.md",
    "comparison.png",
)


def levels_of(dataset: str) -> list[str]:
    """The levels a dataset counts in: its category, its modality, All."""
    category = category_of(benchmark_dataset(dataset).category)
    return [f"{category.meta}/{category.column}", category.meta, "All"]


def level_order() -> list[str]:
    """All, the modalities, then every category in the MMEB table's order."""
    return ["All", *META_ORDER] + [f"{m}/{c}" for m in META_ORDER for c in COLUMNS[m]]


def benchmark_sizes() -> dict[str, int]:
    """How many datasets the benchmark puts in each level (All: 78)."""
    sizes: dict[str, int] = {}
    for item in mmeb_v2():
        for level in levels_of(item.dataset):
            sizes[level] = sizes.get(level, 0) + 1
    return sizes


def _table_order(names: set[str]) -> list[str]:
    return [item.dataset for item in mmeb_v2() if item.dataset in names]


def _interval(ours: Scores, names: list[str]) -> list[float] | None:
    if not names or any(n not in ours.per_query for n in names):
        return None
    draws = dataset_draws({n: ours.per_query[n] for n in names})
    return list(percentile_interval(np.mean([draws[n] for n in names], axis=0)))


def _by_modality(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        meta = levels_of(name)[1]
        out[meta] = out.get(meta, 0) + 1
    return out


def compare(ours: Scores, reference: Scores) -> dict[str, Any]:
    """``ours`` beside ``reference`` on the datasets both have (a JSON-able dict)."""
    common = _table_order(set(ours.scores) & set(reference.scores))
    sizes = benchmark_sizes()
    datasets = [
        {
            "dataset": name,
            "level": levels_of(name)[0],
            "ours": ours.scores[name],
            "reference": reference.scores[name],
            "difference": ours.scores[name] - reference.scores[name],
            "interval": _interval(ours, [name]),
            "queries": ours.queries.get(name),
        }
        for name in common
    ]
    levels = []
    for level in level_order():
        members = [n for n in common if level in levels_of(n)]
        if not members:
            continue
        mine = float(np.mean([ours.scores[n] for n in members]))
        theirs = float(np.mean([reference.scores[n] for n in members]))
        levels.append(
            {
                "level": level,
                "datasets": len(members),
                "benchmark_datasets": sizes[level],
                "partial": len(members) < sizes[level],
                "ours": mine,
                "reference": theirs,
                "difference": mine - theirs,
                "interval": _interval(ours, members),
            }
        )
    only_ours = _table_order(set(ours.scores) - set(reference.scores))
    only_reference = _table_order(set(reference.scores) - set(ours.scores))
    return {
        "ours": ours.name,
        "reference": reference.name,
        "reference_source": reference.source,
        "common": common,
        "only_ours": only_ours,
        "only_reference": only_reference,
        "missing_in_both": _table_order(
            {d.dataset for d in mmeb_v2()} - set(ours.scores) - set(reference.scores)
        ),
        "notes": list(reference.notes),
        "levels": levels,
        "datasets": datasets,
    }


def compare_all(ours: Scores, references: Sequence[Scores]) -> list[dict[str, Any]]:
    return [compare(ours, reference) for reference in references]


# --------------------------------------------------------------------------- showing it


def _count(entry: dict[str, Any]) -> str:
    star = "*" if entry["partial"] else ""
    return f"{entry['datasets']} of {entry['benchmark_datasets']}{star}"


def _names(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    groups = ", ".join(f"{m} {n}" for m, n in _by_modality(names).items())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} ({groups}): {shown}{more}"


def _summary_lines(c: dict[str, Any]) -> list[str]:
    lines = [
        f"datasets in common: {len(c['common'])}",
        f"scored here, not in {c['reference']}: {_names(c['only_ours'])}",
        f"in {c['reference']}, not scored here: {_names(c['only_reference'])}",
    ]
    if c["notes"]:
        lines.append("reading " + c["reference_source"] + ":")
        lines += [f"  {note}" for note in c["notes"]]
    return lines


def to_text(comparisons: Sequence[dict[str, Any]]) -> str:
    """The comparison for a terminal: one block per published file, its levels then its
    datasets."""
    out: list[str] = []
    for c in comparisons:
        out += [f"{c['ours']} beside {c['reference']} ({c['reference_source']})"]
        out += ["  " + line for line in _summary_lines(c)]
        if not c["common"]:
            out += ["  nothing to compare: no dataset scored on both sides", ""]
            continue
        first = max(len(n) for n in ["level", *c["common"]]) + 2
        width = max(len(c["reference"]), 9)
        rows = [(e["level"], _count(e), e) for e in c["levels"]]
        rows += [(d["dataset"], d["level"], d) for d in c["datasets"]]
        for k, (name, count, entry) in enumerate(rows):
            if k in (0, len(c["levels"])):
                header = ("level", "datasets") if k == 0 else ("dataset", "category")
                out.append(
                    f"  {header[0]:<{first}}{header[1]:>12}  {'ours':>6}  {'95% interval':<14}"
                    f"{c['reference'][:width]:>{width}}  {'Δ':>6}"
                )
            out.append(
                f"  {name:<{first}}{count:>12}  {pct(entry['ours']):>6}  "
                f"{bounds(entry['interval']):<14}{pct(entry['reference']):>{width}}  "
                f"{100 * entry['difference']:>+6.1f}"
            )
        if any(e["partial"] for e in c["levels"]):
            out.append("  * computed on fewer datasets than the benchmark's level")
        out.append("")
    return "\n".join(out)


def to_markdown(comparisons: Sequence[dict[str, Any]], chart: str | None = None) -> str:
    """The comparison as a report section (``chart``: the picture's file name)."""
    lines = [
        "## Beside published models",
        "",
        "Each level is the mean over the datasets both sides scored; a level computed on "
        "fewer datasets than the benchmark's is marked *. Scores in %; Δ is ours minus theirs; "
        "the interval is ours (95% bootstrap over queries on the same datasets).",
        "",
    ]
    if chart:
        lines += [f"![ours beside published models]({chart})", ""]
    for c in comparisons:
        lines += [f"### {c['reference']}", "", f"From `{c['reference_source']}`.", ""]
        lines += [f"- {line.strip()}" for line in _summary_lines(c) if not line.startswith(" ")]
        lines += [f"  - {note}" for note in c["notes"]]
        if not c["common"]:
            lines += ["", "No dataset was scored on both sides.", ""]
            continue
        lines += [
            "",
            f"| level | datasets | ours | 95% interval | {c['reference']} | Δ |",
            "|---|---|---|---|---|---|",
        ]
        for e in c["levels"]:
            lines.append(
                f"| {e['level']} | {_count(e)} | **{pct(e['ours'])}** | {bounds(e['interval'])}"
                f" | {pct(e['reference'])} | {100 * e['difference']:+.1f} |"
            )
        lines += [
            "",
            f"| dataset | category | queries here | ours | 95% interval | {c['reference']} | Δ |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in c["datasets"]:
            lines.append(
                f"| {d['dataset']} | {d['level'].replace('/', ' ')} | {d['queries'] or '–'} | "
                f"{pct(d['ours'])} | {bounds(d['interval'])} | {pct(d['reference'])} | "
                f"{100 * d['difference']:+.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(comparisons: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per published file: each level's score, ours (with its interval) beside
    theirs; partial levels are starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in comparisons if c["levels"]]
    rows = max((len(c["levels"]) for c in shown), default=1)
    fig, axes = plt.subplots(
        1, max(len(shown), 1), figsize=(6.5 * max(len(shown), 1), 0.42 * rows + 1.6), squeeze=False
    )
    for ax, c in zip(axes[0], shown, strict=False):
        entries = c["levels"]
        positions = np.arange(len(entries))[::-1]
        ours = [100 * e["ours"] for e in entries]
        theirs = [100 * e["reference"] for e in entries]
        errors = np.array(
            [
                [100 * (e["ours"] - e["interval"][0]), 100 * (e["interval"][1] - e["ours"])]
                if e["interval"]
                else [0.0, 0.0]
                for e in entries
            ]
        ).T
        ax.barh(positions + 0.2, ours, 0.38, xerr=errors, color="#2f6db3", label=c["ours"])
        ax.barh(positions - 0.2, theirs, 0.38, color="#b0b7c3", label=c["reference"])
        labels = [f"{e['level'].replace('/', ' ')}{'*' if e['partial'] else ''}" for e in entries]
        ax.set_yticks(positions, labels)
        ax.set_xlim(0, 105)
        ax.set_xlabel("score (%)")
        ax.set_title(f"beside {c['reference']}", fontsize=10)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
