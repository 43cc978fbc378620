"""Requests are checked against what the cluster has free before anything waits: one that
can never be placed fails at once naming what was asked and what there is; one that waits
for resources others hold (or for the autoscaler) fails after its timeout naming the
holders; evaluation actors are capped at what the cluster holds and still give the same
scores; waiting on Ray work times out as ``StepTimeout`` for tasks and actor calls alike."""

from __future__ import annotations

import itertools
import time

import pytest

from rzenembed.compute.admission import (
    InfeasibleRequest,
    ResourceRequest,
    admit,
    how_many_fit,
    pack,
)

GPU_NODE = {"CPU": 88.0, "GPU": 8.0, "memory": 9e11}


def test_packing_never_splits_a_bundle_across_nodes():
    two_nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert pack([{"CPU": 4.0, "GPU": 1.0}] * 2, two_nodes) is not None
    assert pack([{"CPU": 8.0}], two_nodes) is None  # 8 CPUs in all, never on one node
    assert pack([{"trainer": 1.0}], two_nodes) is None  # a resource no node declares
    assert how_many_fit({"CPU": 8.0, "GPU": 1.0}, 16, [GPU_NODE]) == 8


def test_sixteen_workers_on_one_eight_gpu_node_fail_at_once_naming_asked_and_available():
    request = ResourceRequest.of("stage1 training", 16, {"GPU": 1, "CPU": 8})
    started = time.monotonic()
    with pytest.raises(InfeasibleRequest) as error:
        admit(request, nodes=lambda: [GPU_NODE], wait_timeout_s=600)
    assert time.monotonic() - started < 1
    assert str(error.value).startswith(
        "stage1 training asks for 16 x {CPU: 8, GPU: 1} (in all {CPU: 128, GPU: 16}); the "
        "cluster has 1 node(s) with {CPU: 88, GPU: 8} in all: it can never be placed"
    )


def test_a_request_that_needs_the_autoscaler_waits_for_its_nodes_then_times_out(caplog):
    request = ResourceRequest.of("stage1 training", 16, {"GPU": 1, "CPU": 8})
    calls = []

    def growing():
        calls.append(1)
        return [GPU_NODE] if len(calls) < 3 else [GPU_NODE, GPU_NODE]

    with caplog.at_level("INFO", logger="rzenembed.compute.admission"):
        admit(request, [(GPU_NODE, 1)], 60, nodes=growing, poll_s=0.01, holders=lambda k: [])
    assert len(calls) >= 3 and "waiting for resources" in caplog.text
    with pytest.raises(InfeasibleRequest, match=r"not free within .* 0.05 s \(nor added by"):
        admit(request, [(GPU_NODE, 1)], 0.05, nodes=lambda: [GPU_NODE], poll_s=0.01)
    with pytest.raises(InfeasibleRequest, match="can never be placed"):
        admit(request, [(GPU_NODE, 0 + 1)], 60, nodes=lambda: [{"CPU": 1.0}])


def test_a_request_for_resources_someone_holds_waits_then_names_the_holder():
    """16 GPUs exist but an endpoint replica holds one: the request waits (it could fit an
    idle cluster) and fails after the timeout naming who holds what."""
    request = ResourceRequest.of("stage1 training", 16, {"GPU": 1, "CPU": 8})
    held = {**GPU_NODE, "GPU": 7.0, "CPU": 84.0}
    holders = ["Serve replica rzenembed:EmbeddingModel on node 1a2b3c4d holds {GPU: 1}"]
    started = time.monotonic()
    with pytest.raises(InfeasibleRequest) as error:
        admit(
            request,
            wait_timeout_s=0.3,
            nodes=lambda: [GPU_NODE, GPU_NODE],
            free=lambda: [GPU_NODE, held],
            holders=lambda kinds: holders if "GPU" in kinds else [],
            poll_s=0.05,
        )
    assert 0.3 <= time.monotonic() - started < 2
    assert str(error.value) == (
        "stage1 training asks for 16 x {CPU: 8, GPU: 1} (in all {CPU: 128, GPU: 16}); the "
        "cluster has 2 node(s) with {CPU: 172, GPU: 15} free in all; Serve replica "
        "rzenembed:EmbeddingModel on node 1a2b3c4d holds {GPU: 1}; not free within "
        "compute.wait_timeout_s = 0.3 s"
    )
    # Freed within the wait: admitted.
    frees = iter([[GPU_NODE, held], [GPU_NODE, GPU_NODE]])
    admit(
        request,
        wait_timeout_s=5,
        nodes=lambda: [GPU_NODE, GPU_NODE],
        free=lambda: next(frees, [GPU_NODE, GPU_NODE]),
        holders=lambda kinds: [],
        poll_s=0.05,
    )


