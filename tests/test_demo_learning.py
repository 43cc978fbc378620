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

import numpy as np
import pytest
import yaml

# The module fixture runs a whole pipeline (3-6 minutes beside the other xdist worker):
# the first test's setup may pass the suite's 600 s per test on a slow machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
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


def test_the_demo_scores_every_trained_size_and_precision(demo):
    """The demo trains nested dimensions (8, 16, 32 of 64): the report, the leaderboard, the
    model folder's calibration, the registry and the console all carry them."""
    root, out = demo
    line = next(x for x in out.splitlines() if x.startswith("sizes (All, float"))
    print(line)
    assert "trained [8, 16, 32, 64]" in line and "int8" in line and "binary" in line
    report_md = next(x for x in out.splitlines() if x.startswith("report: ")).split(" ", 1)[1]
    folder = Path(report_md).parent
    report = json.loads((folder / "report.json").read_text())
    compact = report["compact"]
    assert compact["dimensions"] == [8, 16, 32, 64] == compact["trained_dimensions"]
    assert compact["precisions"] == ["float", "int8", "binary"]
    full = compact["variants"]["64/float"]["scores"]["All"]
    assert full == pytest.approx(report["all"]["score"])  # the same vectors, the same score
    for key, entry in compact["variants"].items():
        low, high = entry["intervals"]["All"]
        assert low <= entry["scores"]["All"] <= high, key
    assert "## Nested dimensions and precisions" in (folder / "report.md").read_text()
    assert (folder / "dimensions.png").stat().st_size > 10_000
    board = json.loads((folder / "leaderboard.json").read_text())
    assert len(board["compact"]["8/binary"]["datasets"]) == 10  # the release's ten
    assert board["compact"]["8/binary"]["bytes"] == 1
    # int8's ranges: calibrated on the training data, stored beside the weights.
    calibration = report["model"]["calibration"]
    stored = json.loads(Path(calibration["uri"]).read_text())
    assert sorted(int(d) for d in stored["ranges"]) == [8, 16, 32, 64]
    assert len(stored["source"]["stage_manifests"]) == 2  # the two stage-2 mixtures
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    version = client.get_model_version_by_alias("rzenembed", "candidate")
    assert version.tags["rzenembed.trained_dimensions"] == "8,16,32,64"
    assert version.tags["rzenembed.calibration"].split()[1] == calibration["uri"]
    model_id = version.tags["rzenembed.model_id"]
    uploaded = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert "quantization.json" in uploaded  # an endpoint serving the uploaded files has it


def test_nested_training_keeps_more_of_its_score_at_the_smallest_size(demo, ray_local):
    """The demo's stage 1 (nested dimensions) against the same run without them: the same
    config, data, seed and 300 steps, only ``loss.matryoshka`` off. Both merged models are
    scored on the held-out ``eval-image-retrieval`` (100 captions, 5 scenes each) at 8 of 64
    dimensions and at full size, from one pass each; the share of its full-size score a model
    keeps at 8 is compared by a paired bootstrap over the same queries. Measured (2026-12-07,
    docs/PERFORMANCE.md, "Nested dimensions"): 98% against 70%, interval [+10, +46] points."""
    from rzenembed.config import load_config
    from rzenembed.evaluation import evaluate
    from rzenembed.evaluation.runner import Variants
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.prep.mixture import StageManifest
    from rzenembed.training.stages import merge_stage1, run_stage1

    root, _ = demo
    (found,) = [
        p for p in (root / "data" / "_stages").rglob("stage-manifest.json") if "stage1" in str(p)
    ]
    manifest = StageManifest.load(str(found))
    held_out = root / "sample-corpus" / "eval" / "eval-image-retrieval"
    scores = {}
    for name, nested in (("nested", True), ("plain", False)):
        overrides = [] if nested else ["loss.matryoshka=null"]
        cfg = load_config(root / "tiny.yaml", overrides)
        assert (cfg.loss.matryoshka is not None) == nested
        merged = merge_stage1(cfg, run_stage1(cfg, manifest).adapter_uri)
        embedder = RzenEmbedder.from_pretrained(merged).eval()
        (scores[name],) = evaluate(embedder, held_out, variants=Variants([8], ["float"]))

    def share(score, picks=slice(None)) -> float:
        small = np.asarray(score.variants["8/float"]["per_query"])[picks].mean()
        return float(small / np.asarray(score.variants["64/float"]["per_query"])[picks].mean())

    rng = np.random.default_rng(0)
    queries = scores["plain"].queries
    draws = []
    for _ in range(1000):  # the same resampled queries for both models: paired
        picks = rng.integers(0, queries, queries)
        draws.append(share(scores["nested"], picks) - share(scores["plain"], picks))
    low, high = np.percentile(draws, [2.5, 97.5])
    for name, score in scores.items():
        print(name, {k: round(v["score"], 3) for k, v in score.variants.items()})
    print(
        f"share of the full-size score kept at 8 of 64 dimensions: nested "
        f"{100 * share(scores['nested']):.0f}%, plain {100 * share(scores['plain']):.0f}%; "
        f"paired 95% interval of the difference [{100 * low:+.0f}, {100 * high:+.0f}] points"
    )
    assert low > 0
