"""Data-preparation tasks: one per step, each a thin wrapper over the library's ``run_<step>``.

Every task takes and returns lineage ref dicts (URI, digest, producing MLflow run), fans its
shards out on Ray through the library (as a Ray Job on a cluster: ``run_in_job``), and opens
one MLflow child run recording the config section, the input versions and the output version
with its row and reject counts.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from rzenembed.config import PipelineConfig
from rzenembed.data.importers import source_listing_digest, source_uri
from rzenembed.data.version import DatasetVersion
from rzenembed.prep.cap import run_cap
from rzenembed.prep.clean import dedup_policy, run_clean
from rzenembed.prep.decontaminate import decontamination_sets, eval_keys_digest, set_refs
from rzenembed.prep.ingest import run_ingest
from rzenembed.prep.merge import run_merge_classification
from rzenembed.prep.mixture import run_mixture
from rzenembed.prep.recaption import captions_source, run_recaption
from rzenembed.prep.video import run_extract_frames, run_package_long_videos, run_split_clips
from rzenembed.tracking import LineageRef
from tasks.common import (
    RETRIES,
    RunContext,
    as_ref,
    eval_sets_ref,
    keyed,
    run_in_job,
    step_run,
    version_ref,
    with_job,
)


def _prep_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    return {"prep": cfg.prep.model_dump(mode="json"), "storage": cfg.storage.root}


def _input_digests(p: dict[str, Any]) -> list[str]:
    refs = p.get("refs") or [p["ref"]]
    return [r["digest"] for r in refs]


def _open(cfg: PipelineConfig, ref: dict[str, Any]) -> DatasetVersion:
    return DatasetVersion.open(ref["uri"], cfg.storage.endpoint_url)


def _counts_artifact(ref: dict[str, Any]) -> None:
    extra = ref["extra"]
    rows = [
        {
            "dataset": extra["dataset"],
            "step": extra["step"],
            "rows": extra["rows"],
            "rejected": extra["rejected"],
            **{f"rejected: {k}": v for k, v in sorted(extra["reject_counts"].items())},
        }
    ]
    create_table_artifact(rows, description=f"{extra['dataset']} / {extra['step']}: rows kept "
                          "and rejected by reason")  # fmt: skip


def _ingest_key_inputs(p: dict[str, Any]) -> list[str]:
    cfg: PipelineConfig = p["cfg"]
    source = cfg.source(p["source_name"])
    uri = source_uri(source, p.get("base"), cfg.data_root)
    # The listing (names, sizes, ETags or mtimes), not the bytes: the Prefect worker reads
    # nothing; the ingest step hashes the data files on the workers.
    return [source_listing_digest(uri, cfg.storage.endpoint_url), source.model_dump_json()]


@task(name="ingest", cache_key_fn=keyed("ingest", _prep_section, _ingest_key_inputs),
      persist_result=True, **RETRIES)  # fmt: skip
def ingest(
    cfg: PipelineConfig, source_name: str, base: str | None, ctx: RunContext
) -> dict[str, Any]:
    """Raw source -> validated records (rejects with reasons)."""
    source = cfg.source(source_name)
    section = {"source": source.model_dump(mode="json"), **_prep_section({"cfg": cfg})}
    with step_run(cfg, ctx, "ingest", f"ingest {source_name}", section) as (tracker, run_id):
        ran = run_in_job(cfg, "ingest", run_ingest, cfg, source, base, show_progress=False)
        version = ran.value
        raw = version.manifest.inputs[0]
        inputs = [LineageRef("raw", source_name, raw.uri, raw.content_digest)]
        out = with_job(version_ref(version, run_id=run_id), ran)
        tracker.record_lineage(run_id, "ingest", inputs, [as_ref(out)])
    _counts_artifact(out)
    return out


def _single_step(step: str, fn):
    @task(name=step, cache_key_fn=keyed(step, _prep_section, _input_digests),
          persist_result=True, **RETRIES)  # fmt: skip
    def run(cfg: PipelineConfig, ref: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        name = f"{step} {ref['extra']['dataset']}"
        with step_run(cfg, ctx, step, name, _prep_section({"cfg": cfg})) as (tracker, run_id):
            ran = run_in_job(cfg, step, fn, cfg, _open(cfg, ref), show_progress=False)
            out = with_job(version_ref(ran.value, run_id=run_id), ran)
            tracker.record_lineage(run_id, step, [as_ref(ref)], [as_ref(out)])
        _counts_artifact(out)
        return out

    run.__doc__ = f"The {step} step of one dataset version."
    return run


def _clean_section(p: dict[str, Any]) -> dict[str, Any]:
    """What clean decides with beyond the prep section: the source's dedup policy and the
    content of the evaluation sets it decontaminates against."""
    cfg: PipelineConfig = p["cfg"]
    endpoint = cfg.storage.endpoint_url
    sets = set_refs(decontamination_sets(cfg), endpoint)
    return {
        **_prep_section(p),
        "dedup": dedup_policy(cfg, p["ref"]["extra"]["dataset"]),
        "eval_keys": eval_keys_digest(sets, endpoint) if sets else None,
    }


@task(
    name="clean",
    cache_key_fn=keyed("clean", _clean_section, _input_digests),
    persist_result=True,
    **RETRIES,
)
def clean(cfg: PipelineConfig, ref: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Bad media, copies of evaluation items and duplicate examples out of one version."""
    section = _clean_section({"cfg": cfg, "ref": ref})
    with step_run(cfg, ctx, "clean", f"clean {ref['extra']['dataset']}", section) as (
        tracker,
        run_id,
    ):
        ran = run_in_job(cfg, "clean", run_clean, cfg, _open(cfg, ref), show_progress=False)
        version = ran.value
        out = with_job(version_ref(version, run_id=run_id), ran)
        inputs = [as_ref(ref)]
        against = version.manifest.stats.get("decontaminated_against")
        if against:
            inputs.append(eval_sets_ref(against))
        tracker.record_lineage(run_id, "clean", inputs, [as_ref(out)])
    _counts_artifact(out)
    return out


