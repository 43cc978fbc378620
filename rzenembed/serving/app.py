"""The Ray Serve application: an HTTP front and the model replicas.

``EmbeddingsAPI`` (CPU) owns the HTTP contract: it validates requests, decodes media and
shapes responses (``protocol.py``); it never loads the model, and this module imports no
torch (the front's replicas load it to find the class: torch alone is about 3 CPU-seconds
and a few hundred MB per replica start). ``EmbeddingModel`` replicas
(one GPU each on a cluster) hold the embedder and batch items across concurrent requests
with ``@serve.batch``, counted in items, not requests. Each replica answers with the
version and digest it loaded, so a response always names the model that produced it, also
while a rollout runs.

New model content is a new ``EmbeddingModel`` deployment version: Serve starts the new
replicas first (``serve.max_surge_percent``, 100 by default), sends traffic to them once
they are healthy and then drains the old ones, so no request is dropped (``deploy``;
``follow.py`` calls it when the alias moves). The HTTP front's version names its own
settings only, so a model rollout leaves it running; a version with the same content as
the one served only renames the running model replicas.
"""

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from rzenembed.compact import (
    CALIBRATED,
    PRECISIONS,
    Calibration,
    offered,
    read_calibration,
    trained_dimensions,
)
from rzenembed.config import PipelineConfig, ServeConfig, digest_of
from rzenembed.data.folders import stage_folder
from rzenembed.identity import source_digest
from rzenembed.modeling.card import ModelCard
from rzenembed.modeling.inputs import EmbedInput
from rzenembed.serving import protocol
from rzenembed.serving.auth import KeysFileError, KeyStore, keys_file, read_hashes
from rzenembed.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from rzenembed.serving.metrics import PUSH_EVERY_S, EndpointMetrics, MetricsBoard
from rzenembed.serving.source import ServedModel, local_model_folder, model_config_for

log = logging.getLogger(__name__)

http = FastAPI(title="rzenembed embeddings", docs_url=None, redoc_url=None)


