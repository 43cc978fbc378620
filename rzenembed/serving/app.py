"""The Ray Serve application: an HTTP front and the model replicas.

``EmbeddingsAPI`` (CPU) owns the HTTP contract: it validates requests, decodes media and
shapes responses (``protocol.py``); it never loads the model. ``EmbeddingModel`` replicas
(one GPU each on a cluster) hold the embedder and batch items across concurrent requests
with ``@serve.batch``, counted in items, not requests. Each replica answers with the
version and digest it loaded, so a response always names the model that produced it, also
while a rollout runs.

A new model version is a new ``EmbeddingModel`` deployment version: Serve starts the new
replicas first (``max_surge_percent=100``), sends traffic to them once they are healthy and
then drains the old ones, so no request is dropped (``deploy``; ``follow.py`` calls it
when the alias moves).
"""


import asyncio
import logging
import time
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rzenembed.config import PipelineConfig, ServeConfig
from rzenembed.modeling.inputs import EmbedInput
from rzenembed.serving import protocol
from rzenembed.serving.source import ServedModel, local_model_folder, model_config_for

log = logging.getLogger(__name__)

http = FastAPI(title="rzenembed embeddings", docs_url=None, redoc_url=None)


class EmbeddingModel:
    """One model replica: loads ``served`` and embeds batches of items."""

    def __init__(self, served: dict[str, Any], dtype: str | None, batch: int, wait_s: float):
        from rzenembed.modeling import RzenEmbedder
        from rzenembed.runtime import task_device

        self._batched.set_max_batch_size(batch)
        self._batched.set_batch_wait_timeout_s(wait_s)
        self.served = ServedModel(**served)
        started = time.monotonic()
        folder = local_model_folder(self.served)
        device = task_device(want_gpu=True)  # CUDA only when Ray gave this replica a GPU
        config = model_config_for(folder, dtype, self.served.endpoint_url)
        self.embedder = RzenEmbedder.from_pretrained(
            folder, config=config, device=device, endpoint_url=self.served.endpoint_url
        ).eval()
        self.info_doc = {
            "name": self.served.name,
            "version": self.served.version,
            "digest": self.served.digest,
            "uri": self.served.uri,
            "dimensions": self.embedder.embedding_dim,
            "template": self.embedder.cfg.template,
            "family": self.embedder.family.family,
            "dtype": self.embedder.cfg.dtype,
            "device": str(device),
            "load_s": round(time.monotonic() - started, 3),
        }
        log.info("serving %s (digest %s) on %s", self.served.label, self.served.digest[:12], device)

    async def info(self) -> dict[str, Any]:
        return self.info_doc

    async def embed(self, items: list[EmbedInput]) -> dict[str, Any]:
        """Vectors (float32) and token counts for one request's items, batched with other
        requests' items; ``{"error": ...}`` when these items (and only these) failed."""
        return await self._batched(items)

    @serve.batch(batch_size_fn=lambda calls: sum(len(c) for c in calls))
    async def _batched(self, calls: list[list[EmbedInput]]) -> list[Any]:
        return await asyncio.to_thread(self._embed_calls, calls)

    def _embed_calls(self, calls: list[list[EmbedInput]]) -> list[Any]:
        flat = [item for call in calls for item in call]
        try:
            vectors, tokens = self._forward(flat)
        except Exception:
            return [self._embed_alone(call) for call in calls]
        out, start = [], 0
        for call in calls:
            end = start + len(call)
            out.append(self._answer(vectors[start:end], tokens[start:end]))
            start = end
        return out

    def _embed_alone(self, call: list[EmbedInput]) -> Any:
        try:
            return self._answer(*self._forward(call))
        except Exception as exc:
            log.warning("items could not be embedded: %s", exc)
            return {"error": f"the input could not be embedded: {type(exc).__name__}: {exc}"}

    @torch.inference_mode()
    def _forward(self, items: list[EmbedInput]) -> tuple[np.ndarray, list[int]]:
        batch = self.embedder.prepare(items)
        tokens = batch["attention_mask"].sum(dim=1).tolist()
        vectors = self.embedder(**batch).float().cpu().numpy()
        return vectors, [int(t) for t in tokens]

    def _answer(self, vectors: np.ndarray, tokens: list[int]) -> dict[str, Any]:
        return {"vectors": vectors, "tokens": tokens, "model": self.info_doc}


