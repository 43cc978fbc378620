"""Model tasks: soup the stage-2 adapters, evaluate, register and gate the champion."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data.storage import join
from rzenembed.evaluation import discover, evaluate, write_report
from rzenembed.evaluation.report import levels
from rzenembed.identity import json_file_digest
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.modeling.digest import file_digest, folder_digest
from rzenembed.soup import soup
from rzenembed.tracking import LineageRef
from rzenembed.training.stages import output_root
from tasks.common import RETRIES, RunContext, as_ref, keyed, step_run

CHAMPION_LEVELS = {"all": "All", "image": "Image", "video": "Video", "visdoc": "VisDoc"}


def eval_set_paths(cfg: PipelineConfig, base: str | None) -> list[str]:
    """The configured evaluation sets, relative ones resolved like sources."""
    if not cfg.eval.sets:
        raise ValueError("eval.sets is empty: name at least one evaluation set folder")
    out = []
    for uri in cfg.eval.sets:
        local = base is not None and "://" not in uri and not uri.startswith("/")
        out.append(join(base, uri) if local else uri)
    return out


def eval_sets_digest(paths: list[str]) -> str:
    """Content digest of every evaluation table (media are named by them)."""
    h = hashlib.sha256()
    for path in paths:
        for folder in discover(path):
            for table in sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.parquet")):
                h.update(f"{folder.name}/{table.name}:{file_digest(table)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- soup


def _soup_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    return {"soup": cfg.soup.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json"),
            "storage": cfg.storage.root, "name": cfg.name}  # fmt: skip


def _weights(cfg: PipelineConfig, adapters: list[dict[str, Any]]) -> list[float] | None:
    if cfg.soup.weights is None:
        return None
    mixtures = [a["extra"]["mixture"] for a in adapters]
    missing = sorted(set(mixtures) - set(cfg.soup.weights))
    if missing:
        raise ValueError(f"soup.weights has no weight for mixtures {missing}")
    return [cfg.soup.weights[m] for m in mixtures]


@task(name="soup", persist_result=True,
      cache_key_fn=keyed("soup", _soup_section,
                         lambda p: [a["digest"] for a in p["adapters"]]), **RETRIES)  # fmt: skip
def soup_adapters(
    cfg: PipelineConfig, adapters: list[dict[str, Any]], base: str | None, ctx: RunContext
) -> dict[str, Any]:
    """The stage-2 adapters -> one merged model (a LoggedModel naming its adapters)."""
    section = _soup_section({"cfg": cfg})
    with step_run(cfg, ctx, "soup", f"soup ({cfg.soup.method})", section) as (tracker, run_id):
        key = digest_of([section, [a["digest"] for a in adapters]])[:12]
        out_dir = output_root(cfg, None) / f"soup-{key}"
        if not ModelCard.exists(out_dir):
            score = None
            if cfg.soup.method == "greedy":
                sets = eval_set_paths(cfg, base)

                def score(embedder: RzenEmbedder) -> float:
                    results = evaluate(
                        embedder,
                        sets,
                        batch_size=cfg.eval.batch_size,
                        datasets=cfg.eval.datasets,
                        ndcg_k=cfg.eval.ndcg_k,
                    )
                    return sum(r.score for r in results) / len(results)  # fmt: skip

            soup([a["uri"] for a in adapters], out_dir, cfg.soup.method, _weights(cfg, adapters),
                 cfg.soup.normalize, score)  # fmt: skip
        recipe = ModelCard.load(out_dir).extra["soup"]
        tracker.log_json(run_id, "soup_recipe.json", recipe)
        digest = folder_digest(out_dir)
        model_id = tracker.log_model(
            run_id, "souped", out_dir, "souped-model",
            params={"method": cfg.soup.method, "adapters": len(adapters)},
            tags={"rzenembed.digest": digest}, upload=cfg.tracking.upload_models,
        )  # fmt: skip
        kept = [a["name"] for a in recipe["adapters"] if a["kept"]]
        out = LineageRef("model", "souped", str(out_dir.resolve()), digest, run_id, model_id,
                         extra={"method": cfg.soup.method, "kept": kept}).to_json()  # fmt: skip
        tracker.record_lineage(run_id, "soup", [as_ref(a) for a in adapters], [as_ref(out)])
    return out


# --------------------------------------------------------------------------- evaluate


def _eval_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    return {"eval": cfg.eval.model_dump(mode="json"), "storage": cfg.storage.root,
            "name": cfg.name}  # fmt: skip


def _eval_inputs(p: dict[str, Any]) -> list[str]:
    return [p["model"]["digest"], p["baseline"]["digest"],
            eval_sets_digest(eval_set_paths(p["cfg"], p.get("base")))]  # fmt: skip


def _scores(cfg: PipelineConfig, model_dir: str, sets: list[str], digest: str, cache: Path):
    embedder = RzenEmbedder.from_pretrained(model_dir, config=None if ModelCard.exists(
        model_dir) else cfg.model)  # fmt: skip
    return evaluate(embedder, sets, model_digest=digest, cache_dir=cache,
                    batch_size=cfg.eval.batch_size, max_frames=cfg.model.video_frames,
                    ndcg_k=cfg.eval.ndcg_k, datasets=cfg.eval.datasets)  # fmt: skip


@task(name="evaluate", persist_result=True,
      cache_key_fn=keyed("evaluate", _eval_section, _eval_inputs), **RETRIES)  # fmt: skip
def evaluate_model(
    cfg: PipelineConfig, model: dict[str, Any], baseline: dict[str, Any], base: str | None,
    ctx: RunContext,
) -> dict[str, Any]:  # fmt: skip
    """MMEB-style scores of ``model``, with the untrained ``baseline`` as the delta column."""
    sets = eval_set_paths(cfg, base)
    with step_run(cfg, ctx, "evaluate", "evaluate", _eval_section({"cfg": cfg})) as (
        tracker,
        run_id,
    ):
        root = output_root(cfg, None)
        out = root / f"eval-{model['digest'][:12]}"
        cache = root / "_embedding_cache"
        base_scores = _scores(cfg, baseline["uri"], sets, baseline["digest"], cache)
        base_paths = write_report(
            base_scores, out / "baseline", {"path": baseline["uri"], "digest": baseline["digest"]}
        )
        scores = _scores(cfg, model["uri"], sets, model["digest"], cache)
        paths = write_report(scores, out, {"path": model["uri"], "digest": model["digest"]},
                             previous=base_paths["json"])  # fmt: skip
        report = json.loads(paths["json"].read_text())
        for path in paths.values():
            tracker.log_file(run_id, path, "report")
        now = levels(report)
        tracker.log_metrics(run_id, [(f"eval/{k.replace(':', '/')}", v, 0) for k, v in
                                     now.items()])  # fmt: skip
        create_markdown_artifact(
            paths["markdown"].read_text(),
            key="evaluation-report",
            description="MMEB-style scores; Δ against the untrained base",
        )
        digest = json_file_digest(paths["json"])  # scores and model digest, not paths/time
        ref = LineageRef("report", "evaluation", str(paths["json"].resolve()), digest, run_id,
                         extra={"scores": now, "baseline": levels(json.loads(
                             base_paths["json"].read_text())),
                                "markdown": str(paths["markdown"].resolve()),
                                "png": str(paths["png"].resolve())}).to_json()  # fmt: skip
        tracker.record_lineage(run_id, "evaluate", [as_ref(model), as_ref(baseline)],
                               [as_ref(ref)])  # fmt: skip
    return ref


# --------------------------------------------------------------------------- register


def _verdict(decision: dict[str, Any], version: str) -> str:
    if decision.get("already_champion"):
        return f"The same model (same digest) is already the champion, v{version}"
    if decision["promoted"]:
        return f"Champion moved to v{version}"
    return f"Champion stays at v{decision['champion_version']}"


def champion_level(metric: str) -> str:
    """``eval.champion_metric`` -> a report level (All, Image, Image/CLS, dataset:NAME)."""
    return CHAMPION_LEVELS.get(metric.lower(), metric)


@task(name="register", persist_result=True,
      cache_key_fn=keyed("register", lambda p: {"tracking": p["cfg"].tracking.model_dump(
          mode="json"), "metric": p["cfg"].eval.champion_metric,
          "margin": p["cfg"].eval.min_improvement},
          lambda p: [p["model"]["digest"], p["report"]["digest"]]), **RETRIES)  # fmt: skip
def register_model(
    cfg: PipelineConfig, model: dict[str, Any], report: dict[str, Any], ctx: RunContext
) -> dict[str, Any]:
    """Register the souped model (alias ``candidate``); move ``champion`` only if it is better."""
    level = champion_level(cfg.eval.champion_metric)
    scores = report["extra"]["scores"]
    if level not in scores:
        raise ValueError(f"eval.champion_metric {cfg.eval.champion_metric!r}: the report has "
                         f"no level {level!r}; it has {sorted(scores)}")  # fmt: skip
    section = {"tracking": cfg.tracking.model_dump(mode="json"), "metric": level}
    with step_run(cfg, ctx, "register", "register", section) as (tracker, run_id):
        version, reused = tracker.register(
            model["model_id"], run_id, model["digest"], {"rzenembed.report": report["uri"]}
        )
        if reused:
            print(f"model digest {model['digest'][:12]} is already registered as version "
                  f"{version}; reusing it")  # fmt: skip
        decision = tracker.promote_if_better(
            version, level, float(scores[level]), cfg.eval.min_improvement
        )
        tracker.log_json(run_id, "promotion.json", decision)
        uri = f"models:/{cfg.tracking.registered_model}/{version}"
        out = LineageRef(
            "registered-model",
            f"{cfg.tracking.registered_model} v{version}",
            uri,
            model["digest"],
            run_id,
            model["model_id"],
            extra={"version": version, "decision": decision, "reused": reused},
        ).to_json()
        tracker.record_lineage(run_id, "register", [as_ref(model), as_ref(report)], [as_ref(out)])
    champion = decision["champion_score"]
    create_markdown_artifact(
        f"# Registration\n\n{uri} (alias `candidate`)\n\n| model | {level} |\n|---|---|\n"
        f"| candidate v{version} | {100 * decision['candidate_score']:.1f} |\n"
        f"| champion {decision['champion_version'] or '(none)'} | "
        f"{'–' if champion is None else f'{100 * champion:.1f}'} |\n\n"
        f"{_verdict(decision, version)}.\n",
        key="registration", description="candidate against champion",
    )  # fmt: skip
    return out
