"""Scores per nested dimension and per precision, as a report shows them.

Every dataset score may carry compact variants (``runner.Variants``: the main metric of
each (dimension, precision), with per-query values). This module aggregates them like the
main table (a level is the mean over its datasets), gives each a 95% bootstrap interval
(``uncertainty.report_intervals``: the same resampling as the main scores) and the share of
the full float score it keeps, and draws score against dimension per modality.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rzenembed.compact import code_bytes, parse_variant, variant_key
from rzenembed.evaluation.categories import META_ORDER
from rzenembed.evaluation.formatting import bounds, pct
from rzenembed.evaluation.uncertainty import level_members, report_intervals

DIMENSIONS_PNG = "dimensions.png"
SHOWN_LEVELS = ("Image", "Video", "VisDoc", "All")


def compact_section(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report's ``compact`` entry: by variant key, each level's score, interval and
    share of the full float score; None when no dataset was scored in compact forms."""
    datasets = report["datasets"]
    keys = [set(entry.get("variants") or {}) for entry in datasets.values()]
    common = set.intersection(*keys) if keys else set()
    if not common:
        return None
    members = {
        level: names
        for level, names in level_members(report).items()
        if not level.startswith("dataset:")
    }
    variants = sorted(common, key=lambda k: (parse_variant(k)[0], _precision_rank(k)))
    full = max(parse_variant(k)[0] for k in variants)
    reference = variant_key(full, "float")
    out: dict[str, Any] = {"variants": {}}
    for key in variants:
        derived = {
            "datasets": {
                name: {**entry, **entry["variants"][key]} for name, entry in datasets.items()
            }
        }
        scores = {
            level: sum(derived["datasets"][n]["score"] for n in names) / len(names)
            for level, names in members.items()
        }
        intervals = report_intervals(derived)
        dim, precision = parse_variant(key)
        out["variants"][key] = {
            "dimension": dim,
            "precision": precision,
            "bytes": code_bytes(dim, precision),
            "scores": scores,
            "intervals": {k: v for k, v in intervals.items() if k in members},
        }
    base = out["variants"].get(reference, {}).get("scores", {})
    for entry in out["variants"].values():
        entry["share_of_full"] = {
            level: (score / base[level] if base.get(level) else None)
            for level, score in entry["scores"].items()
        }
    out["dimensions"] = sorted({v["dimension"] for v in out["variants"].values()})
    out["precisions"] = [
        p for p in _PRECISION_ORDER if any(v["precision"] == p for v in out["variants"].values())
    ]
    model = report.get("model") or {}
    out["trained_dimensions"] = list(model.get("trained_dimensions") or [])
    out["calibration"] = model.get("calibration")
    return out


_PRECISION_ORDER = ("float", "int8", "uint8", "binary", "ubinary")


def _precision_rank(key: str) -> int:
    return _PRECISION_ORDER.index(parse_variant(key)[1])


def _cell(entry: Mapping[str, Any] | None, level: str, with_interval: bool) -> str:
    if entry is None or level not in entry["scores"]:
        return "–"
    text = pct(entry["scores"][level])
    interval = entry["intervals"].get(level)
    if with_interval and interval is not None:
        text += f" {bounds(interval)}"
    return text


def to_markdown(section: Mapping[str, Any], picture: str | None = DIMENSIONS_PNG) -> str:
    """Two tables: score per modality at each dimension (float, with intervals and the
    share of full kept), and All at each dimension and precision (with bytes a vector)."""
    variants = section["variants"]
    trained = set(section.get("trained_dimensions") or [])
    levels = [m for m in (*META_ORDER, "All") if m in SHOWN_LEVELS]
    present = [lv for lv in levels if any(lv in v["scores"] for v in variants.values())]
    lines = [
        "## Nested dimensions and precisions",
        "",
        "Each size is a prefix of the same embeddings, renormalised; codes are made and "
        "ranked as the endpoint makes them and a store ranks them (int8: integer dot "
        "product of codes from the calibrated ranges, uint8 the same codes offset by 128; "
        "binary: Hamming distance). Scores in %, 95% intervals as above; † a size the "
        "model was trained for (`loss.matryoshka`).",
        "",
    ]
    calibration = section.get("calibration")
    if calibration:
        lines += [
            f"int8/uint8 ranges: calibrated on {calibration.get('rows')} rows of the model's "
            f"training data (`{calibration.get('uri')}`).",
            "",
        ]
    else:
        lines += ["int8/uint8: not scored (the model has no calibration).", ""]
    header = ["dimension", "bytes (float)", *present, "share of full (All)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dim in section["dimensions"]:
        entry = variants.get(variant_key(dim, "float"))
        share = (entry or {}).get("share_of_full", {}).get("All")
        mark = " †" if dim in trained else ""
        cells = [_cell(entry, level, True) for level in present]
        lines.append(
            f"| {dim}{mark} | {code_bytes(dim, 'float')} | "
            + " | ".join(cells)
            + f" | {'–' if share is None else f'{100 * share:.0f}%'} |"
        )
    precisions = section["precisions"]
    lines += ["", "All by dimension and precision (bytes a vector in brackets):", ""]
    lines += ["| dimension | " + " | ".join(precisions) + " |", "|---|" + "---|" * len(precisions)]
    for dim in section["dimensions"]:
        cells = []
        for precision in precisions:
            entry = variants.get(variant_key(dim, precision))
            size = code_bytes(dim, precision)
            cells.append(f"{_cell(entry, 'All', True)} ({size} B)" if entry else "–")
        lines.append(f"| {dim}{' †' if dim in trained else ''} | " + " | ".join(cells) + " |")
    if picture:
        lines += ["", f"![score against dimension]({picture})"]
    return "\n".join(lines) + "\n"


def plot(section: Mapping[str, Any], path: Path) -> Path:
    """Score against dimension (log scale): one solid line per modality at float, dashed
    lines for All at each other precision; trained sizes marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = section["variants"]
    dims = section["dimensions"]
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    colours = {"Image": "#2f6db3", "Video": "#c0504d", "VisDoc": "#4f9a5a", "All": "#222222"}
    for level, colour in colours.items():
        points = [
            (d, 100 * variants[variant_key(d, "float")]["scores"][level])
            for d in dims
            if level in variants.get(variant_key(d, "float"), {}).get("scores", {})
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=colour, label=f"{level} float")
    styles = {"int8": "--", "uint8": "-.", "binary": ":", "ubinary": ":"}
    for precision in section["precisions"]:
        if precision == "float":
            continue
        points = [
            (d, 100 * variants[variant_key(d, precision)]["scores"]["All"])
            for d in dims
            if variant_key(d, precision) in variants
        ]
        if points:
            ax.plot(
                *zip(*points, strict=True),
                linestyle=styles.get(precision, "--"),
                marker=".",
                color="#777777",
                label=f"All {precision}",
            )
    ax.set_xscale("log", base=2)
    trained = set(section.get("trained_dimensions") or [])
    ax.set_xticks(dims, [f"{d}†" if d in trained else str(d) for d in dims])
    ax.set_xlabel("dimensions († trained)")
    ax.set_ylabel("score (%)")
    ax.set_title("Score against embedding size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the lines
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
