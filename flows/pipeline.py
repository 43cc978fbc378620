"""The pipeline flows: data-prep, train-stage, soup, evaluate and full-pipeline.

Every flow takes a config path plus dotted overrides (validated by the config models
before any work starts), opens one MLflow parent run for its execution, starts local Ray
or joins ``compute.ray_address`` / ``RAY_ADDRESS`` (with a job server configured it joins
nothing: every step is a Ray Job), and chains the tasks. Steps are cached
on their inputs' digests, their config section and the code version, so every flow can
rebuild its inputs by calling the upstream tasks: a finished step is a cache hit. Pass
``refresh=True`` to recompute every step regardless.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait
from prefect.runtime import flow_run

from rzenembed.compact import parse_variant
from rzenembed.compute.connect import ensure_ray
from rzenembed.compute.steps import job_address
from rzenembed.config import PipelineConfig, config_digest, load_config, resolve_paths
from rzenembed.data.folders import exists, read_text
from rzenembed.data.storage import join
from rzenembed.evaluation.report import levels
from rzenembed.prep.prepare import source_steps
from rzenembed.tracking import Tracker, lineage, with_environment_tracking
from tasks.common import RunContext
from tasks.data import (
    cap,
    clean,
    extract_frames,
    ingest,
    merge_classification,
    mixture,
    package_long_videos,
    recaption,
    split_clips,
)
from tasks.mining import mine_negatives
from tasks.model import evaluate_model, register_model, soup_adapters
from tasks.training import base_model_ref, merge_stage1_model, train_stage1, train_stage2


def resolve(config_path: str, overrides: Sequence[str] | None) -> PipelineConfig:
    """Load and validate the config; a bad value fails the flow before any work."""
    return load_config(config_path, list(overrides or []))


class Execution:
    """One flow execution: its config, MLflow parent run and task options."""

    def __init__(self, flow_name: str, config_path: str, overrides, base, refresh: bool):
        # Relative paths resolve against `base` (default: the working directory), once.
        cfg = resolve_paths(resolve(config_path, overrides), base)
        self.cfg = with_environment_tracking(cfg)
        self.base = None
        self.config_path, self.overrides = config_path, list(overrides or [])
        self.refresh = refresh
        if job_address(self.cfg) is None:  # else every step is a Ray Job: no connection
            ensure_ray(address=self.cfg.compute.ray_address)
        self.tracker = Tracker(self.cfg.tracking)
        self.digest = config_digest(self.cfg)
        run_id = self.tracker.start_pipeline(self.cfg, str(flow_run.get_id() or ""), self.digest)
        self.tracker.client.set_tag(run_id, "rzenembed.flow", flow_name)
        self.ctx = RunContext(parent_run_id=run_id)

    def opts(self, task):
        return task.with_options(refresh_cache=True) if self.refresh else task

    def finish(self, failed: bool = False) -> None:
        self.tracker.end(self.ctx.parent_run_id, failed=failed)


# --------------------------------------------------------------------------- pieces


# The task of each step after ingest (``rzenembed.prep.prepare.source_steps`` orders them).
STEP_TASKS = {
    "clean": clean,
    "recaption": recaption,
    "cap": cap,
    "split-clips": split_clips,
    "package-long-videos": package_long_videos,
    "extract-frames": extract_frames,
}


def run_data_prep(ex: Execution) -> dict[str, Any]:
    """Every source through its steps (sources in parallel), the merge, the manifests."""
    cfg, ctx = ex.cfg, ex.ctx
    chains = {}
    for source in cfg.sources:
        current = ex.opts(ingest).submit(cfg, source.name, ex.base, ctx)
        steps = {"ingest": current}
        for step in source_steps(source)[1:]:
            current = steps[step] = ex.opts(STEP_TASKS[step]).submit(cfg, current, ctx)
        chains[source.name] = steps
    versions = {name: {s: f.result() for s, f in steps.items()} for name, steps in chains.items()}
    last = {s.name: versions[s.name][source_steps(s)[-1]] for s in cfg.sources}
    finals = {s.name: last[s.name] for s in cfg.sources if not s.classification}
    classification = [last[s.name] for s in cfg.sources if s.classification]
    if classification:
        merged = ex.opts(merge_classification)(cfg, classification, ctx)
        finals[cfg.prep.classification_dataset] = merged
    by_stage = {s.name: s.stage for s in cfg.sources}
    merged_name = cfg.prep.classification_dataset
    stage1 = {n: r for n, r in finals.items() if by_stage.get(n) in ("stage1", "both")}
    stage2 = {n: r for n, r in finals.items()
              if n == merged_name or by_stage.get(n) in ("stage2", "both")}  # fmt: skip
    pending = {}  # the stages' manifests, built side by side (each may be a Ray Job)
    if stage1:
        pending["stage1"] = ex.opts(mixture).submit(cfg, "stage1", None, stage1, ctx)
    if not cfg.mining.enabled:  # else stage 2's manifests wait for the mined versions
        pending.update(_stage2_manifests(ex, stage2))
    manifests = {name: future.result() for name, future in pending.items()}
    _counts_table(versions, finals)
    print(_data_summary(versions, finals))
    return {"versions": versions, "finals": finals, "stages": manifests, "stage2_finals": stage2}


def _stage2_manifests(ex: Execution, finals: dict[str, Any]) -> dict[str, Any]:
    """Each stage-2 mixture's manifest over ``finals``, submitted side by side (futures)."""
    return {
        f"stage2/{m.name}": ex.opts(mixture).submit(ex.cfg, "stage2", m.name, finals, ex.ctx)
        for m in ex.cfg.stage2.mixtures
    }


