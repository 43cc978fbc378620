"""The demo shows learning: ``make demo``'s own code (``flows.demo``) with ``configs/tiny.yaml``,
every path moved under a temporary folder, must end with a trained model above the untrained
one in Image, Video and VisDoc on the sample corpus's evaluation sets and the scaled-down
MMEB-V2 release (30 queries per dataset): the paired 95% interval of trained minus untrained
excludes zero at every level it prints.

A learning check, not a timing: it runs the demo once (about three minutes on two cores), in
a process of its own with its own Prefect home (reporting to the suite's Prefect server rather
than starting a temporary one), and reads the lines the demo prints and the report it writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PROGRESS_BAR = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm's bars, redrawn with \r
GAIN = re.compile(r"(All|Image|Video|VisDoc) ([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]")


def demo_config(root: Path) -> Path:
    """``configs/tiny.yaml`` with every ``runs/`` path under ``root``."""
    text = (REPO / "configs" / "tiny.yaml").read_text().replace("runs/", f"{root}/")
    cfg = yaml.safe_load(text)
    assert f"{root}/sample-corpus/mmeb-v2" in cfg["eval"]["sets"]
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("demo")
    config = demo_config(root)
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": prefect_api}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "flows.demo", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return root, done.stdout + done.stderr  # the flow's closing lines go through its logger


def test_the_demo_prints_a_paired_gain_that_excludes_zero_in_every_modality(demo):
    _, out = demo
    line = next(x for x in out.splitlines() if x.startswith("gain over the untrained base"))
    print(line)
    gains = {level: tuple(map(float, rest)) for level, *rest in GAIN.findall(line)}
    assert set(gains) == {"All", "Image", "Video", "VisDoc"}, line
    for level, (mean, low, high) in gains.items():
        assert low <= mean <= high, (level, line)
        assert low > 0, f"{level}: trained minus untrained {mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def test_the_report_scores_the_30_query_release_with_intervals(demo):
    _, out = demo
    report_md = next(x for x in out.splitlines() if x.startswith("report: ")).split(" ", 1)[1]
    report = json.loads((Path(report_md).parent / "report.json").read_text())
    mmeb = {n: d for n, d in report["datasets"].items() if d["provenance"].get("release")}
    assert len(mmeb) == 10 and all(d["queries"] == 30 for d in mmeb.values()), mmeb.keys()
    points = {"All": report["all"]["score"], **{m: v["score"] for m, v in report["meta"].items()}}
    assert set(points) == {"All", "Image", "Video", "VisDoc"}
    for level, point in points.items():
        low, high = report["intervals"][level]
        assert low <= point <= high and high - low < 0.25, (level, low, point, high)


def test_stage1_loss_falls_over_the_demo_run(demo):
    """Stage 1 alone learns too (the check that once had a test of its own,
    docs/PERFORMANCE.md, "Learning check"): its loss over the last fifth of the run is well
    below the first fifth."""
    root, _ = demo
    (metrics,) = [p for p in root.rglob("metrics.jsonl") if "/stage1/" in str(p)]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line]
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert len(losses) == cfg["stage1"]["max_steps"]
    fifth = len(losses) // 5
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    assert last < 0.8 * first, (first, last)


def test_the_demo_console_is_short_and_free_of_ray_data_internals(demo):
    """A person reads the demo's console: at most 80 lines besides progress bars (a line
    per finished task and Ray Data's execution plans stay off it), none of them Ray Data's
    own INFO lines, and the closing lines say where to look next."""
    _, out = demo
    lines = [x for x in re.split(r"[\r\n]", out) if x.strip()]
    shown = [x for x in lines if not PROGRESS_BAR.search(x)]
    assert len(shown) <= 80, "\n".join(shown)
    internal = [x for x in shown if "streaming_executor" in x or "Execution plan" in x]
    assert internal == []
    assert not [x for x in shown if "Task run" in x and "Finished in state Completed" in x]
    for hint in ("model: models:/", "report: ", "lineage: rzenembed lineage", "serve: "):
        assert any(hint in x for x in shown), hint
    # What each training run did, one line each: stage 1 and the two stage-2 mixtures.
    trained = [x for x in shown if re.search(r"stage[12]/\S+: trained, \d+ steps, loss", x)]
    assert len(trained) == 3, trained
    # One mining line per stage-2 dataset (seven sources and the merged classification).
    mined = [x for x in shown if re.search(r"mine/\S+: \d+ queries, [\d.]+ negatives each", x)]
    assert len(mined) == 8, mined


def test_stage2_trains_on_negatives_mined_by_the_stage1_model(demo):
    """Both stage-2 mixtures' manifests name the mined versions, and their reports say the
    chosen negatives score above random in-batch ones under the stage-1 model."""
    root, _ = demo
    manifests = [json.loads(p.read_text()) for p in root.rglob("stage-manifest.json")]
    stage2 = [m for m in manifests if m["stage"] == "stage2"]
    assert {m["mixture"] for m in stage2} == {"balanced", "doc-heavy"}
    for manifest in stage2:
        for d in manifest["datasets"]:
            assert "/mine/" in d["uri"] and d["negatives"] == "both", d
            assert d["max_negatives"] >= 1, d
    reports = [json.loads(p.read_text()) for p in root.rglob("report/mining.json")]
    assert len(reports) == 8
    scores = [r["scores"] for r in reports if r["scores"]["mined"].get("count")]
    above = [s["mined"]["mean"] > s["random"]["mean"] for s in scores]
    assert len(scores) >= 6 and all(above), [(r["dataset"], r["scores"]) for r in reports]


def test_the_commands_the_demo_prints_work_as_printed(demo):
    """`lineage:` and `verify:` are run exactly as printed (the installed `rzenembed`);
    `browse:` names `mlflow ui` with a store it accepts (a SQLite file, not a server)."""
    _, out = demo
    hints = dict(
        x.split(": ", 1)
        for x in out.splitlines()
        if x.startswith(("lineage: ", "verify: ", "browse: "))
    )
    assert set(hints) == {"lineage", "verify", "browse"}, hints
    rzenembed = Path(sys.executable).parent / "rzenembed"
    for name in ("lineage", "verify"):
        argv = hints[name].split()
        assert argv[0] == "rzenembed"
        done = subprocess.run(
            [str(rzenembed), *argv[1:]], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
        if name == "lineage":  # the registered model's data passes through the mining step
            assert "/mine" in done.stdout, done.stdout[-3000:]
    assert hints["browse"].startswith("mlflow ui --backend-store-uri sqlite:///")