class EmbeddingModel:
    """One model replica: loads ``served`` and embeds batches of items.

    What it loads (the content: digest, folder, dtype, batching) is fixed for the replica's
    life; what it is called (registry name, version, URI, deployment key) arrives as Serve's
    ``user_config`` and can change in place (``reconfigure``): an alias moved to another
    version of the same content renames the running replicas instead of restarting them.
    """

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
        # int8/uint8 ranges calibrated at registration; the HTTP front asks for them once
        # per model digest (``calibration``), never with each answer.
        self.calibration = read_calibration(folder, self.served.endpoint_url)
        card = ModelCard.load(stage_folder(folder, self.served.endpoint_url))  # staged above
        self.info_doc = {
            "name": self.served.name,
            "version": self.served.version,
            "digest": self.served.digest,
            "uri": self.served.uri,
            "dimensions": self.embedder.embedding_dim,
            "trained_dimensions": trained_dimensions(card.extra),
            "precisions": offered(PRECISIONS, self.calibration),
            "calibrated_dimensions": self.calibration.dimensions if self.calibration else [],
            "template": self.embedder.cfg.template,
            "family": self.embedder.family.family,
            "dtype": self.embedder.cfg.dtype,
            "device": str(device),
            "node": _node_id(),
            "load_s": round(time.monotonic() - started, 3),
            "deployment": "",
        }
        log.info("serving %s (digest %s) on %s", self.served.label, self.served.digest[:12], device)

    def reconfigure(self, label: dict[str, Any]) -> None:
        """The registry name, version and URI this content is served as, and the deployment
        key (Serve calls it after ``__init__`` and whenever only these change). A new dict:
        answers already built keep the label they were made with."""
        self.info_doc = {**self.info_doc, **label}

    async def info(self) -> dict[str, Any]:
        return self.info_doc

    async def calibration_for(self, digest: str) -> dict[str, Any] | None:
        """This replica's int8/uint8 ranges when it serves ``digest`` (None when it has
        none); a replica of another content (mid-rollout) raises ``LookupError``."""
        if digest != self.served.digest:
            raise LookupError(f"this replica serves {self.served.digest[:12]}, not {digest[:12]}")
        return None if self.calibration is None else self.calibration.to_json()

    async def embed(self, items: list[EmbedInput]) -> dict[str, Any]:
        """Vectors (float32) and token counts for one request's items, batched with other
        requests' items; ``{"error": ...}`` when these items (and only these) failed."""
        return await self._batched(items)

    @serve.batch(batch_size_fn=lambda calls: sum(len(c) for c in calls))
    async def _batched(self, calls: list[list[EmbedInput]]) -> list[Any]:
        return await asyncio.to_thread(self._embed_calls, calls)

    def _embed_calls(self, calls: list[list[EmbedInput]]) -> list[Any]:
        """One forward pass for the batch. When it fails, each call is only *prepared* (the
        processor: where a client's input can be at fault) to find the calls at fault,
        which fail alone as input errors; the others run again in one pass, and if that
        fails too the model is at fault: they fail as model errors (retryable when it ran
        out of memory), never re-run one call at a time."""
        try:
            return self._split(calls, *self._forward(self._flat(calls)))
        except Exception as first:
            log.warning(
                "a batch of %d calls failed (%s): finding the input at fault",
                len(calls),
                type(first).__name__,
            )
        faults = {i: self._input_fault(call) for i, call in enumerate(calls)}
        good = [call for i, call in enumerate(calls) if faults[i] is None]
        answers: list[Any] = []
        try:
            answers = self._split(good, *self._forward(self._flat(good))) if good else []
        except Exception as exc:
            log.exception("the model failed on a batch of valid input")
            answers = [model_failure(exc)] * len(good)
        served = iter(answers)
        return [faults[i] or next(served) for i in range(len(calls))]

    @staticmethod
    def _flat(calls: list[list[EmbedInput]]) -> list[EmbedInput]:
        return [item for call in calls for item in call]

    def _split(
        self, calls, vectors: np.ndarray, tokens: list[int], forward_s: float
    ) -> list[dict[str, Any]]:
        out, start = [], 0
        for call in calls:
            end = start + len(call)
            answer = self._answer(vectors[start:end], tokens[start:end])
            answer["batch_items"] = len(tokens)  # the batch this call was embedded in
            answer["forward_s"] = forward_s  # its processor and forward pass
            out.append(answer)
            start = end
        return out

    def _input_fault(self, call: list[EmbedInput]) -> dict[str, Any] | None:
        try:
            self.embedder.prepare(call)
        except Exception as exc:
            log.warning("input could not be prepared: %s", exc)
            reason = f"{type(exc).__name__}: {exc}"[:300]  # the client's own input: say why
            return {"error": f"the input could not be prepared: {reason}", "kind": "input"}
        return None

    def _forward(self, items: list[EmbedInput]) -> tuple[np.ndarray, list[int], float]:
        """Vectors, token counts and seconds taken for one batch."""
        import torch  # loaded by the model already; this module's front replicas never do

        started = time.monotonic()
        with torch.inference_mode():
            batch = self.embedder.prepare(items)
            tokens = batch["attention_mask"].sum(dim=1).tolist()
            vectors = self.embedder(**batch).float().cpu().numpy()
        return vectors, [int(t) for t in tokens], time.monotonic() - started

    def _answer(self, vectors: np.ndarray, tokens: list[int]) -> dict[str, Any]:
        return {"vectors": vectors, "tokens": tokens, "model": self.info_doc}


def model_failure(exc: BaseException) -> dict[str, Any]:
    """A replica-side failure as the front answers it: no internal text; out of memory is
    worth a retry (503), anything else is the server's fault (500)."""
    import torch  # called on the model's replica, where torch is loaded

    text = f"{type(exc).__name__}: {exc}"
    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower()
    return {"error": "the model failed on this request", "kind": "model", "retry": oom}