def test_a_request_freed_a_moment_later_is_admitted_at_once_and_long_waits_poll_slowly():
    """A step's workers are still being released when the next step asks: the first looks
    come within a fraction of a second, not after a whole ``poll_s``; later ones back off
    to ``poll_s`` and stay there."""
    request = ResourceRequest.of("stage2 training", 1, {"CPU": 1})
    busy, idle = [{"CPU": 0.0}], [{"CPU": 1.0}]
    looks: list[float] = []

    def freed_on_third_look():
        looks.append(time.monotonic())
        return idle if len(looks) >= 3 else busy

    started = time.monotonic()
    kwargs = {"nodes": lambda: idle, "holders": lambda kinds: []}
    admit(request, wait_timeout_s=60, free=freed_on_third_look, poll_s=2.0, **kwargs)
    # The first look, the one the "waiting" line makes, then the first poll, 0.1 s on.
    assert len(looks) == 3 and time.monotonic() - started < 1.0

    def look_busy():
        looks.append(time.monotonic())
        return busy

    looks.clear()
    with pytest.raises(InfeasibleRequest, match="not free within"):
        admit(request, wait_timeout_s=1.6, free=look_busy, poll_s=0.4, **kwargs)
    # looks: the first, the one the "waiting" line makes, the polls, the error's.
    gaps = [b - a for a, b in itertools.pairwise(looks[1:-1])]
    assert gaps[0] < 0.3 and gaps[0] < gaps[2], gaps  # 0.1, 0.2, 0.4 (a busy machine: later)
    assert all(0.35 < g < 0.9 for g in gaps[2:-1]), gaps  # then poll_s (the last: cut short)


@pytest.mark.slow
def test_too_many_workers_on_the_local_cluster_fail_before_training(
    prepared_for_training, tmp_path
):
    """The real runtime: 16 one-CPU workers on a 2-CPU Ray fail within seconds."""
    from rzenembed.training.stages import run_stage1

    cfg, data = prepared_for_training
    big = cfg.model_copy(
        update={
            "storage": cfg.storage.model_copy(update={"root": str(tmp_path / "runs")}),
            "compute": cfg.compute.model_copy(update={"num_workers": 16}),
            "stage1": cfg.stage1.model_copy(update={"global_batch_size": 16}),
        }
    )
    started = time.monotonic()
    with pytest.raises(InfeasibleRequest, match=r"stage1 training asks for 16 x \{CPU: 1\}"):
        run_stage1(big, data.stages["stage1"])
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_an_evaluation_with_more_actors_than_the_cluster_holds_runs_with_those_it_holds(
    ray_local, tiny_model_dir, sample_corpus, tmp_path, caplog
):
    """Five one-CPU actors asked, two CPUs: two actors embed, and the scores equal those
    of the same model embedding in this process."""
    from rzenembed.config import config_from_dict
    from rzenembed.evaluation import evaluate
    from rzenembed.evaluation.actors import EmbedActor, eval_actor_count
    from rzenembed.evaluation.step import _score_with_actors

    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir), "max_visual_tokens": 16},
            "storage": {"root": str(tmp_path / "runs")},
            "compute": {"eval_actors": 5, "step_cpus": 1},
            "eval": {"batch_size": 8},
        }
    )
    sets = [str(sample_corpus.root / "eval" / "eval-shapes-classification")]
    model = {"uri": str(tiny_model_dir), "digest": "tiny"}
    with caplog.at_level("WARNING", logger="rzenembed.evaluation.actors"):
        assert eval_actor_count(cfg) == 2
        capped = _score_with_actors(cfg, model, sets, str(tmp_path / "cache"))
    assert "compute.eval_actors is 5 but the cluster holds 2" in caplog.text
    here = evaluate(
        EmbedActor(cfg, model["uri"]), sets, batch_size=8, max_frames=cfg.model.video_frames
    )
    assert [(r.name, round(r.score, 6)) for r in capped] == [
        (r.name, round(r.score, 6)) for r in here
    ]


def _sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


@pytest.mark.slow
def test_waiting_on_ray_work_reports_progress_and_times_out(ray_local, caplog):
    import ray

    from rzenembed.compute.waiting import StepTimeout, wait_for

    task = ray.remote(_sleep_then).options(num_cpus=0)
    with caplog.at_level("INFO", logger="rzenembed.compute.waiting"):
        done = wait_for([task.remote(0.0, 1), task.remote(1.0, 2)], "two tasks", 60, 0.2)
    assert done == [1, 2] and "two tasks: 1 of 2 done after" in caplog.text
    started = time.monotonic()
    with pytest.raises(StepTimeout, match=r"slow step: 0 of 1 done after 0.5 s"):
        wait_for(task.remote(30.0, 3), "slow step", timeout_s=0.5, report_every_s=0.1)
    assert time.monotonic() - started < 5
    # An actor call times out the same way (Ray refuses to force-cancel actor calls).
    sleeper = ray.remote(_Sleeper).options(num_cpus=0).remote()
    started = time.monotonic()
    with pytest.raises(StepTimeout, match=r"slow actor call: 0 of 1 done after 0.5 s"):
        wait_for(sleeper.nap.remote(30.0), "slow actor call", timeout_s=0.5, report_every_s=0.1)
    assert time.monotonic() - started < 5
    ray.kill(sleeper)


class _Sleeper:
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds
