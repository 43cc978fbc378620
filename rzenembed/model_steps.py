"""The model steps outside training, as Ray work: merge, soup, evaluation.

The Prefect worker is a light coordinator on a CPU pod; it never loads a model. Each step
here runs as a Ray task that requests the configured resources (``compute.step_gpus``,
default one GPU when ``compute.use_gpu``; ``compute.step_cpus``), stages its inputs from
the storage root, computes on the device the runtime picks inside the task, publishes its
outputs to the storage root and returns small JSON-able results (URIs, digests, scores).
Evaluation embeds with ``compute.eval_actors`` actors (one GPU each) that receive raw
sides in full ``eval.batch_size`` batches and decode their media themselves, while a
coordinator task, which decodes nothing, ranks and writes the reports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rzenembed.cluster import ensure_compute_for
from rzenembed.config import PipelineConfig
from rzenembed.data.folders import is_published, publish_folder, stage_folder
from rzenembed.data.storage import is_remote, join
from rzenembed.modeling.inputs import EmbedInput

logger = logging.getLogger(__name__)
# Calls in flight per evaluation actor: one embedding, one decoding the next batch.
EVAL_CALLS_PER_ACTOR = 2
REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "png": "report.png",
    "leaderboard": "leaderboard.json",
}


def step_gpus(cfg: PipelineConfig) -> float:
    compute = cfg.compute
    if compute.step_gpus is not None:
        return compute.step_gpus
    return 1.0 if compute.use_gpu else 0.0


def submit_on_ray(
    cfg: PipelineConfig,
    fn: Callable[..., Any],
    *args: Any,
    gpus: float | None = None,
    cpus: float | None = None,
    **kwargs: Any,
) -> Any:
    """Start ``fn(*args, **kwargs)`` as a Ray task with the step's resources; its ref."""
    import ray

    from rzenembed.data.engine import ensure_ray

    ensure_ray(address=cfg.compute.ray_address)
    options = {
        "num_gpus": step_gpus(cfg) if gpus is None else gpus,
        "num_cpus": cfg.compute.step_cpus if cpus is None else cpus,
        "max_retries": 0,
    }
    bundle = {"GPU": options["num_gpus"], "CPU": options["num_cpus"]}
    ensure_compute_for(cfg.compute, f"the {getattr(fn, '__name__', 'step')} task", 1, bundle)
    return ray.remote(fn).options(**options).remote(*args, **kwargs)