def _json(status: int, body: dict[str, Any], model: dict[str, Any] | None = None) -> JSONResponse:
    headers = {}
    if model is not None:
        headers["x-rzenembed-version"] = str(model.get("version"))
        headers["x-rzenembed-digest"] = str(model.get("digest"))
    return JSONResponse(body, status_code=status, headers=headers)


@serve.ingress(http)
class EmbeddingsAPI:
    """The HTTP front: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /healthz``."""

    def __init__(
        self, model: Any, settings: dict[str, Any], roots: list[str], endpoint_url: str | None
    ):
        self.model = model
        self.settings = ServeConfig(**settings)
        self.reader = protocol.MediaReader(roots, endpoint_url)

    async def _model_info(self) -> dict[str, Any]:
        return await self.model.info.remote()

    @http.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        try:
            data = protocol.parse_body(await request.body(), self.settings.limits)
            parsed = await asyncio.to_thread(
                protocol.parse_request, data, self.settings.limits, self.reader
            )
        except protocol.RequestError as exc:
            return _json(exc.status, exc.body())
        size = self.settings.max_batch_size
        calls = [self.model.embed.remote(c) for c in protocol.chunks(parsed.items, size)]
        try:
            answers = await asyncio.gather(*calls)
        except Exception as exc:
            error = protocol.RequestError(f"embedding failed: {type(exc).__name__}", None, 500)
            log.exception("embedding failed")
            return _json(500, error.body())
        failures = [a["error"] for a in answers if "error" in a]
        if failures:  # the whole request fails, with the reason; other requests do not
            return _json(400, protocol.RequestError(failures[0], "input").body())
        # A rollout may answer one request's chunks from two versions: never mix them.
        digests = {a["model"]["digest"] for a in answers}
        if len(digests) > 1:
            return await self.embeddings(request)
        model = answers[0]["model"]
        try:
            protocol.check_model_name(parsed.model, model)
            vectors = np.concatenate([a["vectors"] for a in answers])
            tokens = [t for a in answers for t in a["tokens"]]
            body = protocol.embeddings_response(vectors, tokens, parsed, model)
        except protocol.RequestError as exc:
            return _json(exc.status, exc.body(), model)
        return _json(200, body, model)

    @http.get("/v1/models")
    async def models(self) -> JSONResponse:
        model = await self._model_info()
        return _json(200, protocol.models_listing(model), model)

    @http.get("/healthz")
    async def healthz(self) -> JSONResponse:
        model = await self._model_info()
        return _json(200, {"status": "ok", "model": model}, model)


def model_deployment(cfg: ServeConfig) -> Any:
    """``EmbeddingModel`` as a Serve deployment with the configured resources, batching
    and scaling; new versions roll out new replicas first."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # Enough calls in flight to fill a batch several times over: a replica must never
        # make the router queue calls that would have joined the next batch.
        "max_ongoing_requests": max(4 * cfg.max_batch_size, 32),
        # Calls from the HTTP front are internal: no per-call access log line.
        "logging_config": {"enable_access_log": False},
        "max_surge_percent": 100,
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 60.0,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.replicas
    return serve.deployment(EmbeddingModel, name="EmbeddingModel", **options)


def build_app(cfg: PipelineConfig, served: ServedModel) -> Any:
    """The application for ``served``: the model replicas behind the HTTP front."""
    settings = cfg.serve
    model = model_deployment(settings).bind(
        served.to_json(), settings.dtype, settings.max_batch_size, settings.batch_wait_timeout_s
    )
    api = serve.deployment(
        EmbeddingsAPI,
        name="EmbeddingsAPI",
        num_replicas=settings.api_replicas,
        ray_actor_options={"num_cpus": settings.api_num_cpus},
        max_ongoing_requests=256,
    )
    roots = [cfg.storage.root, *settings.media_roots]
    return api.bind(model, settings.model_dump(mode="json"), roots, cfg.storage.endpoint_url)


def start_serve(cfg: ServeConfig) -> None:
    """Serve's HTTP proxy on ``host:port`` (only the first start on a cluster sets it)."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})


def deploy(cfg: PipelineConfig, served: ServedModel) -> float:
    """Deploy (or roll to) ``served``; returns when its replicas serve traffic. Seconds."""
    started = time.monotonic()
    start_serve(cfg.serve)
    serve.run(
        build_app(cfg, served),
        name=cfg.serve.app_name,
        route_prefix=cfg.serve.route_prefix,
        blocking=False,
    )
    return time.monotonic() - started
