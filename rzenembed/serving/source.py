"""Which model the endpoint serves: a registry URI or a folder, resolved to one version,
one content digest and one folder a replica can load from any node.

Resolution (a registry query) happens where the endpoint is deployed and followed; the
replicas only receive the resolved ``ServedModel`` and load its folder through the same
staging cache every other step uses (``stage_folder``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rzenembed.config import ModelConfig, PipelineConfig
from rzenembed.data.folders import cache_root, exists, stage_folder
from rzenembed.data.storage import is_remote
from rzenembed.modeling.card import ModelCard
from rzenembed.modeling.digest import model_digest
from rzenembed.tracking import DIGEST_TAG, Tracker, process_tracking_uri, resolve_model_version


class ModelSourceError(LookupError):
    """The model to serve cannot be found (no such alias or version, no folder)."""


@dataclass(frozen=True)
class ServedModel:
    """One resolved model: what a replica loads and what responses name."""

    uri: str  # as asked: models:/NAME@ALIAS, models:/NAME/VERSION or a folder
    name: str  # the registered model's name, or the folder's name
    version: str | None  # the registry version (None for a folder)
    digest: str  # content digest of the model (the registry's rzenembed.digest tag)
    folder: str | None  # storage-root folder (or local path) holding the model
    model_id: str | None = None  # MLflow LoggedModel, used when the folder is gone
    tracking_uri: str | None = None
    endpoint_url: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.name

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_model_uri(cfg: PipelineConfig) -> str:
    """``serve.model_uri``, or the champion of the configured registered model."""
    return cfg.serve.model_uri or f"models:/{cfg.tracking.registered_model}@champion"


def resolve_served_model(
    uri: str, cfg: PipelineConfig, tracker: Tracker | None = None
) -> ServedModel:
    """The model ``uri`` names right now (an alias is read at this moment)."""
    endpoint = cfg.storage.endpoint_url
    if not uri.startswith("models:/"):
        if not exists(uri, endpoint):
            raise ModelSourceError(f"model folder not found: {uri}")
        folder = uri if is_remote(uri) else str(Path(uri).resolve())
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        return ServedModel(
            uri, name, None, model_digest(folder, endpoint), folder, None, None, endpoint
        )
    tracker = tracker or Tracker(cfg.tracking)
    from mlflow.exceptions import MlflowException

    try:
        version = resolve_model_version(tracker, uri)
    except MlflowException as exc:
        raise ModelSourceError(f"{uri}: {exc.message}") from None
    digest = version.tags.get(DIGEST_TAG)
    if not digest:
        raise ModelSourceError(f"{uri} (v{version.version}) carries no {DIGEST_TAG} tag")
    folder = tracker.model_folder(version)
    if folder is not None and not exists(folder, endpoint):
        folder = None  # moved or cleaned up: the LoggedModel's uploaded files remain
    model_id = version.tags.get("rzenembed.model_id") or getattr(version, "model_id", None)
    if folder is None and not model_id:
        raise ModelSourceError(f"{uri} (v{version.version}): no model folder and no model id")
    return ServedModel(
        uri=uri,
        name=version.name,
        version=str(version.version),
        digest=digest,
        folder=folder,
        model_id=model_id,
        tracking_uri=cfg.tracking.tracking_uri,
        endpoint_url=endpoint,
    )


def local_model_folder(served: ServedModel) -> str:
    """A folder on this machine holding ``served`` (staged once per content): the storage
    root's copy when it exists, else the LoggedModel's uploaded artifacts from MLflow."""
    if served.folder is not None:
        return served.folder  # from_pretrained stages remote folders itself
    import mlflow

    target = cache_root() / f"mlflow-{served.model_id}"
    if not ModelCard.exists(target):
        target.mkdir(parents=True, exist_ok=True)
        with process_tracking_uri(served.tracking_uri):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{served.model_id}", dst_path=str(target)
            )
    return str(target)


def model_config_for(
    served_folder: str, dtype: str | None, endpoint_url: str | None
) -> ModelConfig | None:
    """The settings the model was saved with, with ``dtype`` replaced when given (None:
    the card's settings unchanged)."""
    if dtype is None:
        return None
    card = ModelCard.load(stage_folder(served_folder, endpoint_url))
    return ModelConfig(
        name_or_path=served_folder,
        template=card.template,
        **{**card.settings, "dtype": dtype},
    )
