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
    judge = _judge_on_ray(cfg) if cfg.mining.judge.enabled else None
    try:
        return mine_all(cfg, versions, model, lambda: pool, judge)
    finally:
        pool.close()


def _judge_on_ray(cfg: PipelineConfig) -> Judge:
    """The judge as a Ray task per dataset with the step's resources (a GPU on a cluster):
    a generative model does not belong on the coordinator."""
    from rzenembed.compute.steps import on_ray

    def judge(pairs: list, media_root: str) -> list[float]:
        return on_ray(cfg, _judge_here, cfg, pairs, media_root)

    return judge


def _judge_here(cfg: PipelineConfig, pairs: list, media_root: str) -> list[float]:
    return local_judge(cfg)(pairs, media_root)


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
        out[name] = {"uri": mined.version.uri, "reused": mined.reused, "report": mined.report}
    return out