def _captions_of(cfg: PipelineConfig, ref: dict[str, Any]) -> str | None:
    """The source's side-file captions folder (absolute after ``resolve_paths``), if any."""
    return cfg.source(ref["extra"]["dataset"]).captions


def _recaption_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    _, location, digest = captions_source(cfg, _captions_of(cfg, p["ref"]))
    return {**_prep_section(p), "captioner": digest, "captions_from": location}


@task(name="recaption", persist_result=True,
      cache_key_fn=keyed("recaption", _recaption_section, _input_digests), **RETRIES)  # fmt: skip
def recaption(cfg: PipelineConfig, ref: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Rewrite the image captions of one dataset version with the captioning model."""
    name = f"recaption {ref['extra']['dataset']}"
    section = {**_prep_section({"cfg": cfg}), "recaption": cfg.prep.recaption.model_dump(
        mode="json")}  # fmt: skip
    with step_run(cfg, ctx, "recaption", name, section) as (tracker, run_id):
        captions = _captions_of(cfg, ref)
        ran = run_in_job(cfg, "recaption", run_recaption, cfg, _open(cfg, ref),
                         show_progress=False, captions=captions)  # fmt: skip
        version = ran.value
        captioner = version.manifest.stats["captioner"]
        if captions:  # captions produced elsewhere: a raw source of its own in the lineage
            model = LineageRef("raw", "captions", captioner["path"], captioner["digest"])
        else:
            model = LineageRef(
                "model",
                "captioner",
                captioner["path"],
                captioner["digest"],
                extra={"digest_of": "weights"},
            )
        out = with_job(version_ref(version, run_id=run_id), ran)
        tracker.record_lineage(run_id, "recaption", [as_ref(ref), model], [as_ref(out)])
    _counts_artifact(out)
    return out


split_clips = _single_step("split-clips", run_split_clips)
package_long_videos = _single_step("package-long-videos", run_package_long_videos)
extract_frames = _single_step("extract-frames", run_extract_frames)
cap = _single_step("cap", run_cap)


@task(name="merge-classification", persist_result=True,
      cache_key_fn=keyed("merge-classification", _prep_section, _input_digests),
      **RETRIES)  # fmt: skip
def merge_classification(
    cfg: PipelineConfig, refs: list[dict[str, Any]], ctx: RunContext
) -> dict[str, Any]:
    """Every classification source -> one merged dataset (shared labels are one item)."""
    section = _prep_section({"cfg": cfg})
    with step_run(cfg, ctx, "merge-classification", "merge classification", section) as (
        tracker,
        run_id,
    ):
        versions = [_open(cfg, r) for r in refs]
        ran = run_in_job(cfg, "merge-classification", run_merge_classification, cfg, versions,
                         show_progress=False)  # fmt: skip
        out = with_job(version_ref(ran.value, run_id=run_id), ran)
        tracker.record_lineage(run_id, "merge-classification", [as_ref(r) for r in refs],
                               [as_ref(out)])  # fmt: skip
    _counts_artifact(out)
    return out


def _mixture_section(p: dict[str, Any]) -> dict[str, Any]:
    cfg: PipelineConfig = p["cfg"]
    mixture = p.get("mixture_name")
    weights, negatives = None, None
    if mixture:
        config = next(m for m in cfg.stage2.mixtures if m.name == mixture)
        weights, negatives = config.datasets, config.negatives
    return {
        **_prep_section(p),
        "stage": p["stage"],
        "mixture": mixture,
        "weights": weights,
        "negatives": negatives,
    }


def _final_digests(p: dict[str, Any]) -> list[str]:
    return [f"{name}:{r['digest']}" for name, r in sorted(p["finals"].items())]


@task(name="mixture", persist_result=True,
      cache_key_fn=keyed("mixture", _mixture_section, _final_digests), **RETRIES)  # fmt: skip
def mixture(
    cfg: PipelineConfig, stage: str, mixture_name: str | None, finals: dict[str, dict[str, Any]],
    ctx: RunContext,
) -> dict[str, Any]:  # fmt: skip
    """The stage's data manifest: its datasets and their sampling probabilities."""
    config = next((m for m in cfg.stage2.mixtures if m.name == mixture_name), None)
    label = f"{stage}/{mixture_name}" if mixture_name else stage
    section = _mixture_section({"cfg": cfg, "stage": stage, "mixture_name": mixture_name})
    with step_run(cfg, ctx, "mixture", f"mixture {label}", section) as (tracker, run_id):
        versions = {name: _open(cfg, r) for name, r in finals.items()}
        ran = run_in_job(cfg, "mixture", run_mixture, cfg, stage, versions, config)
        manifest = ran.value
        out = LineageRef(
            "stage-manifest", label, manifest.uri, manifest.digest, run_id,
            extra={"probabilities": {d.dataset: d.probability for d in manifest.datasets}},
        ).to_json()  # fmt: skip
        out = with_job(out, ran)
        tracker.record_lineage(run_id, "mixture", [as_ref(r) for r in finals.values()],
                               [as_ref(out)])  # fmt: skip
    return out
