"""Model tasks: soup the stage-2 adapters, evaluate, register and gate the champion."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from rzenembed.compact import CALIBRATION_FILE
from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data.folders import exists, listing_digest, read_bytes, read_text, stage_folder
from rzenembed.data.storage import is_remote, join
from rzenembed.evaluation import discover
from rzenembed.evaluation.compact_report import DIMENSIONS_PNG
from rzenembed.evaluation.comparison import COMPARISON_PNG
from rzenembed.evaluation.report import levels
from rzenembed.evaluation.step import (
    REPORT_FILES,
    ScoreWatcher,
    evaluate_step,
    report_uris,
    rescore_step,
)
from rzenembed.evaluation.uncertainty import paired_difference
from rzenembed.modeling.digest import file_digest
from rzenembed.soup import soup_step
from rzenembed.tracking import DIGEST_TAG, LineageRef, Tracker
from rzenembed.training.stages import output_root
from tasks.common import (
    RETRIES,
    RunContext,
    as_ref,
    code_version,
    keyed,
    run_in_job,
    step_run,
    with_job,
)

REPORT_TAG = "rzenembed.report"  # a registered version's evaluation report (report.json)

CHAMPION_LEVELS = {"all": "All", "image": "Image", "video": "Video", "visdoc": "VisDoc"}


def eval_set_paths(cfg: PipelineConfig, base: str | None) -> list[str]:
    """The configured evaluation sets, relative ones resolved like sources."""
    if not cfg.eval.sets:
        raise ValueError("eval.sets is empty: name at least one evaluation set folder")
    return resolve_set_paths(cfg.eval.sets, base)


def validation_set_paths(cfg: PipelineConfig, base: str | None) -> list[str]:
    """``soup.validation_sets`` resolved; refused when one holds the same tables as a
    reported set (a copy under another name selects on the test data all the same)."""
    paths = resolve_set_paths(cfg.soup.validation_sets, base)
    endpoint = cfg.storage.endpoint_url
    reported = {eval_sets_digest([p], endpoint): p for p in eval_set_paths(cfg, base)}
    for path in paths:
        same = reported.get(eval_sets_digest([path], endpoint))
        if same is not None:
            raise ValueError(
                f"soup validation set {path} has the same content as the reported set {same}: "
                f"greedy souping must select on a validation split"
            )
    return paths


def resolve_set_paths(uris: list[str], base: str | None) -> list[str]:
    out = []
    for uri in uris:
        local = base is not None and "://" not in uri and not uri.startswith("/")
        out.append(join(base, uri) if local else uri)
    return out


def eval_sets_digest(paths: list[str], endpoint_url: str | None = None) -> str:
    """Content digest of every evaluation table (media are named by them); a remote set by
    its listing (names, sizes, ETags), so the Prefect worker downloads nothing."""
    h = hashlib.sha256()
    for path in paths:
        if is_remote(path):
            h.update(f"{path}:{listing_digest(path, endpoint_url)}\n".encode())
            continue
        for folder in discover(path):
            for table in sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.parquet")):
                h.update(f"{folder.name}/{table.name}:{file_digest(table)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- soup


def _soup_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    return {
        "soup": cfg.soup.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json"),
        "storage": cfg.storage.root,
        "name": cfg.name,
    }


def _weights(cfg: PipelineConfig, adapters: list[dict[str, Any]]) -> list[float] | None:
    if cfg.soup.weights is None:
        return None
    mixtures = [a["extra"]["mixture"] for a in adapters]
    missing = sorted(set(mixtures) - set(cfg.soup.weights))
    if missing:
        raise ValueError(f"soup.weights has no weight for mixtures {missing}")
    return [cfg.soup.weights[m] for m in mixtures]


def _references_suffix(cfg: PipelineConfig) -> str:
    """What the published score files add to a report's identity: a report made without
    them (or with others) is not the one asked for, so it is made again (every dataset's
    score is stored by model and content: nothing is embedded twice)."""
    refs = cfg.eval.reference_scores
    return f"-ref{digest_of(sorted(refs))[:8]}" if refs else ""


@task(
    name="soup",
    persist_result=True,
    cache_key_fn=keyed("soup", _soup_section, lambda p: [a["digest"] for a in p["adapters"]]),
    **RETRIES,
)
def soup_adapters(
    cfg: PipelineConfig, adapters: list[dict[str, Any]], base: str | None, ctx: RunContext
) -> dict[str, Any]:
    """The stage-2 adapters -> one merged model (a Ray task; a LoggedModel naming its
    adapters), published at ``<output root>/soup-<key>``."""
    section = _soup_section({"cfg": cfg})
    with step_run(cfg, ctx, "soup", f"soup ({cfg.soup.method})", section) as (tracker, run_id):
        key = digest_of([section, [a["digest"] for a in adapters]])[:12]
        out_uri = join(output_root(cfg), f"soup-{key}")
        sets = validation_set_paths(cfg, base) if cfg.soup.method == "greedy" else []
        uris = [a["uri"] for a in adapters]
        ran = run_in_job(cfg, "soup", soup_step, cfg, uris, out_uri, _weights(cfg, adapters), sets)
        recipe, digest = ran.value["recipe"], ran.value["digest"]
        tracker.log_json(run_id, "soup_recipe.json", recipe)
        model_id = tracker.log_model(
            run_id,
            "souped",
            out_uri,
            "souped-model",
            params={"method": cfg.soup.method, "adapters": len(adapters)},
            tags={"rzenembed.digest": digest},
            upload=cfg.tracking.upload_models,
            endpoint_url=cfg.storage.endpoint_url,
        )
        kept = [a["name"] for a in recipe["adapters"] if a["kept"]]
        out = LineageRef(
            "model",
            "souped",
            out_uri,
            digest,
            run_id,
            model_id,
            extra={"method": cfg.soup.method, "kept": kept},
        ).to_json()
        out = with_job(out, ran)
        tracker.record_lineage(run_id, "soup", [as_ref(a) for a in adapters], [as_ref(out)])
    return out


# --------------------------------------------------------------------------- evaluate


def _eval_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    return {"eval": cfg.eval.model_dump(mode="json"), "storage": cfg.storage.root, "name": cfg.name}


def _eval_inputs(p: dict[str, Any]) -> list[str]:
    cfg = p["cfg"]
    return [
        p["model"]["digest"],
        p["baseline"]["digest"],
        eval_sets_digest(eval_set_paths(cfg, p.get("base")), cfg.storage.endpoint_url),
    ]


def _dataset_artifact(model_digest: str) -> Callable[[dict[str, Any]], None]:
    """A Prefect artifact (and a log line) for each dataset as its score is stored."""

    def report(score: dict[str, Any]) -> None:
        role = "model" if model_digest.startswith(score["model_digest"]) else "baseline"
        line = (
            f"{role} {score['name']}: {score['metric']} {100 * score['score']:.1f} "
            f"({score['queries']} queries, {score['candidates']} candidates)"
        )
        print(line)
        slug = re.sub(r"[^a-z0-9-]+", "-", f"eval-{role}-{score['name']}".lower()).strip("-")
        create_markdown_artifact(
            f"# {score['name']}\n\n{line}\n",
            key=slug[:100],
            description=f"{role}: one finished evaluation dataset",
        )

    return report


def _aggregate_intervals(report: dict[str, Any]) -> dict[str, list[float]]:
    return {k: v for k, v in report.get("intervals", {}).items() if not k.startswith("dataset:")}


AGGREGATES = ("All", "Image", "Video", "VisDoc")


def compact_summary(report: dict[str, Any]) -> dict[str, float]:
    """All at every scored (dimension, precision), keyed as the report keys them (``64/int8``)."""
    variants = (report.get("compact") or {}).get("variants", {})
    return {key: entry["scores"]["All"] for key, entry in variants.items()}


def _against_base(report: dict[str, Any], baseline: dict[str, Any]) -> dict[str, list[float]]:
    """Trained minus untrained, paired over the same queries: ``[mean, low, high]`` of the
    95% bootstrap interval per aggregate level. Whether training helped is this interval
    excluding zero, not the two scores' own intervals apart (they overlap long before a
    paired difference stops being clear, as the same hard queries pull both down)."""
    out = {}
    for level in AGGREGATES:
        paired = paired_difference(report, baseline, level)
        if paired is not None:
            out[level] = [paired["difference"], paired["low"], paired["high"]]
    return out


@task(
    name="evaluate",
    persist_result=True,
    cache_key_fn=keyed("evaluate", _eval_section, _eval_inputs),
    **RETRIES,
)
def evaluate_model(
    cfg: PipelineConfig,
    model: dict[str, Any],
    baseline: dict[str, Any],
    base: str | None,
    ctx: RunContext,
) -> dict[str, Any]:
    """MMEB-style scores of ``model`` (Ray: a coordinator task and embedding actors), with
    the untrained ``baseline`` as the delta column; reports published under
    ``<output root>/eval-<digest>``."""
    sets = eval_set_paths(cfg, base)
    endpoint = cfg.storage.endpoint_url
    with step_run(cfg, ctx, "evaluate", "evaluate", _eval_section({"cfg": cfg})) as (
        tracker,
        run_id,
    ):
        root = output_root(cfg)
        out_uri = join(root, f"eval-{model['digest'][:12]}{_references_suffix(cfg)}")
        cache = join(root, "_embedding_cache")
        # Each dataset's score as it is stored, from this process (the work may be a job).
        watcher = ScoreWatcher(
            join(cache, "scores"),
            endpoint,
            _dataset_artifact(model["digest"]),
            digests=[model["digest"], baseline["digest"]],
        )
        with watcher.polling():
            ran = run_in_job(
                cfg,
                "evaluate",
                evaluate_step,
                cfg,
                {"uri": model["uri"], "digest": model["digest"]},
                {"uri": baseline["uri"], "digest": baseline["digest"]},
                sets,
                out_uri,
                cache,
            )
        results = ran.value
        report = results["model"]["report"]
        folder = stage_folder(out_uri, endpoint)  # three small files, for MLflow and Prefect
        for name in REPORT_FILES.values():
            tracker.log_file(run_id, folder / name, "report")
        for picture in (COMPARISON_PNG, DIMENSIONS_PNG):  # when the report drew them
            if (folder / picture).is_file():
                tracker.log_file(run_id, folder / picture, "report")
        now = levels(report)
        tracker.log_metrics(run_id, [(f"eval/{k.replace(':', '/')}", v, 0) for k, v in now.items()])
        compact = compact_summary(report)
        metrics = [(f"eval/compact/{k.replace('/', '_')}", v, 0) for k, v in compact.items()]
        tracker.log_metrics(run_id, metrics)
        create_markdown_artifact(
            (folder / REPORT_FILES["markdown"]).read_text(),
            key="evaluation-report",
            description="MMEB-style scores; Δ against the untrained base",
        )
        uris = report_uris(out_uri)
        ref = LineageRef(
            "report",
            "evaluation",
            uris["json"],
            results["model"]["digest"],
            run_id,
            extra={
                "scores": now,
                "baseline": levels(results["baseline"]["report"]),
                # 95% bootstrap intervals of the aggregate levels (datasets': report.json).
                "intervals": _aggregate_intervals(report),
                "baseline_intervals": _aggregate_intervals(results["baseline"]["report"]),
                "gain_over_base": _against_base(report, results["baseline"]["report"]),
                "markdown": uris["markdown"],
                "png": uris["png"],
                "leaderboard": uris["leaderboard"],
                "evaluation_digest": report["evaluation_digest"],
                # Nested sizes and precisions: All per "dimension/precision", the sizes
                # trained and the int8/uint8 calibration stored with the model.
                "compact": compact,
                "trained_dimensions": report["model"].get("trained_dimensions") or [],
                "calibration": report["model"].get("calibration"),
            },
        ).to_json()
        ref = with_job(ref, ran)
        tracker.record_lineage(run_id, "evaluate", [as_ref(model), as_ref(baseline)], [as_ref(ref)])
    return ref


# --------------------------------------------------------------------------- register


TRAINED_DIMS_TAG = "rzenembed.trained_dimensions"
CALIBRATION_TAG = "rzenembed.calibration"


def _compact_tags(report: dict[str, Any]) -> dict[str, str]:
    """Registry tags: the nested sizes the version was trained for and its calibration
    (``<digest> <uri>``), so a user of the registry sees what it can be cut to."""
    extra = report["extra"]
    tags = {}
    if extra.get("trained_dimensions"):
        tags[TRAINED_DIMS_TAG] = ",".join(str(d) for d in extra["trained_dimensions"])
    if extra.get("calibration"):
        tags[CALIBRATION_TAG] = f"{extra['calibration']['digest']} {extra['calibration']['uri']}"
    return tags


def _verdict(decision: dict[str, Any], version: str) -> str:
    if decision.get("already_champion"):
        return f"The same model (same digest) is already the champion, v{version}"
    if decision["promoted"]:
        return f"Champion moved to v{version}"
    return f"Champion stays at v{decision['champion_version']}"


def _gating_note(decision: dict[str, Any]) -> str:
    """The paired comparison and why the champion stayed, for the registration artifact."""
    lines = []
    paired = decision.get("paired")
    if paired:
        lines.append(
            f"Paired {100 * paired['confidence']:.0f}% interval of candidate minus champion "
            f"({paired['queries']} queries): [{100 * paired['low']:+.1f}, "
            f"{100 * paired['high']:+.1f}] points, mean {100 * paired['difference']:+.1f}."
        )
    if decision.get("refused"):
        lines.append(f"Not moved: {decision['refused']}.")
    return "".join(f"\n{line}\n" for line in lines)


def _log_lineage_picture(tracker: Tracker, run_id: str, model_uri: str) -> None:
    """The registered model's lineage drawn as one SVG (raw sources to the model, each
    input once), logged to the registration run as ``lineage/lineage.svg``. A picture is
    an aid: a failure to draw it is printed, never a failed registration."""
    from rzenembed.lineage_graph import to_svg
    from rzenembed.tracking import lineage

    try:
        svg = to_svg(lineage(tracker, model_uri), f"{model_uri}: lineage")
        tracker.log_text(run_id, "lineage.svg", svg, "lineage")
    except Exception as error:  # the picture is optional (docstring)
        print(f"lineage picture not drawn: {type(error).__name__}: {error}")


def champion_level(metric: str) -> str:
    """``eval.champion_metric`` -> a report level (All, Image, Image/CLS, dataset:NAME)."""
    return CHAMPION_LEVELS.get(metric.lower(), metric)


def _rescorer(
    cfg: PipelineConfig,
    base: str | None,
    level: str,
    tracker: Tracker,
    reports: dict[str, dict[str, Any]],
) -> Callable[[Any], float | None]:
    """Scores a registered version (the champion) again on this run's evaluation sets;
    None when its model folder cannot be found (then the champion is not moved). The
    report it gets is kept in ``reports`` by version (the paired comparison reads it)."""
    endpoint = cfg.storage.endpoint_url

    def rescore(version: Any) -> float | None:
        digest = version.tags.get(DIGEST_TAG)
        uri = tracker.model_folder(version)
        if not uri or not digest or not exists(join(uri, "config.json"), endpoint):
            print(
                f"champion v{version.version}: its model folder is not found, so it "
                f"cannot be scored on the new evaluation sets"
            )
            return None
        print(f"champion v{version.version} was scored on other sets: scoring it again")
        sets = eval_set_paths(cfg, base)
        # What decides the scores: the model, the sets' content (a set updated in place
        # keeps its path), the evaluation and inference settings, the code.
        decided_by = [
            digest,
            eval_sets_digest(sets, endpoint),
            cfg.eval.model_dump(mode="json"),
            cfg.model.model_dump(mode="json", exclude={"name_or_path"}),
            code_version(),
        ]
        key = digest_of(decided_by)[:32]
        result = run_in_job(
            cfg,
            "rescore",
            rescore_step,
            cfg,
            {"uri": uri, "digest": digest},
            sets,
            join(output_root(cfg), "_embedding_cache"),
            key=key,
        ).value
        reports[str(version.version)] = result["report"]
        return float(result["levels"][level])

    return rescore


def _read_report(uri: str | None, endpoint: str | None) -> dict[str, Any] | None:
    if not uri or not exists(uri, endpoint):
        return None
    return json.loads(read_text(uri, endpoint))


def _pairer(
    cfg: PipelineConfig, report_uri: str, level: str, reports: dict[str, dict[str, Any]]
) -> Callable[[Any], dict[str, Any] | None]:
    """``eval.gating: significant``: the paired bootstrap of the candidate's report against
    the champion's on ``level`` (the champion's report as rescored on this run's sets, or
    the one its version names when both were scored on the same sets)."""
    endpoint = cfg.storage.endpoint_url

    def paired(version: Any) -> dict[str, Any] | None:
        champion = reports.get(str(version.version)) or _read_report(
            version.tags.get(REPORT_TAG), endpoint
        )
        candidate = _read_report(report_uri, endpoint)
        if champion is None or candidate is None:
            return None
        return paired_difference(candidate, champion, level)

    return paired


@task(
    name="register",
    persist_result=True,
    cache_key_fn=keyed(
        "register",
        lambda p: {
            "tracking": p["cfg"].tracking.model_dump(mode="json"),
            "metric": p["cfg"].eval.champion_metric,
            "margin": p["cfg"].eval.min_improvement,
            "rescore": p["cfg"].eval.rescore_champion,
            "gating": p["cfg"].eval.gating,
        },
        lambda p: [p["model"]["digest"], p["report"]["digest"]],
    ),
    **RETRIES,
)
def register_model(
    cfg: PipelineConfig,
    model: dict[str, Any],
    report: dict[str, Any],
    ctx: RunContext,
    base: str | None = None,
) -> dict[str, Any]:
    """Register the souped model (alias ``candidate``); move ``champion`` only if it is better."""
    level = champion_level(cfg.eval.champion_metric)
    scores = report["extra"]["scores"]
    if level not in scores:
        raise ValueError(
            f"eval.champion_metric {cfg.eval.champion_metric!r}: the report has "
            f"no level {level!r}; it has {sorted(scores)}"
        )
    section = {"tracking": cfg.tracking.model_dump(mode="json"), "metric": level}
    with step_run(cfg, ctx, "register", "register", section) as (tracker, run_id):
        tags = {REPORT_TAG: report["uri"], **_compact_tags(report)}
        version, reused = tracker.register(model["model_id"], run_id, model["digest"], tags)
        calibration = report["extra"].get("calibration")
        if calibration:  # the int8/uint8 ranges the endpoint codes this version with
            ranges = read_bytes(calibration["uri"], cfg.storage.endpoint_url)
            tracker.log_bytes(run_id, CALIBRATION_FILE, ranges, "model")
            if cfg.tracking.upload_models:  # an endpoint serving the uploaded files has them
                tracker.add_model_file(model["model_id"], CALIBRATION_FILE, ranges)
        if reused:
            print(
                f"model digest {model['digest'][:12]} is already registered as version "
                f"{version}; reusing it"
            )
        rescored: dict[str, dict[str, Any]] = {}
        significant = cfg.eval.gating == "significant"
        decision = tracker.promote_if_better(
            version,
            level,
            float(scores[level]),
            cfg.eval.min_improvement,
            evaluation_digest=report["extra"].get("evaluation_digest"),
            rescore=(
                _rescorer(cfg, base, level, tracker, rescored)
                if cfg.eval.rescore_champion
                else None
            ),
            paired=_pairer(cfg, report["uri"], level, rescored) if significant else None,
        )
        if decision.get("refused"):
            print(f"champion not moved: {decision['refused']}")
        tracker.log_json(run_id, "promotion.json", decision)
        uri = f"models:/{cfg.tracking.registered_model}/{version}"
        out = LineageRef(
            "registered-model",
            f"{cfg.tracking.registered_model} v{version}",
            uri,
            model["digest"],
            run_id,
            model["model_id"],
            extra={
                "version": version,
                "decision": decision,
                "reused": reused,
                # Where and when this decision was made: a later run that gets this result
                # from Prefect's cache reports it as reused, never as its own decision.
                "decided": {
                    "flow_run": str(flow_run.id) if flow_run.id else None,
                    "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                },
            },
        ).to_json()
        tracker.record_lineage(run_id, "register", [as_ref(model), as_ref(report)], [as_ref(out)])
        _log_lineage_picture(tracker, run_id, uri)
    champion = decision["champion_score"]
    create_markdown_artifact(
        f"# Registration\n\n{uri} (alias `candidate`)\n\n| model | {level} |\n|---|---|\n"
        f"| candidate v{version} | {100 * decision['candidate_score']:.1f} |\n"
        f"| champion {decision['champion_version'] or '(none)'} | "
        f"{'–' if champion is None else f'{100 * champion:.1f}'} |\n\n"
        f"{_verdict(decision, version)}.\n{_gating_note(decision)}",
        key="registration",
        description="candidate against champion",
    )
    return out
