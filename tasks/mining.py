"""The mining task: stage-2 datasets -> the same rows with negatives mined by stage 1's model.

Cached on the input versions' digests, the merged stage-1 model's digest and the
``mining`` section; one MLflow child run records the inputs (every dataset version and the
model that mined them), the mined versions, each dataset's figures as metrics and its
report as artifacts; the flow's log gets one line per dataset.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from rzenembed.config import PipelineConfig
from rzenembed.data.folders import read_bytes, read_text
from rzenembed.data.storage import join
from rzenembed.data.version import DatasetVersion
from rzenembed.mining.report import REPORT_FILES, one_line
from rzenembed.mining.step import mine_step
from tasks.common import RETRIES, RunContext, as_ref, keyed, run_in_job, step_run, version_ref


def _mining_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    return {
        "mining": cfg.mining.model_dump(mode="json"),
        "seed": cfg.seed,
        "frames": cfg.model.video_frames,
        "storage": cfg.storage.root,
    }


def _mining_inputs(p: dict[str, Any]) -> list[str]:
    finals = [f"{name}:{r['digest']}" for name, r in sorted(p["finals"].items())]
    return [*finals, f"model:{p['model']['digest']}"]


@task(
    name="mine",
    persist_result=True,
    cache_key_fn=keyed("mine", _mining_section, _mining_inputs),
    **RETRIES,
)
def mine_negatives(
    cfg: PipelineConfig,
    finals: dict[str, dict[str, Any]],
    model: dict[str, Any],
    ctx: RunContext,
) -> dict[str, dict[str, Any]]:
    """Every stage-2 dataset version in ``finals`` mined with ``model`` (the merged
    stage-1 model's ref); the mined versions' refs by dataset name."""
    endpoint = cfg.storage.endpoint_url
    section = _mining_section({"cfg": cfg})
    with step_run(cfg, ctx, "mine", "mine hard negatives", section) as (tracker, run_id):
        versions = {name: ref["uri"] for name, ref in finals.items()}
        target = {"uri": model["uri"], "digest": model["digest"]}
        ran = run_in_job(cfg, "mine", mine_step, cfg, versions, target)
        out: dict[str, dict[str, Any]] = {}
        metrics = []
        for name, mined in sorted(ran.value.items()):
            version = DatasetVersion.open(mined["uri"], endpoint)
            ref = version_ref(version, run_id=run_id)
            ref["extra"]["mining"] = {
                k: mined["report"][k]
                for k in ("negatives_per_query", "short_queries", "removed", "scores")
            }
            out[name] = ref
            report = mined["report"]
            print(one_line(report) + (" (found mined)" if mined["reused"] else ""))
            metrics += [
                (f"mine/{name}/removed/{k}", float(v), 0) for k, v in report["removed"].items()
            ]
            metrics += [
                (f"mine/{name}/score/{k}", float(s["mean"]), 0)
                for k, s in report["scores"].items()
                if s.get("count")
            ]
            metrics.append((f"mine/{name}/negatives_per_query", report["negatives_per_query"], 0))
            folder = join(mined["uri"], "report")
            tracker.log_text(
                run_id,
                f"{name}.md",
                read_text(join(folder, REPORT_FILES["markdown"]), endpoint),
                "mining",
            )
            tracker.log_bytes(
                run_id,
                f"{name}.png",
                read_bytes(join(folder, REPORT_FILES["png"]), endpoint),
                "mining",
            )
        tracker.log_metrics(run_id, metrics)
        inputs = [as_ref(r) for r in finals.values()] + [as_ref(model)]
        tracker.record_lineage(run_id, "mine", inputs, [as_ref(r) for r in out.values()])
    create_markdown_artifact(
        "\n".join(f"- {one_line(r['report'])}" for r in ran.value.values()),
        key="mining",
        description="hard negatives mined with the stage-1 model, per dataset",
    )
    return out
