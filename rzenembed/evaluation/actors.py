"""The embedding actors of evaluation: one model per GPU, decoding and embedding what a
coordinator sends them, in full batches, two calls in flight per actor.

The coordinator (an evaluation step's driver: this process, or its Ray Job) never decodes
a picture: it sends raw sides, ranks the vectors that come back and writes the reports.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rzenembed.compute.admission import (
    admit_for,
    autoscale_of,
    fmt,
    grown,
    how_many_fit,
    live_nodes,
)
from rzenembed.compute.steps import step_bundle
from rzenembed.compute.waiting import ProgressClock, wait_for
from rzenembed.config import PipelineConfig
from rzenembed.data.folders import stage_folder
from rzenembed.data.storage import is_remote
from rzenembed.modeling.inputs import EmbedInput

logger = logging.getLogger(__name__)
# Calls in flight per evaluation actor: one embedding, one decoding the next batch.
EVAL_CALLS_PER_ACTOR = 2


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
        from rzenembed.runtime import task_runtime

        self.cfg = cfg
        self.runtime = task_runtime(cfg.model, cfg.compute)
        self.embedder = self._embedder(model_uri)
        self.endpoint_url = cfg.storage.endpoint_url
        self.readers: dict[str, Any] = {}  # media root -> MediaReader
        self.staged_sets: dict[str, Path] = {}  # eval set URI -> its copy on this node
        self.model_lock = threading.Lock()
        self.call_sizes: Counter[int] = Counter()  # sides per encode_sides call
        self.media_decoded = 0  # images and videos this actor decoded

    def _embedder(self, model_uri: str) -> Any:
        from rzenembed.modeling import ModelCard, RzenEmbedder

        folder = stage_folder(model_uri, self.cfg.storage.endpoint_url)
        config = None if ModelCard.exists(folder) else self.cfg.model
        return RzenEmbedder.from_pretrained(folder, config=config, device=self.runtime.device)

    def load(self, model_uri: str) -> None:
        """Another model in place of this one (an evaluation's next model, the trained one
        after the untrained base): the process, its device context, readers and staged
        sets stay, which a new actor would start again; the work counters restart."""
        with self.model_lock:
            self.embedder = None  # the old weights go before the new ones arrive
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.embedder = self._embedder(model_uri)
            self.call_sizes = Counter()
            self.media_decoded = 0

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
        """Where this actor embeds: its device, the autocast dtype, its weights' dtype and
        its process (an evaluation's models share the actors: the same pids)."""
        autocast = self.runtime.autocast_dtype
        return {
            "pid": os.getpid(),
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
        count: int | Callable[[], int],
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

    def _start(self) -> None:
        if not self.actors:
            if callable(self.count):  # decided (and admitted) when an actor is needed
                self.count = self.count()
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
        clock = ProgressClock(f"embedding {total} items", self.timeout_s, self.report_every_s)
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

    def reload(self, model_uri: str, make_actor: Callable[[], Any]) -> None:
        """The next model on the same actors: started ones load it in place (``EmbedActor.
        load``: no new process, no new device context); until they start, ``make_actor``
        builds them with it. Read ``take_work`` first: the counters restart."""
        self.make_actor = make_actor
        if self.actors:
            loads = [a.load.remote(model_uri) for a in self.actors]
            wait_for(loads, "loading the next model on the embedding actors", self.timeout_s)
            described = [a.describe.remote() for a in self.actors]
            self.described = wait_for(described, "the embedding actors", self.timeout_s)

    def take_work(self) -> list[dict[str, Any]]:
        """Each started actor's ``describe()`` and ``work()`` since it started or loaded
        its model (none when no actor was needed). Best effort: a dead actor has no
        counters to give, and its ``describe()`` comes alone."""
        import ray

        if not self.actors:
            return []
        try:
            work = ray.get([a.work.remote() for a in self.actors], timeout=30)
        except Exception:
            logger.warning("could not read the embedding actors' work counters")
            work = [{} for _ in self.actors]
        return [{**d, **w} for d, w in zip(self.described, work, strict=False)]

    def close(self) -> None:
        """The actors killed (read ``take_work`` before)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def eval_actor_count(cfg: PipelineConfig) -> int:
    """``compute.eval_actors``, capped at how many the cluster's nodes hold at once (16
    actors of one GPU on an 8-GPU node: 8, said in the log), then admitted on what is free
    (waited for, or refused naming who holds the resources)."""
    gpus, cpus, custom = step_bundle(cfg)
    bundle = {k: v for k, v in {"GPU": gpus, "CPU": cpus, **custom}.items() if v}
    wanted = cfg.compute.eval_actors
    # The nodes there are, and those the autoscaler may add (a GPU group scaled to zero).
    fitted = how_many_fit(bundle, wanted, grown(live_nodes(), autoscale_of(cfg.compute)))
    if fitted == 0:
        admit_for(cfg.compute, "an evaluation actor", 1, bundle)  # raises: never fits
        return 1
    if fitted < wanted:
        logger.warning(
            "compute.eval_actors is %d but the cluster holds %d actors of {%s} at once: "
            "evaluating with %d",
            wanted,
            fitted,
            fmt(bundle),
            fitted,
        )
    admit_for(cfg.compute, f"{fitted} evaluation actor(s)", fitted, bundle)
    return fitted


def actor_class(cfg: PipelineConfig) -> Any:
    """``EmbedActor`` as a Ray actor class with the step's resources; two calls in flight
    (one decodes while one embeds)."""
    import ray

    gpus, cpus, custom = step_bundle(cfg)
    options: dict[str, Any] = {
        "num_gpus": gpus,
        "num_cpus": cpus,
        "max_concurrency": EVAL_CALLS_PER_ACTOR,
    }
    if custom:
        options["resources"] = custom
    return ray.remote(EmbedActor).options(**options)
