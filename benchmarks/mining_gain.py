"""Whether mined negatives help: stage 2 on the sample corpus twice, given against mined.

Run from the repository root (about ten minutes on two cores):

    python benchmarks/mining_gain.py [--root /tmp/mining-gain] [--config configs/tiny.yaml]

Both runs are the demo's pipeline (``configs/tiny.yaml``, every ``runs/`` path under
``--root``, the same seed), in one storage root and one MLflow store, so data preparation and
stage 1 are shared (the second run finds them cached) and only what follows differs:

- **given**: ``mining.enabled: false``: stage 2 trains on the negatives the datasets ship
  (MMEB-style rows and sibling clips; in-batch negatives elsewhere);
- **mined**: mining on, every mixture's ``negatives: mined``: stage 2 trains on the negatives
  the merged stage-1 model mined (docs/data.md, "Mined hard negatives").

It prints each run's scores and the paired bootstrap interval (the same queries, mined
minus given; ``rzenembed.evaluation.uncertainty.paired_difference``) of the scaled-down
MMEB-V2 fixture's score and of every evaluation set's, per modality. docs/PERFORMANCE.md
("Mining") records whatever it shows.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from rzenembed.evaluation.uncertainty import paired_difference
from rzenembed.telemetry import telemetry_off

REPO = Path(__file__).resolve().parent.parent


def variant(root: Path, config: str, name: str, mined: bool) -> Path:
    text = (REPO / config).read_text().replace("runs/", f"{root}/")
    cfg = yaml.safe_load(text)
    cfg["mining"] = {**cfg.get("mining", {}), "enabled": mined}
    for mixture in cfg["stage2"]["mixtures"]:
        mixture["negatives"] = "mined" if mined else "given"
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(config: Path) -> dict:
    from flows.demo import ensure_inputs
    from flows.pipeline import full_pipeline

    ensure_inputs(str(config), [], 10)
    result = full_pipeline(str(config), [])
    return result["report"]


def only(report: dict, keep) -> dict:
    """The report restricted to the datasets ``keep(name, entry)`` accepts."""
    return {**report, "datasets": {k: v for k, v in report["datasets"].items() if keep(k, v)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/mining-gain")
    parser.add_argument("--config", default="configs/tiny.yaml")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    telemetry_off()
    reports = {}
    for name, mined in (("given", False), ("mined", True)):
        ref = run(variant(root, args.config, name, mined))
        reports[name] = json.loads(Path(ref["uri"]).read_text())
    given, mined = reports["given"], reports["mined"]
    for name, report in reports.items():
        levels = {k: v["score"] for k, v in report["meta"].items()}
        shown = ", ".join(f"{k} {100 * v:.1f}" for k, v in levels.items())
        print(f"{name}: All {100 * report['all']['score']:.1f}; {shown}")
    mmeb = lambda _, entry: bool((entry.get("provenance") or {}).get("release"))  # noqa: E731
    for label, keep in (("MMEB-V2 fixture", mmeb), ("every evaluation set", lambda *_: True)):
        for level in ("All", "Image", "Video", "VisDoc"):
            paired = paired_difference(only(mined, keep), only(given, keep), level)
            if paired is None:
                continue
            print(
                f"{label} {level}: mined - given {100 * paired['difference']:+.1f} "
                f"[{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}] "
                f"({paired['queries']} queries, paired 95%)"
            )


if __name__ == "__main__":
    main()
