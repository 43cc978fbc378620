"""The pipeline's mining step: every stage-2 dataset mined with one model.

This process (a Ray Job's driver on a cluster) coordinates: it reads the rows, searches and
applies the rules; the embedding runs on the evaluation's embedding actors
(``compute.eval_actors``, a GPU each on a cluster: ``rzenembed.evaluation.step.
embedding_pool``), started only when some dataset is not mined already. The datasets are
mined one after another on the same actors; each is its own cached version, so a rerun
mines only what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rzenembed.config import PipelineConfig
from rzenembed.data.version import DatasetVersion
from rzenembed.evaluation.runner import Encoder
from rzenembed.mining.mine import Judge, local_judge, mine_version


def mine_step(
    cfg: PipelineConfig, versions: dict[str, str], model: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """``mine_all`` with ``compute.eval_actors`` embedding actors of ``model``."""
    from rzenembed.evaluation.step import embedding_pool

    pool = embedding_pool(cfg, model["uri"])
    judge = _JudgeOnRay(cfg, pool.close) if cfg.mining.judge.enabled else None
    try:
        return mine_all(cfg, versions, model, lambda: pool, judge)
    finally:
        pool.close()
        if judge is not None:
            judge.close()


class _JudgeOnRay:
    """The judge as one Ray actor with the step's resources (a GPU on a cluster): a
    generative model does not belong on the coordinator, and an actor loads it once for all
    of a dataset's chunks. The embedding actors are released before it starts (they may
    hold every GPU) and it is released after each dataset (``close``), before the pool
    starts its actors again for the next one."""

    def __init__(self, cfg: PipelineConfig, release: Callable[[], None]):
        self.cfg = cfg
        self.release = release
        self.actor: Any = None

    def __call__(self, pairs: list, media_root: str) -> list[float]:
        import ray

        from rzenembed.compute.admission import admit_for
        from rzenembed.compute.steps import step_bundle
        from rzenembed.compute.waiting import wait_for

        if self.actor is None:
            self.release()
            gpus, cpus, custom = step_bundle(self.cfg)
            resources = {"GPU": gpus, "CPU": cpus, **custom}
            admit_for(self.cfg.compute, "the relevance judge", 1, resources)
            options: dict[str, Any] = {"num_gpus": gpus, "num_cpus": cpus}
            if custom:
                options["resources"] = custom
            self.actor = ray.remote(_JudgeActor).options(**options).remote(self.cfg)
        work = self.actor.relevance.remote(pairs, media_root)
        return wait_for(work, "judging mined negatives", self.cfg.compute.step_timeout_s)

    def close(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None


class _JudgeActor:
    def __init__(self, cfg: PipelineConfig):
        self.judge = local_judge(cfg)

    def relevance(self, pairs: list, media_root: str) -> list[float]:
        return self.judge(pairs, media_root)


def mine_all(
    cfg: PipelineConfig,
    versions: dict[str, str],
    model: dict[str, str],
    make_encoder: Callable[[], Encoder],
    judge: Judge | None = None,
) -> dict[str, dict[str, Any]]:
    """Mine each dataset version (name -> URI) with ``model`` ({"uri", "digest"}, embedded
    by ``make_encoder()``); per dataset: the mined version's URI, its report and whether it
    was found already mined."""
    endpoint = cfg.storage.endpoint_url
    out = {}
    for name, uri in sorted(versions.items()):
        version = DatasetVersion.open(uri, endpoint)
        mined = mine_version(cfg, version, make_encoder, model, False, judge)
        if hasattr(judge, "close"):  # its GPU back before the next dataset's embedding
            judge.close()
        out[name] = {"uri": mined.version.uri, "reused": mined.reused, "report": mined.report}
    return out