def stage2_data(ex: Execution, data: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
    """Stage 2's manifests by mixture: on the prepared data, or (``mining.enabled``) on it
    with hard negatives mined by ``merged``, the stage-1 model stage 2 starts from."""
    if not ex.cfg.mining.enabled:
        return data["stages"]
    mined = ex.opts(mine_negatives)(ex.cfg, data["stage2_finals"], merged, ex.ctx)
    data["mined"] = mined
    pending = _stage2_manifests(ex, mined)
    stages = {**data["stages"], **{name: f.result() for name, f in pending.items()}}
    data["stages"] = stages
    return stages


def _data_summary(versions: dict[str, dict[str, Any]], finals: dict[str, Any]) -> str:
    """One line: rows ready for training, rejects by reason, copies of evaluation items."""
    rejected: Counter[str] = Counter()
    copies: Counter[str] = Counter()
    for steps in versions.values():
        for ref in steps.values():
            rejected.update(ref["extra"]["reject_counts"])
            copies.update(ref["extra"].get("eval_overlap", {}))
    rows = sum(ref["extra"]["rows"] for ref in finals.values())
    reasons = ", ".join(f"{k} {v}" for k, v in rejected.most_common()) or "none"
    found = ", ".join(f"{k} {v}" for k, v in sorted(copies.items())) or "none found"
    return f"data: {rows} rows ready; rejected: {reasons}; copies of evaluation items: {found}"


def _counts_table(versions: dict[str, dict[str, Any]], finals: dict[str, Any]) -> None:
    rows = []
    refs = [r for steps in versions.values() for r in steps.values()]
    refs += [r for n, r in finals.items() if n not in versions]
    for ref in refs:
        extra = ref["extra"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(extra["reject_counts"].items()))
        overlap = ", ".join(f"{k} {v}" for k, v in sorted(extra.get("eval_overlap", {}).items()))
        row = {"dataset": extra["dataset"], "step": extra["step"], "rows": extra["rows"],
               "rejected": extra["rejected"], "reasons": reasons or "-"}  # fmt: skip
        row["copies of evaluation items"] = overlap or "-"
        rows.append(row)
    create_table_artifact(rows, key="data-counts",
                          description="rows kept and rejected by every data step")  # fmt: skip


def run_training_stages(ex: Execution, data: dict[str, Any]) -> dict[str, Any]:
    cfg, ctx = ex.cfg, ex.ctx
    stages = data["stages"]
    base = base_model_ref(cfg)
    if "stage1" not in stages:
        raise ValueError("no stage-1 source configured (sources with stage: stage1 or both)")
    adapter1 = ex.opts(train_stage1)(cfg, stages["stage1"], base, ctx)
    merged = ex.opts(merge_stage1_model)(cfg, adapter1, ctx)
    return {**run_stage2_from(ex, data, merged), "stage1": adapter1}


def run_stage2_from(ex: Execution, data: dict[str, Any], merged: dict[str, Any]) -> dict:
    """Stage 2 for every mixture on an existing merged stage-1 model, in rounds of
    ``compute.concurrent_mixtures`` runs trained side by side."""
    cfg, ctx = ex.cfg, ex.ctx
    if not cfg.stage2.mixtures:
        raise ValueError("no stage-2 mixture configured (stage2.mixtures)")
    train = ex.opts(train_stage2)
    stages = stage2_data(ex, data, merged)
    mixtures, at_once = cfg.stage2.mixtures, cfg.compute.concurrent_mixtures
    adapters = []
    for first in range(0, len(mixtures), at_once):
        group = mixtures[first : first + at_once]
        if len(group) == 1:  # a round of one trains in the flow's own thread
            m = group[0]
            adapters.append(train(cfg, m.name, stages[f"stage2/{m.name}"], merged, ctx))
            continue
        futures = [
            train.submit(cfg, m.name, stages[f"stage2/{m.name}"], merged, ctx) for m in group
        ]
        wait(futures)  # a failed mixture lets the others finish (cached for the rerun)
        adapters.extend(future.result() for future in futures)
    return {"base": base_model_ref(cfg), "merged": merged, "stage2": adapters}


def run_soup(ex: Execution, trained: dict[str, Any]) -> dict[str, Any]:
    return ex.opts(soup_adapters)(ex.cfg, trained["stage2"], ex.base, ex.ctx)


def run_evaluate(ex: Execution, model: dict[str, Any], baseline: dict[str, Any]) -> dict:
    return ex.opts(evaluate_model)(ex.cfg, model, baseline, ex.base, ex.ctx)


def _run(flow_name: str, config_path, overrides, base, refresh, body) -> dict[str, Any]:
    ex = Execution(flow_name, config_path, overrides, base, refresh)
    try:
        out = body(ex)
    except BaseException:
        ex.finish(failed=True)
        raise
    ex.finish()
    return {"mlflow_parent_run_id": ex.ctx.parent_run_id, **out}


# --------------------------------------------------------------------------- flows


@flow(name="data-prep", log_prints=True)
def data_prep(
    config_path: str = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    base: str | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Prepare every configured source into versioned datasets and stage manifests."""
    return _run("data-prep", config_path, overrides, base, refresh, run_data_prep)


@flow(name="train-stage", log_prints=True)
def train_stage(
    config_path: str = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    base: str | None = None,
    refresh: bool = False,
    stage: Literal["stage1", "both"] = "both",
) -> dict[str, Any]:
    """Stage 1 (and, with ``both``, stage 2 for every mixture) on the prepared data."""

    def body(ex: Execution) -> dict[str, Any]:
        data = run_data_prep(ex)
        if stage == "stage1":
            base_ref = base_model_ref(ex.cfg)
            return {"stage1": ex.opts(train_stage1)(ex.cfg, data["stages"]["stage1"],
                                                    base_ref, ex.ctx)}  # fmt: skip
        return run_training_stages(ex, data)

    return _run("train-stage", config_path, overrides, base, refresh, body)


@flow(name="soup", log_prints=True)
def soup_flow(
    config_path: str = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    base: str | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """The stage-2 adapters souped into one model (upstream steps are cache hits)."""
    return _run(
        "soup",
        config_path,
        overrides,
        base,
        refresh,
        lambda ex: {"model": run_soup(ex, run_training_stages(ex, run_data_prep(ex)))},
    )


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config_path: str = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    base: str | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """The souped model scored on the configured evaluation sets."""

    def body(ex: Execution) -> dict[str, Any]:
        trained = run_training_stages(ex, run_data_prep(ex))
        model = run_soup(ex, trained)
        return {"report": run_evaluate(ex, model, trained["base"])}

    return _run("evaluate", config_path, overrides, base, refresh, body)


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(
    config_path: str = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    base: str | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Raw datasets -> data prep -> stage 1 -> mining -> stage 2 per mixture -> soup ->
    evaluate -> register (champion only if better). Returns the model URI and where
    everything is."""

    def body(ex: Execution) -> dict[str, Any]:
        data = run_data_prep(ex)
        trained = run_training_stages(ex, data)
        model = run_soup(ex, trained)
        report = run_evaluate(ex, model, trained["base"])
        registered = ex.opts(register_model)(ex.cfg, model, report, ex.ctx, ex.base)
        _announce(ex, registered, report)
        return {"model_uri": registered["uri"], "registered": registered, "report": report,
                "model": model, "trained": trained, "data": data}  # fmt: skip

    return _run("full-pipeline", config_path, overrides, base, refresh, body)


def champion_stage1_model(
    tracker: Tracker, registered_model: str, endpoint_url: str | None = None
) -> dict[str, Any] | None:
    """The merged stage-1 model the current champion was trained from, if it still exists."""
    if tracker.champion() is None:
        return None
    tree = lineage(tracker, f"models:/{registered_model}@champion")
    stack = [tree]
    while stack:
        node = stack.pop()
        if node.ref.kind == "model" and node.ref.name == "stage1-merged":
            card = join(node.ref.uri, "rzenembed.json")
            return node.ref.to_json() if exists(card, endpoint_url) else None
        stack.extend(node.children)
    return None


def _champion_scores(
    tracker: Tracker, endpoint_url: str | None
) -> tuple[str | None, dict[str, float]]:
    champion = tracker.champion()
    if champion is None:
        return None, {}
    uri = champion.tags.get("rzenembed.report", "")
    report = json.loads(read_text(uri, endpoint_url)) if uri and exists(uri, endpoint_url) else None
    return str(champion.version), levels(report) if report else {}


def reused_decision(registered: dict[str, Any], this_run: str | None) -> dict | None:
    """Where and when a registration result's champion decision was made, when that was
    not in ``this_run`` (the result came from Prefect's cache); None when it was made here
    (or the result predates the record)."""
    decided = registered["extra"].get("decided") or {}
    made_in = decided.get("flow_run")
    return decided if made_in and made_in != this_run else None


def _reused_from(reused: dict[str, Any]) -> str:
    return f"reused from flow run {reused['flow_run']} at {reused['at']}"


def decision_text(registered: dict[str, Any], this_run: str | None) -> str:
    """What happened to ``champion``, as this run may say it: a decision made here, or one
    reused from the run that made it (never replayed as if it had just happened)."""
    decision = registered["extra"]["decision"]
    if decision.get("already_champion"):
        said = "same digest as before: already the champion"
    elif decision["promoted"]:
        said = "champion moved here"
    else:
        said = "champion kept"
    reused = reused_decision(registered, this_run)
    if reused is None:
        return said
    return (
        f"registration {_reused_from(reused)}, whose decision was: {said}; "
        "nothing was decided or moved in this run"
    )


def _comparison(
    old_version, old: dict[str, float], registered: dict, report: dict, this_run: str | None
) -> str:
    new = report["extra"]["scores"]
    decision = registered["extra"]["decision"]
    keys = [k for k in new if not k.startswith("dataset:")] + sorted(
        k for k in new if k.startswith("dataset:")
    )
    rows = [f"| {k} | {'–' if k not in old else f'{100 * old[k]:.1f}'} | {100 * new[k]:.1f} |"
            for k in keys]  # fmt: skip
    outcome = "moved to the new model" if decision["promoted"] else "stays where it was"
    reused = reused_decision(registered, this_run)
    verdict = (
        f"Champion {outcome}"
        if reused is None
        else f"Registration {_reused_from(reused)} (nothing decided in this run); its "
        f"decision: champion {outcome}"
    )
    return "\n".join([
        "# Retraining", "",
        f"Champion before: {'none' if old_version is None else f'v{old_version}'}; "
        f"new candidate: {registered['uri']}. {verdict} "
        f"({decision['metric']}: {decision['candidate_score']:.4f} against "
        f"{decision['champion_score']}, margin {decision['min_improvement']}).", "",
        "| level | champion | candidate |", "|---|---|---|", *rows, "",
    ])  # fmt: skip


@flow(name="retrain", log_prints=True)
def retrain(
    config_path: str = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    base: str | None = None,
    refresh: bool = False,
    retrain_stage1: bool = False,
) -> dict[str, Any]:
    """Scheduled retraining: reprocess what changed (everything else is a cache hit), train
    stage 2 from the champion's stage-1 model (unless ``retrain_stage1`` or there is none),
    soup, evaluate, register, and move ``champion`` only if the new model is better."""

    def body(ex: Execution) -> dict[str, Any]:
        endpoint = ex.cfg.storage.endpoint_url
        old_version, old_scores = _champion_scores(ex.tracker, endpoint)
        data = run_data_prep(ex)
        merged = (
            None
            if retrain_stage1
            else champion_stage1_model(ex.tracker, ex.cfg.tracking.registered_model, endpoint)
        )
        if merged is None:
            trained = run_training_stages(ex, data)
        else:
            print(f"stage 2 starts from the champion's stage-1 model {merged['uri']}")
            trained = run_stage2_from(ex, data, merged)
        model = run_soup(ex, trained)
        report = run_evaluate(ex, model, trained["base"])
        registered = ex.opts(register_model)(ex.cfg, model, report, ex.ctx, ex.base)
        create_markdown_artifact(
            _comparison(old_version, old_scores, registered, report, _this_flow_run()),
            key="retraining",
            description="champion against candidate",
        )
        _announce(ex, registered, report)
        return {"model_uri": registered["uri"], "registered": registered, "report": report,
                "model": model, "trained": trained, "data": data}  # fmt: skip

    return _run("retrain", config_path, overrides, base, refresh, body)


def _this_flow_run() -> str | None:
    return str(flow_run.id) if flow_run.id else None


def browse_hint(tracking_uri: str) -> str:
    """How to look at the MLflow store: a tracking server serves its own UI (``mlflow ui``
    refuses an HTTP store), a file or database store is opened with ``mlflow ui``."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri} (the MLflow server's UI)"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def compact_line(extra: dict[str, Any]) -> str:
    """One console line on the nested sizes and precisions the report scored: All at each
    float size (the share of full it keeps) and at each other precision at full size."""
    scores = {parse_variant(key): value for key, value in (extra.get("compact") or {}).items()}
    if not scores:
        return ""
    full = max(d for d, _ in scores)
    whole = scores.get((full, "float"))
    floats = ", ".join(
        f"{d} {100 * v:.1f}" + (f" ({100 * v / whole:.0f}%)" if whole else "")
        for (d, p), v in sorted(scores.items())
        if p == "float"
    )
    coded = ", ".join(
        f"{p} {100 * v:.1f}" for (d, p), v in scores.items() if d == full and p != "float"
    )
    trained = extra.get("trained_dimensions") or []
    return (
        f"sizes (All, float; share of full): {floats}; at {full}: {coded or 'float only'}"
        f"{f'; trained {trained}' if trained else ''}\n"
    )


def _announce(ex: Execution, registered: dict[str, Any], report: dict[str, Any]) -> None:
    """Where to look: the model URI, the scores, the report, lineage and the MLflow UI."""
    scores, baseline = report["extra"]["scores"], report["extra"]["baseline"]
    tracking = ex.cfg.tracking.tracking_uri
    moved = decision_text(registered, _this_flow_run())
    champion = f"models:/{ex.cfg.tracking.registered_model}@champion"
    sets = "".join(f" --set {o}" for o in ex.overrides)
    ours = report["extra"].get("intervals", {})
    theirs = report["extra"].get("baseline_intervals", {})

    def shown(level: str, values: dict[str, float], intervals: dict[str, list[float]]) -> str:
        """A score with its 95% interval when the report has one: ``43.3 [38.0, 48.6]``."""
        bounds = intervals.get(level)
        around = "" if bounds is None else f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"
        return f"{100 * values[level]:.1f}{around}"

    metas = ", ".join(
        f"{m} {shown(m, scores, ours)} vs {shown(m, baseline, theirs)}"
        for m in ("Image", "Video", "VisDoc")
        if m in scores and m in baseline
    )
    gains = ", ".join(
        f"{level} {100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        for level, (mean, low, high) in report["extra"].get("gain_over_base", {}).items()
    )
    gain_line = f"gain over the untrained base (paired, 95%): {gains}\n" if gains else ""
    gain_line += compact_line(report["extra"])
    print(
        f"model: {registered['uri']} ({moved})\n"
        f"score All {shown('All', scores, ours)} (untrained base "
        f"{shown('All', baseline, theirs)}; 95% intervals); {metas}\n"
        f"{gain_line}"
        f"report: {report['extra']['markdown']}\n"
        f"leaderboard: {report['extra'].get('leaderboard', '-')}\n"
        f"lineage: rzenembed lineage {registered['uri']} --tracking-uri {tracking}\n"
        f"verify: rzenembed verify {registered['uri']} --tracking-uri {tracking}\n"
        f"browse: {browse_hint(tracking)}\n"
        f"serve: rzenembed serve --config {ex.config_path}{sets} "
        f"(follows {champion} on http://{ex.cfg.serve.host}:{ex.cfg.serve.port}; "
        f"--model {registered['uri']} pins this version)\n"
        f"query: curl -s {ex.cfg.serve.host}:{ex.cfg.serve.port}/v1/embeddings "
        f"""-d '{{"input": ["a red circle", {{"text": "a blue square"}}]}}'"""
    )
    if ex.cfg.serve.auth == "none":
        print(
            "keys: off (serve.auth: none; loopback only). Before a network can reach it: "
            "rzenembed api-key new runs/api-keys, then --set serve.auth=keys "
            "--set serve.api_keys_file=runs/api-keys (clients send Authorization: Bearer KEY)"
        )
