"""The local demo: the whole pipeline on the embedded default, in one process.

    python -m flows.demo [--config configs/tiny.yaml] [--scale 10] [--family F]
                         [--set KEY=VALUE ...] [--verbose]
    (what `make demo` runs; `make demo FAMILY=qwen3-vl` passes --family)

Builds what is missing (the tiny offline Qwen2-VL in ``model.name_or_path``, the sample
corpus at ``--scale`` in the folder the sources point to, and the scaled-down MMEB-V2
release imported into an evaluation folder named ``mmeb-v2``), then runs ``full-pipeline``
in-process: an ephemeral Prefect API, local Ray, MLflow in a SQLite file. At the end it
prints the registered model, its score against the untrained base, the report and how to
browse the lineage. A second run reuses every finished step (Prefect cache hits).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from rzenembed.config import load_config
from rzenembed.data.engine import VERBOSE_ENV
from rzenembed.data.sample import SAMPLE_VERSION, build_sample_corpus
from rzenembed.evaluation.release import import_mmeb_v2
from rzenembed.evaluation.release_fixture import FIXTURE_VERSION, build_release_fixture
from rzenembed.modeling.backbones import FAMILIES
from rzenembed.modeling.tiny import build_tiny_model
from rzenembed.telemetry import telemetry_off

MMEB_V2_SETS = "mmeb-v2"  # an eval set folder of this name is the imported fixture
# Queries per dataset of the demo's scaled-down MMEB-V2: enough for intervals of about
# +-15 points per dataset and well under that per modality (three would be noise).
MMEB_V2_QUERIES = 30


class _FinishedTaskRuns(logging.Filter):
    """Drops Prefect's one line per task run that finished well ("Finished in state
    Completed()" / "Cached(...)": 54 of a demo's 111 lines); a task that fails, crashes or
    retries is still shown, and the Prefect UI keeps every state."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Finished in state Completed", "Finished in state Cached"))


def quiet_finished_tasks() -> None:
    """The demo's console without a line per finished task (``--verbose`` keeps them)."""
    logging.getLogger("prefect.task_runs").addFilter(_FinishedTaskRuns())


def ensure_inputs(config: str, overrides: list[str], scale: int) -> None:
    """The tiny model, the sample corpus and the MMEB-V2 fixture, built in code when
    missing or built by an older release of this code (their version stamps say)."""
    cfg = load_config(config, overrides)
    model_dir = Path(cfg.model.name_or_path)
    family = "qwen2-vl" if cfg.model.family == "auto" else cfg.model.family
    if not (model_dir / "config.json").is_file():
        print(f"building the tiny offline {family} model in {model_dir}")
        build_tiny_model(model_dir, seed=cfg.seed, family=family)
    for folder in sorted({Path(s.uri).parent for s in cfg.sources}):
        if not corpus_is_current(folder, scale):
            if (folder / "corpus.json").is_file():  # an older sample build: replaced whole
                shutil.rmtree(folder)
            print(f"generating the sample corpus (scale {scale}) in {folder}")
            build_sample_corpus(folder, seed=cfg.seed, scale=scale)
    for uri in cfg.eval.sets:
        sets = Path(uri)
        if sets.name == MMEB_V2_SETS and not fixture_is_current(sets):
            ensure_mmeb_v2_fixture(sets)


def _described(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def corpus_is_current(folder: Path, scale: int) -> bool:
    """Whether ``folder`` holds a sample corpus this code would build at ``scale``: one
    built by an older release (another ``SAMPLE_VERSION``) is built again, so the demo's
    figures are the ones the docs give."""
    described = _described(folder / "corpus.json")
    return described.get("version") == SAMPLE_VERSION and described.get("scale") == scale


FIXTURE_STAMP = "fixture.json"  # beside suite.json: what built the imported fixture


def fixture_is_current(sets: Path) -> bool:
    """Whether ``sets`` holds the fixture this code writes (version and queries)."""
    wanted = {"version": FIXTURE_VERSION, "queries": MMEB_V2_QUERIES}
    return (sets / "suite.json").is_file() and _described(sets / FIXTURE_STAMP) == wanted


def ensure_mmeb_v2_fixture(sets: Path) -> None:
    """The scaled-down MMEB-V2 release (beside ``sets``), imported into ``sets`` as the
    real release would be, and stamped with what built it."""
    release = sets.with_name(f"{MMEB_V2_SETS}-release")
    print(f"building the scaled-down MMEB-V2 release in {release} and importing it")
    build_release_fixture(release, queries=MMEB_V2_QUERIES)
    import_mmeb_v2(release, sets, release="fixture")
    stamp = {"version": FIXTURE_VERSION, "queries": MMEB_V2_QUERIES}
    (sets / FIXTURE_STAMP).write_text(json.dumps(stamp) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--scale", type=int, default=10, help="sample corpus scale")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="train the tiny model of this backbone family (its own folder runs/tiny-FAMILY)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep Ray Data's own INFO lines on the terminal (else only in its session log)",
    )
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        quiet_finished_tasks()
    if args.family:
        args.set = [
            f"model.family={args.family}",
            f"model.name_or_path=runs/tiny-{args.family}",
            *args.set,
        ]
    # Without `make`: the same Prefect settings the Makefile exports (see docs/operations.md).
    os.environ.setdefault("PREFECT_HOME", str(Path("runs/prefect").resolve()))
    telemetry_off()  # unless the environment turns it on (rzenembed.telemetry)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    started = time.perf_counter()
    ensure_inputs(args.config, args.set, args.scale)
    from flows.pipeline import full_pipeline

    full_pipeline(args.config, args.set)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