def _node_id() -> str | None:
    """The Ray node this replica runs on (``ray list nodes`` names it)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _busy(limit: int) -> JSONResponse:
    """429 with ``Retry-After``: this front holds ``limit`` requests already."""
    error = protocol.RequestError(
        f"the endpoint is busy ({limit} requests in progress on this replica); retry shortly",
        None,
        429,
    )
    return JSONResponse(error.body(), status_code=429, headers={"retry-after": "1"})


def _json(status: int, body: dict[str, Any], model: dict[str, Any] | None = None) -> JSONResponse:
    headers = {}
    if model is not None:
        headers["x-rzenembed-version"] = str(model.get("version"))
        headers["x-rzenembed-digest"] = str(model.get("digest"))
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk and refused (413) as soon as it passes
    ``limit``: a client cannot make the server hold more than the limit (a declared
    Content-Length over it is refused before anything is read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise protocol.RequestError(
            f"request body is {declared} bytes, more than the {limit} allowed", None, 413
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise protocol.RequestError(
                f"request body is more than the {limit} bytes allowed", None, 413
            )
    return bytes(body)


@serve.ingress(http)
class EmbeddingsAPI:
    """The HTTP front: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /metrics``,
    ``GET /health`` (process), ``GET /ready`` (a model replica answers; ``/healthz`` too)."""

    def __init__(
        self,
        model: Any,
        board: Any,
        settings: dict[str, Any],
        roots: list[str],
        endpoint_url: str | None,
        key_hashes: list[str] | None = None,
    ):
        self.model = model
        self.board = board  # MetricsBoard: /metrics sums every HTTP replica
        self._push_pending = False
        self._push_task: asyncio.Task | None = None
        self.settings = ServeConfig(**settings)
        self.keys = None if key_hashes is None else KeyStore(key_hashes)
        self.reader = protocol.LocationReader(
            roots, endpoint_url, enabled=self.settings.allow_locations
        )
        self._known: dict[str, Any] | None = None  # the model info last answered with
        self._calibrations: dict[str, Calibration | None] = {}  # by model digest
        self.in_flight = 0  # requests this replica holds now (one event loop: no lock)
        self.replica = uuid.uuid4().hex[:12]  # which HTTP replica answered (for rollouts)
        self.metrics = EndpointMetrics()

    async def _model_info(self) -> dict[str, Any]:
        return await self.model.info.remote()

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 in OpenAI's shape when keys are on and the request carries none of them."""
        if self.keys is None or self.keys.allows(request.headers.get("authorization")):
            return None
        body = {
            "error": {
                "message": "missing or invalid API key (Authorization: Bearer <key>)",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        return JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})

    @http.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        started = time.monotonic()
        if (refused := self._refused(request)) is not None:
            response = refused
        elif self.in_flight >= self.settings.max_queued_requests:  # back-pressure, no queue
            response = _busy(self.settings.max_queued_requests)
        else:
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            request_id = f"req-{uuid.uuid4().hex[:16]}"
            try:
                response = await self._embeddings(request, request_id)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
            response.headers["x-rzenembed-request-id"] = request_id
        self.metrics.answered("/v1/embeddings", response.status_code, time.monotonic() - started)
        self._schedule_push()
        return response

    async def _calibration(self, digest: str) -> Calibration | None:
        """The int8/uint8 ranges of the model with ``digest``, asked of a replica once."""
        if digest not in self._calibrations:
            try:
                found = await self.model.calibration_for.remote(digest)
            except Exception:  # mid-rollout: a replica of the other content answered
                raise protocol.RequestError(
                    "a rollout is in progress; retry the request", None, 503
                ) from None
            self._calibrations[digest] = None if found is None else Calibration.from_json(found)
        return self._calibrations[digest]

    def _schedule_push(self) -> None:
        """Send this replica's counters to the board within ``PUSH_EVERY_S`` (one send
        for every burst of requests, and one after the last of them)."""
        if not self._push_pending:
            self._push_pending = True
            # Held: the event loop keeps only a weak reference to a task.
            self._push_task = asyncio.get_running_loop().create_task(self._push_later())

    async def _push_later(self) -> None:
        await asyncio.sleep(PUSH_EVERY_S)
        self._push_pending = False
        try:
            await self._push()
        except Exception as exc:  # the board restarting: the next push sends everything
            log.warning("could not send metrics to the board: %s", exc)

    async def _push(self) -> None:
        await self.board.put.remote(self.replica, self.metrics.snapshot())

    async def _embeddings(self, request: Request, request_id: str) -> JSONResponse:
        limits = self.settings.limits
        try:
            body = await read_body(request, limits.max_request_bytes)
            decoding = time.monotonic()
            # Parsing and decoding run off the event loop: other requests keep moving.
            data = await asyncio.to_thread(protocol.parse_body, body, limits)
            parsed = await asyncio.to_thread(protocol.parse_request, data, limits, self.reader)
            decode_s = time.monotonic() - decoding
        except protocol.RequestError as exc:
            return _json(exc.status, exc.body())
        try:  # a name the endpoint does not serve costs no embedding
            known = self._known or await self._model_info()
            protocol.check_model_name(parsed.model, known, any_version=True)
            protocol.check_precision(parsed, known)
            embedding = time.monotonic()
            answers = await asyncio.wait_for(
                self._embed(parsed.items, request_id), self.settings.request_timeout_s
            )
            embed_s = time.monotonic() - embedding
            model = answers[0]["model"]
            self._known = model
            # A request pinned to one version gets that version's vectors or a 404, even
            # right after a rollout: the version that answered decides, not a cache.
            protocol.check_model_name(parsed.model, model)
            vectors = np.concatenate([a["vectors"] for a in answers])
            tokens = [t for a in answers for t in a["tokens"]]
            calibration = None
            if parsed.precision in CALIBRATED:
                calibration = await self._calibration(model["digest"])
            body = await asyncio.to_thread(
                protocol.embeddings_response, vectors, tokens, parsed, model, calibration
            )
            batches = [a.get("batch_items", 0) for a in answers]
            self.metrics.embedded(len(parsed.items), sum(tokens), batches)
            # The model's share: the forward passes of the batches the request's chunks
            # joined (summed: one replica runs them one after another; with several
            # replicas side by side this overstates it); the rest of the wait is queueing
            # (for a batch to form, a free replica, Ray calls).
            model_s = sum(a.get("forward_s", 0.0) for a in answers)
            self.metrics.stages(decode_s, max(embed_s - model_s, 0.0), model_s)
            self.metrics.serving(str(model.get("version")), str(model.get("digest")))
        except TimeoutError:
            timeout = self.settings.request_timeout_s
            error = protocol.RequestError(
                f"the request did not finish within {timeout:g} s (request id {request_id})",
                None,
                504,
            )
            return _json(504, error.body(), self._known)
        except protocol.RequestError as exc:
            return _json(exc.status, exc.body(), self._known)
        return _json(200, body, model)

    async def _embed(self, items: list[EmbedInput], request_id: str) -> list[dict[str, Any]]:
        """The replicas' answers for ``items`` in chunks of ``max_batch_size``, all from one
        model version. A replica-side failure is answered 503 (retry: a replica that went
        away, memory that ran out) or 500, with the request id and no internal text (the
        log has it, under that id)."""
        chunks = protocol.chunks(items, self.settings.max_batch_size)
        for _ in range(3):
            try:
                answers = await asyncio.gather(*(self.model.embed.remote(c) for c in chunks))
            except Exception:
                log.exception("embedding failed (%s)", request_id)
                raise protocol.RequestError(
                    f"the model could not be reached; retry (request id {request_id})", None, 503
                ) from None
            failures = [a for a in answers if "error" in a]
            inputs = [a for a in failures if a.get("kind") == "input"]
            if inputs:  # the request's own items: it fails alone, other requests do not
                raise protocol.RequestError(inputs[0]["error"], "input")
            if failures:
                status = 503 if any(a.get("retry") for a in failures) else 500
                log.error("model failure on %s: %s", request_id, failures[0])
                raise protocol.RequestError(
                    f"{failures[0]['error']} (request id {request_id})", None, status
                )
            # During a rollout one request's chunks may meet two versions: never mix them.
            if len({a["model"]["digest"] for a in answers}) == 1:
                return answers
        raise protocol.RequestError("a rollout is in progress; retry the request", None, 503)

    @http.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        model = await self._model_info()
        return _json(200, protocol.models_listing(model), model)

    @http.get("/metrics")
    async def metrics_text(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        await self._push()  # this replica's latest; the others' are at most PUSH_EVERY_S old
        return Response(await self.board.text.remote(), media_type=METRICS_CONTENT_TYPE)

    @http.get("/health")
    async def health(self) -> JSONResponse:
        """The HTTP replica is up (a liveness probe; asks nothing of the model)."""
        return _json(200, {"status": "ok", "replica": self.replica})

    @http.get("/ready")
    async def ready(self) -> JSONResponse:
        """A model replica answered within ``serve.ready_timeout_s`` (a readiness probe)."""
        try:
            model = await asyncio.wait_for(self._model_info(), self.settings.ready_timeout_s)
        except Exception as exc:  # no replica, a dead one, or one too slow to answer
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            return _json(503, {"status": "unavailable", "reason": f"model replica: {reason}"})
        return _json(200, {"status": "ok", "model": model}, model)

    @http.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """``/ready`` under its older name."""
        return await self.ready()


@functools.cache
def code_version() -> str:
    """Digest of the library's source: replicas restart when the code they run changed."""
    return source_digest(Path(__file__).resolve().parents[2], ("rzenembed",))


def model_deployment(cfg: ServeConfig) -> Any:
    """``EmbeddingModel`` as a Serve deployment with the configured resources, batching
    and scaling; new versions roll out new replicas first."""
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            "resources": dict(cfg.resources),
        },
        # Enough calls in flight to fill a batch several times over: a replica must never
        # make the router queue calls that would have joined the next batch.
        "max_ongoing_requests": max(4 * cfg.max_batch_size, 32),
        # Calls from the HTTP front are internal: no per-call access log line.
        "logging_config": {"enable_access_log": False},
        "max_surge_percent": cfg.max_surge_percent,
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 60.0,
        # A replica that cannot load its model fails the rollout after 3 tries (reported,
        # and the old replicas serve on) instead of retrying for minutes.
        "max_constructor_retry_count": 3,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.replicas
    return serve.deployment(EmbeddingModel, name="EmbeddingModel", **options)