def on_ray(cfg: PipelineConfig, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``submit_on_ray``, waited for (a progress line every minute, cancelled after
    ``compute.step_timeout_s``): the task's result."""
    from rzenembed.cluster import wait_for

    name = getattr(fn, "__name__", "step").strip("_")
    return wait_for(submit_on_ray(cfg, fn, *args, **kwargs), name, cfg.compute.step_timeout_s)


# --------------------------------------------------------------------------- merge


def merge_step(cfg: PipelineConfig, adapter_uri: str) -> str:
    """The stage-1 merge (``training.stages.merge_stage1``) on Ray; the merged model's URI."""
    from rzenembed.training.stages import merge_stage1

    return on_ray(cfg, merge_stage1, cfg, adapter_uri)


# --------------------------------------------------------------------------- soup


def _soup_task(cfg: PipelineConfig, adapters: list[str], out_uri: str, weights, eval_sets):
    from rzenembed.modeling.digest import digests_of
    from rzenembed.runtime import task_runtime
    from rzenembed.soup import soup

    endpoint = cfg.storage.endpoint_url
    runtime = task_runtime(cfg.model, cfg.compute)
    score = None
    if cfg.soup.method == "greedy":
        sets = [str(stage_eval_set(s, endpoint)) for s in eval_sets]

        def score(embedder) -> float:
            from rzenembed.evaluation import evaluate

            results = evaluate(
                embedder,
                sets,
                batch_size=cfg.eval.batch_size,
                datasets=cfg.eval.datasets,
                ndcg_k=cfg.eval.ndcg_k,
            )
            return sum(r.score for r in results) / len(results)

    work = Path(tempfile.mkdtemp(prefix="rzenembed-soup-"))
    try:
        result = soup(
            adapters,
            work / "soup",
            cfg.soup.method,
            weights,
            cfg.soup.normalize,
            score,
            device=runtime.device,
            endpoint_url=endpoint,
        )
        digests = digests_of(result.path)
        publish_folder(result.path, out_uri, endpoint, **digests)
        return {"recipe": result.recipe, **digests}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def soup_step(
    cfg: PipelineConfig,
    adapters: list[str],
    out_uri: str,
    weights: list[float] | None,
    eval_sets: Sequence[str] = (),
) -> dict[str, Any]:
    """The adapters souped and published at ``out_uri`` (or the published soup read back):
    ``{"recipe", "digest", "weights_digest"}``."""
    from rzenembed.data.folders import published_info

    endpoint = cfg.storage.endpoint_url
    if is_published(out_uri, endpoint):
        info = published_info(out_uri, endpoint) or {}
        card = json.loads((stage_folder(out_uri, endpoint) / "rzenembed.json").read_text())
        return {
            "recipe": card["extra"]["soup"],
            "digest": info["digest"],
            "weights_digest": info["weights_digest"],
        }
    return on_ray(cfg, _soup_task, cfg, list(adapters), out_uri, weights, list(eval_sets))


# --------------------------------------------------------------------------- evaluation


def stage_eval_set(uri: str, endpoint_url: str | None) -> Path:
    """A local copy of an evaluation set folder (a remote one is staged once)."""
    return stage_folder(uri, endpoint_url) if is_remote(uri) else Path(uri)


class EmbedActor:
    """One model on one device (the GPU Ray gave the actor), embedding what it is sent.

    ``encode_sides`` takes raw evaluation sides and decodes their media here (one
    ``MediaReader`` per media root), so the coordinator never touches a picture. Run with
    Ray's ``max_concurrency`` above one, a call decodes its batch while the previous one
    embeds; the model lock lets one batch at a time onto the device."""

    def __init__(self, cfg: PipelineConfig, model_uri: str):
        from rzenembed.modeling import ModelCard, RzenEmbedder
        from rzenembed.runtime import task_runtime

        runtime = task_runtime(cfg.model, cfg.compute)
        folder = stage_folder(model_uri, cfg.storage.endpoint_url)
        config = None if ModelCard.exists(folder) else cfg.model
        self.embedder = RzenEmbedder.from_pretrained(folder, config=config, device=runtime.device)
        self.runtime = runtime
        self.endpoint_url = cfg.storage.endpoint_url
        self.readers: dict[str, Any] = {}  # media root -> MediaReader
        self.staged_sets: dict[str, Path] = {}  # eval set URI -> its copy on this node
        self.model_lock = threading.Lock()
        self.call_sizes: Counter[int] = Counter()  # sides per encode_sides call
        self.media_decoded = 0  # images and videos this actor decoded

    def encode(self, items: list[EmbedInput], batch_size: int = 16) -> torch.Tensor:
        with self.model_lock, self.runtime.autocast():
            return self.embedder.encode(items, batch_size=batch_size)

    def encode_sides(
        self,
        sides: list[dict[str, Any]],
        media_root: str,
        max_frames: int,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
        set_uri: str | None = None,
    ) -> torch.Tensor:
        """``sides`` decoded here and embedded ``batch_size`` at a time (a pool sends one
        batch per call; in process this bounds the decoded pictures held at once). With
        ``set_uri`` (a remote evaluation set), ``media_root`` is relative to that set,
        staged on this node once."""
        from rzenembed.training.collate import to_input

        reader = self._reader(self._media_root(media_root, set_uri))
        parts = []
        for start in range(0, len(sides), batch_size):
            inputs = [to_input(s, reader, max_frames) for s in sides[start : start + batch_size]]
            parts.append(self._embed_decoded(inputs, batch_size))
            if progress is not None:
                progress(len(inputs))
        with self.model_lock:
            self.call_sizes[len(sides)] += 1
        return torch.cat(parts) if parts else torch.empty(0, 0)

    def _embed_decoded(self, inputs: list[EmbedInput], batch_size: int) -> torch.Tensor:
        with self.model_lock, self.runtime.autocast():
            self.media_decoded += sum(len(i.images) + (i.video is not None) for i in inputs)
            return self.embedder.encode(inputs, batch_size=batch_size)

    def _media_root(self, media_root: str, set_uri: str | None) -> str:
        """Where ``media_root`` is on this node: the coordinator's copy of a remote set is
        on its own node, so a remote set is staged here (once per node and content)."""
        if set_uri is None:
            return media_root
        if set_uri not in self.staged_sets:
            self.staged_sets[set_uri] = stage_eval_set(set_uri, self.endpoint_url)
        return str((self.staged_sets[set_uri] / media_root).resolve())

    def _reader(self, media_root: str):
        """This actor's reader of ``media_root``: filesystems opened once per root."""
        from rzenembed.training.collate import MediaReader

        if media_root not in self.readers:
            self.readers[media_root] = MediaReader(media_root, self.endpoint_url)
        return self.readers[media_root]

    def describe(self) -> dict[str, Any]:
        """Where this actor embeds: its device, the autocast dtype, its weights' dtype."""
        autocast = self.runtime.autocast_dtype
        return {
            "device": str(self.runtime.device),
            "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
            "weights": str(self.embedder.hf_model.dtype).removeprefix("torch."),
        }

    def work(self) -> dict[str, Any]:
        """What this actor did: calls by size (``{"64": 1500, "17": 2}``: every call of a
        dataset side but its last is full), sides embedded, images and videos decoded."""
        with self.model_lock:
            sizes = dict(sorted(self.call_sizes.items()))
            return {
                "call_sizes": {str(k): v for k, v in sizes.items()},
                "sides": sum(k * v for k, v in sizes.items()),
                "media_decoded": self.media_decoded,
            }


def _media_source(media_root: str, staged: dict[str, str]) -> tuple[str | None, str]:
    """``(set URI, media root relative to the set)`` when ``media_root`` lies in the local
    copy of a remote set (``staged``: local folder -> set URI), else ``(None, media_root)``:
    a local root reads the same from every node."""
    for local, uri in staged.items():
        relative = os.path.relpath(media_root, Path(local).resolve())
        if not relative.startswith(".."):
            return uri, relative
    return None, media_root


def _side_length(side: dict[str, Any]) -> tuple[int, int]:
    """A cheap length key of a raw side (media count, then characters), so that a pool's
    batches hold sides of similar length and pad little, as ``encode`` sorts them."""
    chars = len(side.get("text") or "") + len(side.get("instruction") or "")
    return len(side.get("media") or []), chars


class ActorPoolEncoder:
    """``encode_sides`` over ``count`` ``EmbedActor``s, in full batches, decode overlapped.

    A dataset side is cut into calls of ``batch_size`` raw sides (length-ordered; only the
    last call may be short). Each call goes to the least-loaded actor (round-robin on
    ties), ``in_flight`` calls per actor at once: with the actor's ``max_concurrency`` at
    ``in_flight``, it decodes its next batch while the current one embeds. The vectors come
    back in input order. ``timeout_s`` (``compute.step_timeout_s``) bounds the wait for the
    next finished call: no progress for that long cancels the calls and fails.

    The actors (one model load each) start at the first call: an evaluation whose datasets
    are all resumed from stored scores loads no model at all."""

    def __init__(
        self,
        make_actor: Callable[[], Any],
        count: int,
        timeout_s: float | None = None,
        in_flight: int = 2,
        report_every_s: float = 60.0,
        staged: dict[str, str] | None = None,
    ):
        self.make_actor = make_actor
        self.staged = staged or {}  # local copy of a remote eval set -> its URI
        self.count = count
        self.timeout_s = timeout_s
        self.in_flight = in_flight
        self.report_every_s = report_every_s
        self.actors: list[Any] = []
        self.described: list[dict[str, Any]] = []  # each actor's device, once started
        self.work: list[dict[str, Any]] = []  # each actor's ``work()``, read at close

    def _start(self) -> None:
        from rzenembed.cluster import wait_for

        if not self.actors:
            self.actors = [self.make_actor() for _ in range(self.count)]
            described = [a.describe.remote() for a in self.actors]
            self.described = wait_for(described, "starting the embedding actors", self.timeout_s)

    def encode_sides(
        self,
        sides: Sequence[dict[str, Any]],
        media_root: str,
        max_frames: int,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        if not sides:
            return torch.empty(0, 0)
        self._start()
        order = sorted(range(len(sides)), key=lambda i: _side_length(sides[i]))
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        payloads = [[sides[i] for i in rows] for rows in batches]
        set_uri, root = _media_source(media_root, self.staged)
        results = self._run(payloads, (root, max_frames, batch_size, None, set_uri), progress)
        out = torch.empty(len(sides), results[0].shape[1], dtype=results[0].dtype)
        for rows, vectors in zip(batches, results, strict=True):
            out[rows] = vectors
        return out

    def _run(
        self,
        payloads: list[list[dict[str, Any]]],
        settings: tuple[Any, ...],
        progress: Callable[[int], None] | None,
    ) -> list[torch.Tensor]:
        """Every payload embedded by ``encode_sides(payload, *settings)`` on the
        least-loaded actor, at most ``in_flight`` per actor; results in payload order."""
        import ray

        results: list[Any] = [None] * len(payloads)
        load = [0] * len(self.actors)
        running: dict[Any, tuple[int, int]] = {}  # ref -> (payload index, actor index)
        total = sum(len(p) for p in payloads)
        clock = _ProgressClock(f"embedding {total} items", self.timeout_s, self.report_every_s)
        queued = 0
        while queued < len(payloads) or running:
            while queued < len(payloads) and min(load) < self.in_flight:
                actor = load.index(min(load))
                ref = self.actors[actor].encode_sides.remote(payloads[queued], *settings)
                running[ref] = (queued, actor)
                load[actor] += 1
                queued += 1
            done, _ = ray.wait(list(running), num_returns=1, timeout=clock.budget())
            if not done:
                clock.stalled(list(running), len(payloads))
                continue
            index, actor = running.pop(done[0])
            load[actor] -= 1
            results[index] = ray.get(done[0])
            clock.progressed()
            if progress is not None:
                progress(len(payloads[index]))
        return results

    def close(self) -> None:
        """Each actor's ``work()`` read (best effort), then the actors killed."""
        import ray

        if self.actors:
            try:
                self.work = ray.get([a.work.remote() for a in self.actors], timeout=30)
            except Exception:  # a dead actor has no counters to give
                logger.warning("could not read the embedding actors' work counters")
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class _ProgressClock:
    """Time since the last finished call: a progress line every ``report_every_s`` and,
    past ``timeout_s`` without progress, the running calls cancelled and ``StepTimeout``."""

    def __init__(self, what: str, timeout_s: float | None, report_every_s: float):
        self.what = what
        self.timeout_s = timeout_s
        self.report_every_s = report_every_s
        self.started = self.last = self.reported = time.monotonic()
        self.done = 0

    def budget(self) -> float:
        """How long the next wait may block before a report or the timeout is due."""
        now = time.monotonic()
        budget = self.report_every_s - (now - self.reported)
        if self.timeout_s is not None:
            budget = min(budget, self.timeout_s - (now - self.last))
        return max(budget, 0.0)

    def progressed(self) -> None:
        self.done += 1
        self.last = time.monotonic()

    def stalled(self, running: list[Any], total: int) -> None:
        """Nothing finished within the budget: fail past the timeout, else report."""
        import ray

        from rzenembed.cluster import StepTimeout

        now = time.monotonic()
        if self.timeout_s is not None and now - self.last >= self.timeout_s:
            for ref in running:
                ray.cancel(ref)  # actor calls: no force; close() kills the actors
            raise StepTimeout(
                f"{self.what}: {self.done} of {total} calls done, none finished in the last "
                f"{self.timeout_s:g} s (compute.step_timeout_s); cancelled the rest"
            )
        self.reported = now
        logger.info(
            "%s: %d of %d calls done after %.0f s",
            self.what,
            self.done,
            total,
            now - self.started,
        )


def eval_actor_count(cfg: PipelineConfig) -> int:
    """``compute.eval_actors``, capped at how many the cluster's nodes hold at once (16
    actors of one GPU on an 8-GPU node: 8, said in the log); at least one, waited for
    (or refused) like any request."""
    from rzenembed.cluster import how_many_fit, live_nodes

    bundle = {"GPU": step_gpus(cfg), "CPU": cfg.compute.step_cpus}
    wanted = cfg.compute.eval_actors
    fitted = how_many_fit({k: v for k, v in bundle.items() if v}, wanted, live_nodes())
    if fitted == 0:
        ensure_compute_for(cfg.compute, "an evaluation actor", 1, bundle)
        return 1
    if fitted < wanted:
        logger.warning(
            "compute.eval_actors is %d but the cluster holds %d actors of {GPU: %g, CPU: %g} "
            "at once: evaluating with %d",
            wanted,
            fitted,
            bundle["GPU"],
            bundle["CPU"],
            fitted,
        )
    return fitted


def _score_with_actors(
    cfg: PipelineConfig,
    model: dict[str, str],
    local_sets: list[str],
    cache_uri: str,
    actors_seen: list[dict[str, Any]] | None = None,
    set_uris: Sequence[str] | None = None,
) -> list:
    """``model`` (``{"uri", "digest"}``) embedded by ``compute.eval_actors`` actors and
    scored here on ``local_sets``: this process sends raw sides and ranks, the actors
    decode and embed. ``set_uris`` (where each of ``local_sets`` was staged from) lets an
    actor on another node stage a remote set itself. Each started actor's ``describe()``
    and ``work()`` are appended to ``actors_seen``."""
    import ray

    from rzenembed.evaluation import evaluate

    actor_cls = ray.remote(EmbedActor).options(
        num_gpus=step_gpus(cfg),
        num_cpus=cfg.compute.step_cpus,
        max_concurrency=EVAL_CALLS_PER_ACTOR,  # one call decodes while one embeds
    )
    actors = eval_actor_count(cfg)
    staged = {
        local: uri
        for local, uri in zip(local_sets, set_uris or local_sets, strict=True)
        if is_remote(uri)
    }
    encoder = ActorPoolEncoder(
        lambda: actor_cls.remote(cfg, model["uri"]),
        actors,
        cfg.compute.step_timeout_s,
        in_flight=EVAL_CALLS_PER_ACTOR,
        staged=staged,
    )
    try:
        return evaluate(
            encoder,
            local_sets,
            model_digest=model["digest"],
            cache_dir=cache_uri,
            batch_size=cfg.eval.batch_size,
            max_frames=cfg.model.video_frames,
            ndcg_k=cfg.eval.ndcg_k,
            datasets=cfg.eval.datasets,
            endpoint_url=cfg.storage.endpoint_url,
        )
    finally:
        encoder.close()
        if actors_seen is not None:
            work = encoder.work or [{} for _ in encoder.described]
            actors_seen.extend({**d, **w} for d, w in zip(encoder.described, work, strict=False))


def _rescore_task(
    cfg: PipelineConfig, model: dict[str, str], sets: list[str], cache_uri: str
) -> dict[str, Any]:
    from rzenembed.evaluation.report import build_report, levels

    local_sets = [str(stage_eval_set(s, cfg.storage.endpoint_url)) for s in sets]
    scores = _score_with_actors(cfg, model, local_sets, cache_uri, set_uris=sets)
    report = build_report(scores, model)
    return {
        "levels": levels(report),
        "evaluation_digest": report["evaluation_digest"],
        "report": report,  # its per-query scores: the paired comparison with a candidate
    }


def rescore_step(
    cfg: PipelineConfig, model: dict[str, str], sets: list[str], cache_uri: str
) -> dict[str, Any]:
    """Score an already registered model (the champion) on ``sets``: its report levels
    and the evaluation digest, nothing published (champion gating compares them)."""
    return on_ray(cfg, _rescore_task, cfg, model, list(sets), cache_uri, gpus=0.0, cpus=0.0)


def _evaluate_task(
    cfg: PipelineConfig,
    models: dict[str, dict[str, str]],
    sets: list[str],
    out_uri: str,
    cache_uri: str,
) -> dict[str, Any]:
    """Coordinator: embedding actors per model, ranking here, reports published."""
    from rzenembed.evaluation import write_report
    from rzenembed.evaluation.release import suite_skipped
    from rzenembed.identity import json_file_digest

    endpoint = cfg.storage.endpoint_url
    local_sets = [str(stage_eval_set(s, endpoint)) for s in sets]
    skipped = suite_skipped(local_sets)
    work = Path(tempfile.mkdtemp(prefix="rzenembed-eval-"))
    out: dict[str, Any] = {}
    try:
        previous = None
        for role in ("baseline", "model"):  # the baseline first: the model's report has deltas
            model = models[role]
            actors: list[dict[str, Any]] = []
            scores = _score_with_actors(cfg, model, local_sets, cache_uri, actors, sets)
            folder = work / "report" / ("baseline" if role == "baseline" else "")
            info = {
                "path": model["uri"],
                "digest": model["digest"],
                "video_frames": cfg.model.video_frames,
                "max_visual_tokens": cfg.model.max_visual_tokens,
            }
            paths = write_report(scores, folder, info, previous=previous, skipped=skipped)
            previous = paths["json"]
            out[role] = {
                "report": json.loads(paths["json"].read_text()),
                "digest": json_file_digest(paths["json"]),
                "actors": actors,  # where it was embedded (none when every score was stored)
            }
        publish_folder(work / "report", out_uri, endpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def evaluate_step(
    cfg: PipelineConfig,
    model: dict[str, str],
    baseline: dict[str, str],
    sets: list[str],
    out_uri: str,
    cache_uri: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Score ``model`` and the untrained ``baseline`` (``{"uri", "digest"}`` each) on the
    evaluation sets and publish both reports at ``out_uri`` (``report.*`` and
    ``baseline/report.*``); returns each report and its digest. Runs as a coordinator Ray
    task (no GPU: it ranks) with ``compute.eval_actors`` embedding actors. ``progress``
    is called with each dataset score as it is stored (the driver polls the store)."""
    endpoint = cfg.storage.endpoint_url
    if is_published(out_uri, endpoint):
        folder = stage_folder(out_uri, endpoint)
        from rzenembed.identity import json_file_digest

        return {
            role: {
                "report": json.loads((folder / sub / "report.json").read_text()),
                "digest": json_file_digest(folder / sub / "report.json"),
            }
            for role, sub in (("baseline", "baseline"), ("model", ""))
        }
    args = (cfg, {"model": model, "baseline": baseline}, list(sets), out_uri, cache_uri)
    if progress is None:
        return on_ray(cfg, _evaluate_task, *args, gpus=0.0, cpus=0.0)
    return _watched(cfg, _evaluate_task, args, join(cache_uri, "scores"), progress)


def _watched(
    cfg: PipelineConfig,
    fn: Callable[..., Any],
    args: tuple,
    scores_uri: str,
    progress: Callable[[dict[str, Any]], None],
    interval_s: float = 5.0,
) -> Any:
    """``fn`` as a Ray task (no resources: it coordinates) while the driver reports each
    dataset score the task stores under ``scores_uri`` (``{model digest}-{key}.json``)."""
    import ray

    from rzenembed.cluster import StepTimeout
    from rzenembed.data.storage import filesystem

    fs, path = filesystem(scores_uri, cfg.storage.endpoint_url)

    def listing() -> set[str]:
        try:
            return set(fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return set()

    seen = listing()
    ref = submit_on_ray(cfg, fn, *args, gpus=0.0, cpus=0.0)
    started, limit = time.monotonic(), cfg.compute.step_timeout_s
    while True:
        done, _ = ray.wait([ref], timeout=interval_s)
        if not done and limit is not None and time.monotonic() - started > limit:
            ray.cancel(ref, force=True)
            raise StepTimeout(
                f"evaluation: not done after {limit:g} s (compute.step_timeout_s); cancelled"
            )
        for name in sorted(listing() - seen):
            seen.add(name)
            with fs.open(name, "rb") as f:
                score = json.loads(f.read())
            progress({**score, "model_digest": name.rsplit("/", 1)[-1].split("-", 1)[0]})
        if done:
            return ray.get(ref)


def report_uris(out_uri: str) -> dict[str, str]:
    return {kind: join(out_uri, name) for kind, name in REPORT_FILES.items()}
