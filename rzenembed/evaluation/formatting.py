"""How every evaluation table writes a score: a fraction shown in percent, one decimal.

The report, the comparison with published models and the nested-size tables print the
same numbers side by side; one definition keeps them identical ("–" where there is none).
"""

from __future__ import annotations

from collections.abc import Sequence


def pct(value: float | None) -> str:
    """``0.4567`` -> ``45.7``; None -> ``–``."""
    return "–" if value is None else f"{100 * value:.1f}"


def signed(value: float | None) -> str:
    """A change in points: ``+1.2``; None -> empty."""
    return "" if value is None else f"{100 * value:+.1f}"


def bounds(interval: Sequence[float] | None) -> str:
    """``[low, high]`` in percent; None -> ``–``."""
    return "–" if interval is None else f"[{pct(interval[0])}, {pct(interval[1])}]"
