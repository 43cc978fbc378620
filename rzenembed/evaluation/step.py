"""The evaluation step: score a model and the untrained base on the evaluation sets and
publish both reports; and the champion's rescoring for gating.

The process that calls these is the coordinator: it reads the evaluation tables, sends
raw sides to the embedding actors (``evaluation.actors``: one GPU each), ranks what comes
back and writes the reports. On a cluster the step is a Ray Job whose driver runs where
``compute.driver_resources`` puts it (the head, which reads everything from the storage
root); in the embedded default it is the pipeline's own process.
"""

from __future__ import annotations

import contextvars
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rzenembed.config import PipelineConfig
from rzenembed.data.folders import is_published, publish_folder, stage_folder
from rzenembed.data.storage import is_remote, join
from rzenembed.evaluation.actors import (
    EVAL_CALLS_PER_ACTOR,
    ActorPoolEncoder,
    actor_class,
    eval_actor_count,
    stage_eval_set,
)

logger = logging.getLogger(__name__)
REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "png": "report.png",
    "leaderboard": "leaderboard.json",
}


def embedding_pool(
    cfg: PipelineConfig,
    model_uri: str,
    local_sets: Sequence[str] = (),
    set_uris: Sequence[str] | None = None,
) -> ActorPoolEncoder:
    """``compute.eval_actors`` embedding actors of ``model_uri`` (started at the first
    call; evaluation and mining share them). ``set_uris`` (where each of ``local_sets`` was
    staged from) lets an actor on another node stage a remote set itself."""
    staged = {
        local: uri
        for local, uri in zip(local_sets, set_uris or local_sets, strict=True)
        if is_remote(uri)
    }
    return ActorPoolEncoder(
        _actor_maker(cfg, model_uri),
        lambda: eval_actor_count(cfg),  # admitted when the first actor is needed
        cfg.compute.step_timeout_s,
        in_flight=EVAL_CALLS_PER_ACTOR,
        staged=staged,
    )


def _actor_maker(cfg: PipelineConfig, model_uri: str) -> Callable[[], Any]:
    """A new embedding actor of ``model_uri`` with the step's resources, each call."""
    actor_cls = actor_class(cfg)
    return lambda: actor_cls.remote(cfg, model_uri)


def _score_with_actors(
    cfg: PipelineConfig,
    model: dict[str, str],
    local_sets: list[str],
    cache_uri: str,
    actors_seen: list[dict[str, Any]] | None = None,
    set_uris: Sequence[str] | None = None,
    encoder: ActorPoolEncoder | None = None,
    variants: Any = None,
) -> list:
    """``model`` (``{"uri", "digest"}``) embedded by ``compute.eval_actors`` actors and
    scored here on ``local_sets``: this process sends raw sides and ranks, the actors
    decode and embed. Each started actor's ``describe()`` and ``work()`` are appended to
    ``actors_seen``. ``encoder``: a pool already holding ``model`` (``ActorPoolEncoder.
    reload``), left open for the caller; else one is started here and closed.
    ``variants`` (``runner.Variants``): compact forms scored from the same vectors."""
    from rzenembed.evaluation import evaluate

    owned = encoder is None
    pool = embedding_pool(cfg, model["uri"], local_sets, set_uris) if encoder is None else encoder
    try:
        return evaluate(
            pool,
            local_sets,
            model_digest=model["digest"],
            cache_dir=cache_uri,
            batch_size=cfg.eval.batch_size,
            max_frames=cfg.model.video_frames,
            ndcg_k=cfg.eval.ndcg_k,
            datasets=cfg.eval.datasets,
            endpoint_url=cfg.storage.endpoint_url,
            variants=variants,
        )
    finally:
        if actors_seen is not None:
            actors_seen.extend(pool.take_work())
        if owned:
            pool.close()