def deployment_key(cfg: PipelineConfig, served: ServedModel) -> str:
    """What a deployed application is: the model, every serving setting, the storage root
    and the code. Deploying the same key again (a restarted follower) changes nothing."""
    parts = [served.to_json(), cfg.serve.model_dump(mode="json"), cfg.storage.model_dump()]
    return digest_of([*parts, code_version()])[:16]


def running_key(app: str) -> str | None:
    """The deployment key the application's model replicas report, or None (no such
    application, or it does not answer within a few seconds)."""
    try:
        handle = serve.get_deployment_handle("EmbeddingModel", app_name=app)
        return handle.info.remote().result(timeout_s=10).get("deployment")
    except Exception:
        return None


def _is_running(app: str) -> bool:
    """RUNNING: no rollout in progress or failed (a failed one keeps the old replicas
    serving, but its broken version would be what Serve starts next)."""
    from ray.serve.schema import ApplicationStatus

    status = serve.status().applications.get(app)
    return status is not None and status.status == ApplicationStatus.RUNNING


def versioned(deployment: Any, parts: list[Any]) -> Any:
    """``deployment`` with a version that is the digest of ``parts`` and of the code.

    Serve restarts a deployment's replicas only when its version changes (other changes,
    such as ``user_config`` or the replica count, are applied to the running replicas); with
    no version given it draws a random one at every deploy and restarts everything, the HTTP
    front included. The public options no longer take a version, so it is set through the
    same internal option Serve's own config deploys use (pinned Ray; test_serving checks
    that a rollout leaves the front's replicas and a same-content move every replica alive).
    """
    version = digest_of([*parts, code_version()])[:16]
    return deployment.options(version=version, _internal=True)


