"""The endpoint and training never wait on each other for resources.

A Serve model replica deployed with the endpoint's own settings (``serving.app``'s
deployment options, a stand-in class that loads no model) either holds a CPU training
needs, and training is refused within ``compute.wait_timeout_s`` naming the replica, or
asks for its own ``serving`` slot (the default), and training runs beside it.
"""

from __future__ import annotations

import time

import pytest

from rzenembed.compute.admission import InfeasibleRequest

pytestmark = pytest.mark.slow


class StandIn:
    """Holds what the endpoint's model replica asks for and answers; loads nothing."""

    def __call__(self, request) -> str:
        return "ok"


def deploy_endpoint(serve_settings) -> None:
    from ray import serve

    from rzenembed.serving.app import model_deployment

    deployment = model_deployment(serve_settings).options(
        func_or_class=StandIn, autoscaling_config=None, num_replicas=1
    )
    serve.run(deployment.bind(), name="endpoint-stand-in", route_prefix=None)


def test_an_endpoint_holding_a_training_cpu_refuses_training_naming_it_and_apart_both_run(
    prepared_for_training, tmp_path
):
    from ray import serve

    from rzenembed.training.stages import run_stage1

    cfg, data = prepared_for_training
    cfg = cfg.model_copy(
        update={
            "storage": cfg.storage.model_copy(update={"root": str(tmp_path / "versions")}),
            "stage1": cfg.stage1.model_copy(update={"max_steps": 2, "checkpoint_every": 2}),
            "compute": cfg.compute.model_copy(update={"wait_timeout_s": 4.0}),
        }
    )
    assert cfg.compute.num_workers == 2  # both of the local runtime's CPUs
    competing = cfg.serve.model_copy(update={"num_cpus": 1.0, "resources": {}})
    try:
        deploy_endpoint(competing)
        started = time.monotonic()
        with pytest.raises(InfeasibleRequest) as refused:
            run_stage1(cfg, data.stages["stage1"])
        waited = time.monotonic() - started
        message = str(refused.value)
        assert 4.0 <= waited < 30, waited
        assert message.startswith("stage1 training asks for 2 x {CPU: 1}")
        assert "Serve replica endpoint-stand-in:EmbeddingModel on node" in message
        assert "holds {CPU: 1}" in message
        assert message.endswith("not free within compute.wait_timeout_s = 4 s")
        serve.delete("endpoint-stand-in")
        # The default: the replica asks for a serving slot, no CPU; training runs beside it.
        assert (cfg.serve.num_cpus, cfg.serve.resources) == (0.0, {"serving": 1.0})
        deploy_endpoint(cfg.serve)
        result = run_stage1(cfg, data.stages["stage1"])
        assert result.steps == 2
        status = serve.status().applications["endpoint-stand-in"].status
        assert status == "RUNNING"
    finally:
        serve.shutdown()