def compact_variants(
    cfg: PipelineConfig, model: dict[str, str], encoder: Any
) -> tuple[Any, dict[str, Any] | None]:
    """The compact forms to score ``model`` at (``eval.dimensions``, else the nested sizes
    its card names; ``eval.precisions``), and what the report records of them: the trained
    sizes and the int8/uint8 calibration (made with ``encoder`` on a sample of the
    model's training data and stored in its folder; None when there is none)."""
    from rzenembed.compact import CALIBRATED, CALIBRATION_FILE, trained_dimensions
    from rzenembed.evaluation.calibration import calibrate_model
    from rzenembed.evaluation.runner import Variants
    from rzenembed.identity import json_digest
    from rzenembed.modeling.card import ModelCard

    endpoint = cfg.storage.endpoint_url
    folder = stage_folder(model["uri"], endpoint)
    # A raw checkpoint evaluated with a ModelConfig has no card: no trained sizes, no data.
    extra = ModelCard.load(folder).extra if ModelCard.exists(folder) else {}
    dims = cfg.eval.dimensions if cfg.eval.dimensions is not None else trained_dimensions(extra)
    calibration = None
    if set(cfg.eval.precisions) & set(CALIBRATED):  # only int8/uint8 need the ranges
        calibration = calibrate_model(cfg, encoder, model["uri"], model["digest"], extra, dims)
    variants = Variants(list(dims), list(cfg.eval.precisions), calibration)
    facts: dict[str, Any] = {"trained_dimensions": trained_dimensions(extra), "calibration": None}
    if calibration is not None:
        facts["calibration"] = {
            "uri": join(model["uri"], CALIBRATION_FILE),
            "digest": json_digest(calibration.to_json()),
            "dimensions": calibration.dimensions,
            "rows": cfg.eval.calibration_rows,
            "stage_manifests": calibration.source.get("stage_manifests", []),
        }
    return variants, facts


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
    and the evaluation digest, nothing published (champion gating compares them). This
    process coordinates (run it as a job on a cluster); the actors embed."""
    return _rescore_task(cfg, model, list(sets), cache_uri)


def _evaluate_task(
    cfg: PipelineConfig,
    models: dict[str, dict[str, str]],
    sets: list[str],
    out_uri: str,
    cache_uri: str,
) -> dict[str, Any]:
    """Coordinator: embedding actors per model, ranking here, reports published."""
    from rzenembed.evaluation import write_report
    from rzenembed.evaluation.published import read_scores_at
    from rzenembed.evaluation.release import suite_skipped
    from rzenembed.identity import json_file_digest

    endpoint = cfg.storage.endpoint_url
    local_sets = [str(stage_eval_set(s, endpoint)) for s in sets]
    skipped = suite_skipped(local_sets)
    # Read before any embedding: a wrong path fails the step at once, not after hours.
    published = [read_scores_at(uri, endpoint) for uri in cfg.eval.reference_scores]
    work = Path(tempfile.mkdtemp(prefix="rzenembed-eval-"))
    out: dict[str, Any] = {}
    # One pool for both models: the actors that embedded the baseline load the model in
    # place (on a GPU cluster a new actor costs a process, a CUDA context and a staged set).
    pool = embedding_pool(cfg, models["baseline"]["uri"], local_sets, sets)
    try:
        previous = None
        for role in ("baseline", "model"):  # the baseline first: the model's report has deltas
            model = models[role]
            if role != "baseline":
                pool.reload(model["uri"], _actor_maker(cfg, model["uri"]))
            actors: list[dict[str, Any]] = []
            variants, facts = None, {}
            if role == "model":  # nested dimensions and precisions: the candidate's only
                variants, facts = compact_variants(cfg, model, pool)
            scores = _score_with_actors(
                cfg, model, local_sets, cache_uri, actors, sets, pool, variants
            )
            folder = work / "report" / ("baseline" if role == "baseline" else "")
            info = {
                "path": model["uri"],
                "digest": model["digest"],
                "video_frames": cfg.model.video_frames,
                "max_visual_tokens": cfg.model.max_visual_tokens,
                **facts,
            }
            references = published if role == "model" else ()
            paths = write_report(
                scores, folder, info, previous=previous, skipped=skipped, references=references
            )
            previous = paths["json"]
            out[role] = {
                "report": json.loads(paths["json"].read_text()),
                "digest": json_file_digest(paths["json"]),
                "actors": actors,  # where it was embedded (none when every score was stored)
            }
        publish_folder(work / "report", out_uri, endpoint)
    finally:
        pool.close()
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
    ``baseline/report.*``); returns each report and its digest. This process is the
    coordinator (it ranks; run the step as a Ray Job on a cluster, where the job's driver
    is placed by ``compute.driver_resources``), with ``compute.eval_actors`` embedding
    actors. ``progress`` is called with each dataset score as it is stored (a
    ``ScoreWatcher`` polls the store beside the work)."""
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
    models = {"model": model, "baseline": baseline}
    if progress is None:
        return _evaluate_task(cfg, models, list(sets), out_uri, cache_uri)
    watcher = ScoreWatcher(join(cache_uri, "scores"), endpoint, progress)
    with watcher.polling():
        return _evaluate_task(cfg, models, list(sets), out_uri, cache_uri)


class ScoreWatcher:
    """Reports each dataset score an evaluation stores under ``scores_uri``
    (``{model digest}-{key}.json``) once, as it appears, for the models whose digests start
    with one of ``digests`` (other evaluations share the folder). ``poll()`` looks once;
    ``polling()`` looks every ``interval_s`` in a thread while the evaluation runs (in this
    process or as a job)."""

    def __init__(
        self,
        scores_uri: str,
        endpoint_url: str | None,
        progress: Callable[[dict[str, Any]], None],
        interval_s: float = 5.0,
        digests: Sequence[str] = (),
    ):
        from rzenembed.data.storage import filesystem

        self.fs, self.path = filesystem(scores_uri, endpoint_url)
        self.progress = progress
        self.interval_s = interval_s
        self.prefixes = tuple(d[:16] for d in digests)
        self.lock = threading.Lock()
        self.seen = self._listing()  # scores stored before this evaluation are not news

    def _listing(self) -> set[str]:
        try:
            return set(self.fs.ls(self.path, detail=False, refresh=True))
        except FileNotFoundError:
            return set()

    def poll(self) -> None:
        with self.lock:
            for name in sorted(self._listing() - self.seen):
                self.seen.add(name)
                digest = name.rsplit("/", 1)[-1].split("-", 1)[0]
                if self.prefixes and not any(p.startswith(digest) for p in self.prefixes):
                    continue  # another model's evaluation
                with self.fs.open(name, "rb") as f:
                    score = json.loads(f.read())
                self.progress({**score, "model_digest": digest})

    @contextmanager
    def polling(self) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval_s):
                try:
                    self.poll()
                except Exception:  # progress is cosmetic; the evaluation goes on
                    logger.debug("could not read the stored scores", exc_info=True)

        # A copy of this thread's context: the reporter may need the caller's (a Prefect
        # task's artifacts and printed lines belong to its run).
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(loop,), daemon=True, name="score-watcher"
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            try:
                self.poll()
            except Exception:  # never hide the evaluation's own outcome behind a listing
                logger.debug("could not read the stored scores", exc_info=True)


def report_uris(out_uri: str) -> dict[str, str]:
    return {kind: join(out_uri, name) for kind, name in REPORT_FILES.items()}