def model_label(served: ServedModel, key: str) -> dict[str, Any]:
    """What the model replicas are called (``EmbeddingModel.reconfigure``)."""
    return {"name": served.name, "version": served.version, "uri": served.uri, "deployment": key}


def build_app(cfg: PipelineConfig, served: ServedModel, key: str) -> Any:
    """The application for ``served`` (its ``deployment_key``): the model replicas behind
    the HTTP front.

    Each deployment is versioned by what its replicas load: the model replicas by the
    model's content and the settings they load it with (a new version label alone is a
    ``user_config`` change, applied in place), the HTTP front by its own settings only (a
    new model leaves it running; see ``versioned``)."""
    settings = cfg.serve
    roots = [cfg.storage.root, *settings.media_roots]
    hashes = key_hashes(settings)
    api_args = (settings.model_dump(mode="json"), roots, cfg.storage.endpoint_url, hashes)
    # The label travels as user_config; where to load the content from (a folder, an
    # MLflow model id) does not make another version: any copy of the content will do.
    loads = dataclasses.replace(served, version=None, uri="")
    batching = (settings.dtype, settings.max_batch_size, settings.batch_wait_timeout_s)
    content = [served.digest, served.endpoint_url, *batching]
    model = versioned(model_deployment(settings), content).options(
        user_config=model_label(served, key)
    )
    model_args = (loads.to_json(), *batching)
    api = serve.deployment(
        EmbeddingsAPI,
        name="EmbeddingsAPI",
        num_replicas=settings.api_replicas,
        ray_actor_options={
            "num_cpus": settings.api_num_cpus,
            "resources": dict(settings.api_resources),
        },
        # Room beyond the queue limit, so that excess requests reach the handler and get a
        # 429 instead of waiting in Serve's own queue.
        max_ongoing_requests=settings.max_queued_requests + 32,
        max_surge_percent=settings.max_surge_percent,
        graceful_shutdown_timeout_s=settings.request_timeout_s + 5,
    )
    board = serve.deployment(
        MetricsBoard, name="MetricsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0}
    )
    return versioned(api, list(api_args)).bind(
        model.bind(*model_args), versioned(board, []).bind(), *api_args
    )


