"""The whole data preparation of a config, as plain function calls (no orchestrator).

Per source: ingest -> clean -> (recaption) -> (split clips | package long videos) -> cap.
Classification sources are then merged into one dataset. Finally each stage gets its data manifest:
stage 1 over the stage-1 sources (proportional to size), stage 2 once per configured
mixture. Every step returns a committed version, and a step whose inputs and config did
not change returns its existing version, so calling this twice does no work twice.
The Prefect flows run the same steps as tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rzenembed.compute.connect import ensure_ray
from rzenembed.config import PipelineConfig, SourceConfig, data_location
from rzenembed.data.version import DatasetVersion
from rzenembed.prep.cap import run_cap
from rzenembed.prep.clean import run_clean
from rzenembed.prep.ingest import run_ingest
from rzenembed.prep.merge import run_merge_classification
from rzenembed.prep.mixture import StageManifest, run_mixture
from rzenembed.prep.recaption import run_recaption
from rzenembed.prep.video import run_package_long_videos, run_split_clips


@dataclass
class PreparedData:
    """Every version produced, by dataset and step, plus the stage manifests."""

    versions: dict[str, dict[str, DatasetVersion]] = field(default_factory=dict)
    final: dict[str, DatasetVersion] = field(default_factory=dict)
    stages: dict[str, StageManifest] = field(default_factory=dict)


def prepare_source(
    cfg: PipelineConfig, source: SourceConfig, base: str | None = None, show_progress: bool = True
) -> dict[str, DatasetVersion]:
    """ingest -> clean -> recaption (if asked) -> video step (if any) -> cap for one source;
    versions by step."""
    steps = {"ingest": run_ingest(cfg, source, base, show_progress)}
    steps["clean"] = run_clean(cfg, steps["ingest"], show_progress)
    current = steps["clean"]
    if source.recaption:
        captions = data_location(cfg.data_root, source.captions, base) if source.captions else None
        current = steps["recaption"] = run_recaption(cfg, current, show_progress, captions=captions)
    if source.video == "split-clips":
        current = steps["split-clips"] = run_split_clips(cfg, current, show_progress)
    elif source.video == "package-long":
        current = steps["package-long-videos"] = run_package_long_videos(
            cfg, current, show_progress
        )
    steps["cap"] = run_cap(cfg, current, show_progress=show_progress)
    return steps


def prepare_all(
    cfg: PipelineConfig, base: str | None = None, show_progress: bool = True
) -> PreparedData:
    """Prepare every configured source and write the stage manifests."""
    ensure_ray(address=cfg.compute.ray_address)
    out = PreparedData()
    for source in cfg.sources:
        out.versions[source.name] = prepare_source(cfg, source, base, show_progress)
    classification = [out.versions[s.name]["cap"] for s in cfg.sources if s.classification]
    for source in cfg.sources:
        if not source.classification:
            out.final[source.name] = out.versions[source.name]["cap"]
    if classification:
        merged = run_merge_classification(cfg, classification, show_progress)
        out.final[cfg.prep.classification_dataset] = merged
    out.stages = stage_manifests(cfg, out.final)
    return out


def stage_manifests(
    cfg: PipelineConfig, final: dict[str, DatasetVersion]
) -> dict[str, StageManifest]:
    by_stage = {s.name: s.stage for s in cfg.sources}
    merged_name = cfg.prep.classification_dataset
    stage1 = {n: v for n, v in final.items() if by_stage.get(n) in ("stage1", "both")}
    stages: dict[str, StageManifest] = {}
    if stage1:
        stages["stage1"] = run_mixture(cfg, "stage1", stage1)
    stage2 = {
        n: v for n, v in final.items() if n == merged_name or by_stage.get(n) in ("stage2", "both")
    }
    for mixture in cfg.stage2.mixtures:
        stages[f"stage2/{mixture.name}"] = run_mixture(cfg, "stage2", stage2, mixture)
    return stages
