"""The training task's progress artifact moves while training runs, on the run's own Prefect
API, also when that API is set for this run only (``temporary_settings``, a context variable
the poller thread does not inherit by itself)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.training import _Progress


def stored_progress(artifact_id) -> float:
    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id]))
        )
    return float(found.data)


def test_the_poller_moves_the_runs_own_artifact_before_training_ends(prefect_api, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (0, 1)))

    @task
    def training() -> tuple[list[float], float]:
        progress = _Progress(str(metrics), None, total=4, label="stage1", interval_s=0.1)
        seen = [stored_progress(progress.artifact)]
        deadline = time.monotonic() + 20
        while seen[-1] != 50.0 and time.monotonic() < deadline:
            time.sleep(0.2)
            seen.append(stored_progress(progress.artifact))  # the poller's work, not ours
        with Path(metrics).open("a") as f:
            f.write(json.dumps({"step": 2, "loss": 0.5}) + "\n")
        progress.close()
        return seen, stored_progress(progress.artifact)

    @flow
    def progress_flow():
        return training()

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        seen, final = progress_flow()
    assert seen[-1] == 50.0, seen  # 2 of 4 steps, before close()
    assert final == 75.0


def test_the_loss_summary_line_reads_the_start_and_end_of_a_run():
    from tasks.training import loss_summary

    rows = [{"step": i, "loss": 3.0 - 0.1 * i} for i in range(20)]
    rows.insert(0, {"step": 0, "loss": 99.0})  # written before a resume: the later line wins
    # A tenth of 20 steps is 2: (3.0 + 2.9) / 2 and (1.2 + 1.1) / 2.
    assert loss_summary("stage1/all", rows) == "stage1/all: trained, 20 steps, loss 2.950 -> 1.150"
    found = loss_summary("stage2/even", rows[1:4], trained_now=False)
    assert found == "stage2/even: found already trained, 3 steps, loss 3.000 -> 2.800"
    assert loss_summary("stage1/all", []) == "stage1/all: no steps recorded"
