"""The whole data preparation of a config, as plain function calls (no orchestrator).

Per source (``source_steps``): ingest -> clean -> (recaption) -> cap, then the video step
(split clips | package long videos) when the source has one: the cap picks whole videos
before any is decoded, so a split decodes only the kept ones and a clip's siblings all stay.
Classification sources are then merged into one dataset. Finally each stage gets its data manifest:
stage 1 over the stage-1 sources (proportional to size), stage 2 once per configured
mixture. Every step returns a committed version, and a step whose inputs and config did
not change returns its existing version, so calling this twice does no work twice.
The Prefect flows run the same steps as tasks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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
from rzenembed.prep.video import run_extract_frames, run_package_long_videos, run_split_clips

# Sources whose steps a driver runs at once (each step's own tasks spread on the cluster).
MAX_SOURCES_AT_ONCE = 16


@dataclass
class PreparedData:
    """Every version produced, by dataset and step, plus the stage manifests."""

    versions: dict[str, dict[str, DatasetVersion]] = field(default_factory=dict)
    final: dict[str, DatasetVersion] = field(default_factory=dict)
    stages: dict[str, StageManifest] = field(default_factory=dict)


def source_steps(source: SourceConfig) -> list[str]:
    """The preparation steps of ``source``, in order; the last one's version is final."""
    steps = ["ingest", "clean"]
    if source.recaption:
        steps.append("recaption")
    steps.append("cap")
    if source.video == "split-clips":
        steps.append("split-clips")
    elif source.video == "package-long":
        steps.append("package-long-videos")
    elif source.video == "frames":
        steps.append("extract-frames")
    return steps


def prepare_source(
    cfg: PipelineConfig, source: SourceConfig, base: str | None = None, show_progress: bool = True
) -> dict[str, DatasetVersion]:
    """``source_steps`` of one source; versions by step."""
    captions = data_location(cfg.data_root, source.captions, base) if source.captions else None
    run = {
        "clean": lambda v: run_clean(cfg, v, show_progress),
        "recaption": lambda v: run_recaption(cfg, v, show_progress, captions=captions),
        "cap": lambda v: run_cap(cfg, v, show_progress=show_progress),
        "split-clips": lambda v: run_split_clips(cfg, v, show_progress),
        "package-long-videos": lambda v: run_package_long_videos(cfg, v, show_progress),
        "extract-frames": lambda v: run_extract_frames(cfg, v, show_progress),
    }
    current = run_ingest(cfg, source, base, show_progress)
    steps = {"ingest": current}
    for step in source_steps(source)[1:]:
        current = steps[step] = run[step](current)
    return steps


def prepare_all(
    cfg: PipelineConfig, base: str | None = None, show_progress: bool = True
) -> PreparedData:
    """Prepare every configured source (concurrently) and write the stage manifests."""
    ensure_ray(address=cfg.compute.ray_address)
    out = PreparedData()
    # Sources side by side, as the Prefect flow runs them: one source's map leaves slots
    # free (25 shards on 48 slots) that another's tasks fill. A failed source lets the
    # others finish (committed, found again by the rerun), then raises.
    with ThreadPoolExecutor(max(1, min(len(cfg.sources), MAX_SOURCES_AT_ONCE))) as pool:
        futures = {
            s.name: pool.submit(prepare_source, cfg, s, base, show_progress) for s in cfg.sources
        }
    out.versions = {name: future.result() for name, future in futures.items()}
    last = {s.name: out.versions[s.name][source_steps(s)[-1]] for s in cfg.sources}
    classification = [last[s.name] for s in cfg.sources if s.classification]
    for source in cfg.sources:
        if not source.classification:
            out.final[source.name] = last[source.name]
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
    stage2 = {
        n: v for n, v in final.items() if n == merged_name or by_stage.get(n) in ("stage2", "both")
    }
    with ThreadPoolExecutor(len(cfg.stage2.mixtures) + 1) as pool:  # built side by side
        pending = {}
        if stage1:
            pending["stage1"] = pool.submit(run_mixture, cfg, "stage1", stage1)
        for mixture in cfg.stage2.mixtures:
            name = f"stage2/{mixture.name}"
            pending[name] = pool.submit(run_mixture, cfg, "stage2", stage2, mixture)
    return {name: future.result() for name, future in pending.items()}