def key_hashes(cfg: ServeConfig) -> list[str] | None:
    """The API key hashes the HTTP front checks (None: ``serve.auth: none``), read here from
    the keys file and sent with the deployment (its replicas may run on any node)."""
    if cfg.auth == "none":
        return None
    path = keys_file(cfg.api_keys_file)
    if not path:
        raise KeysFileError(
            "serve.auth is 'keys' but no keys file is set: make one with `rzenembed api-key "
            "new FILE` and set serve.api_keys_file (or RZENEMBED_API_KEYS_FILE); on a closed "
            "network only, serve.auth: none turns keys off"
        )
    return read_hashes(path)


def start_serve(cfg: ServeConfig) -> None:
    """Serve's HTTP proxy on ``host:port`` (only the first start on a cluster sets it)."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})


STATUS_SETTLE_S = 3.0  # how long the controller may take to show a new target's status


class RolloutError(RuntimeError):
    """A deployment that failed, or did not serve within ``serve.rollout_timeout_s`` (the
    previous version, if any, keeps serving)."""


def deploy(cfg: PipelineConfig, served: ServedModel) -> float:
    """Deploy (or roll to) ``served``; returns the seconds until the application served
    with it. Raises ``RolloutError`` when it failed or timed out."""
    started = time.monotonic()
    start_serve(cfg.serve)
    key = deployment_key(cfg, served)
    if _is_running(cfg.serve.app_name) and running_key(cfg.serve.app_name) == key:
        log.info("%s already serves %s with these settings", cfg.serve.app_name, served.label)
        return 0.0
    target = serve.RunTarget(
        build_app(cfg, served, key), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix
    )
    serve.run_many([target], wait_for_applications_running=False)
    wait_until_running(cfg.serve.app_name, cfg.serve.rollout_timeout_s, key)
    return time.monotonic() - started


def wait_until_running(
    app: str, timeout_s: float, key: str | None = None, report_every_s: float = 30.0
) -> None:
    """Block until ``app`` is RUNNING (and its model replicas report ``key``: the status
    read right after a deploy may still be the old version's); say what it waits for every
    ``report_every_s`` (new replicas that cannot be placed show up here: the cluster has no
    room for them)."""
    from ray.serve.schema import ApplicationStatus

    started = last_report = time.monotonic()
    while True:
        status = serve.status().applications.get(app)
        state = None if status is None else status.status
        waited = time.monotonic() - started
        if state == ApplicationStatus.RUNNING and (key is None or running_key(app) == key):
            return
        # The first reads may still show a previous rollout's failure.
        if state == ApplicationStatus.DEPLOY_FAILED and waited > STATUS_SETTLE_S:
            raise RolloutError(f"deploying {app} failed: {status.message}")
        messages = (
            []
            if status is None
            else [
                f"{name}: {d.status} {d.message}".strip()
                for name, d in status.deployments.items()
                if d.status != "HEALTHY"
            ]
        )
        if waited > timeout_s:
            raise RolloutError(
                f"{app} did not serve the new version within {timeout_s:g} s "
                f"(serve.rollout_timeout_s): {'; '.join(messages) or 'no status'}"
            )
        if time.monotonic() - last_report > report_every_s:
            log.info("rollout of %s: waiting %.0f s; %s", app, waited, "; ".join(messages))
            last_report = time.monotonic()
        time.sleep(0.2)
