"""The pipeline's mining step: every stage-2 dataset mined with one model, in one Ray task.

The task has the step's resources (``compute.step_gpus``: a GPU on a cluster; admitted on
what is free, bounded by ``compute.step_timeout_s``, like merge and soup). The model is
loaded once, only when some dataset is not mined already, and the datasets are mined one
after another on it; each is its own cached version, so a rerun mines only what is missing.
"""

from __future__ import annotations

from typing import Any

from rzenembed.config import PipelineConfig
from rzenembed.data.version import DatasetVersion
from rzenembed.mining.mine import mine_version


def mine_step(
    cfg: PipelineConfig, versions: dict[str, str], model: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """``mine_all`` as a Ray task with the step's resources (see the module docstring)."""
    from rzenembed.compute.steps import on_ray

    return on_ray(cfg, mine_all, cfg, versions, model)


def mine_all(
    cfg: PipelineConfig, versions: dict[str, str], model: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Mine each dataset version (name -> URI) with ``model`` ({"uri", "digest"}); per
    dataset: the mined version's URI and content digest, its report and whether it was
    found already mined."""
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.runtime import task_runtime

    endpoint = cfg.storage.endpoint_url
    loaded: list[Any] = []

    def embedder() -> Any:
        if not loaded:
            device = task_runtime(cfg.model, cfg.compute).device
            loaded.append(
                RzenEmbedder.from_pretrained(
                    model["uri"], config=cfg.model, device=device, endpoint_url=endpoint
                )
            )
        return loaded[0]

    out = {}
    for name, uri in sorted(versions.items()):
        mined = mine_version(cfg, DatasetVersion.open(uri, endpoint), embedder, model, False)
        out[name] = {
            "uri": mined.version.uri,
            "reused": mined.reused,
            "report": mined.report,
        }
    return out
