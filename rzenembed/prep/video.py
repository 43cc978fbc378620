"""Video steps: split long videos into clips, and package 1-3 minute videos whole.

*Split clips.* The recipe makes video training harder by cutting long videos into clips:
clips of one source then look alike and serve as each other's hard negatives. A video is
cut along its timestamped, captioned ``segments`` when the record has them (each clip is
paired with its own caption), else into fixed ``prep.clip_seconds`` windows (a tail
shorter than ``prep.clip_min_s`` is dropped) paired with the record's text. Siblings share
``group_id = "video:<source id>"`` and each clip lists up to ``prep.clip_hard_negatives``
neighbouring siblings as explicit negatives, by reference to their rows (``ref``: the
frames are stored once, in the sibling's own row). The manifest marks such groups as
``group_semantics: siblings`` (hard negatives), unlike merged classification where a
shared group means "the same item" (never a negative).

*Package long videos.* Videos between ``prep.long_video_min_s`` and ``prep.long_video_max_s``
with a full description become one record each, frames sampled over the whole video.

*Extract frames.* For the other video sources (video QA, video captions): every video item
of a row, query, positive and inline negatives alike, becomes its frames, sampled over the
item's span (``start_s``/``end_s``: the whole video as ingest stamps it). Rows keep their
number and ids; a video several rows ask about is decoded once per task.

In both, frames are sampled uniformly (segment centres) inside the clip, decoded with decord
once, resized to the size the model's video processor would give them and stored inline as
JPEG bytes in the record. Size and count come from ``media.VideoBudget`` over
``model.video_frames`` and the visual-token budget, the same numbers training and
evaluation use, so a clip is stored as the model will see it (docs/data.md
gives the measurement behind storing frames rather than re-decoding video at train time).
"""

from __future__ import annotations

from typing import Any

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.schema import media, reference
from rzenembed.data.storage import resolve_media_uri
from rzenembed.data.version import DatasetVersion
from rzenembed.modeling.backbones import configured_backbone
from rzenembed.prep.base import (
    ShardJob,
    committed,
    execute,
    media_root_of,
    per_shard_jobs,
    plan_step,
    reject,
)
from rzenembed.prep.ingest import RowError, read_media

SPLIT_STEP = "split-clips"
PACKAGE_STEP = "package-long-videos"
FRAMES_STEP = "extract-frames"
CODE_VERSION = "2"  # 2: frames resized to the video budget; sibling negatives by reference


def _knobs(cfg: PipelineConfig) -> dict[str, Any]:
    prep = cfg.prep
    return {
        "clip_seconds": prep.clip_seconds,
        "clip_min_s": prep.clip_min_s,
        "clip_hard_negatives": prep.clip_hard_negatives,
        "video_frames": cfg.model.video_frames,
        "min_visual_tokens": cfg.model.min_visual_tokens,
        "jpeg_quality": prep.frame_jpeg_quality,
        "long_video_min_s": prep.long_video_min_s,
        "long_video_max_s": prep.long_video_max_s,
        "videos_per_shard": prep.videos_per_shard,
        "max_visual_tokens": cfg.model.max_visual_tokens,
        # Frames are stored at the size the model's processor will keep: its patch decides
        # the token grid (14 px for Qwen2-VL and Qwen2.5-VL, 16 px for Qwen3-VL).
        "patch": configured_backbone(cfg.model.family, cfg.model.name_or_path).patch_size,
    }


def _run(
    cfg: PipelineConfig,
    version: DatasetVersion,
    step: str,
    fn,
    semantics: str | None,
    show_progress: bool,
) -> DatasetVersion:
    """``fn`` over every shard (``semantics``: the output's group semantics; None keeps
    the input's)."""
    knobs = _knobs(cfg)
    plan = plan_step(
        cfg, step, version.manifest.dataset, CODE_VERSION, digest_of(knobs), [version.ref()]
    )
    if (done := committed(plan, cfg)) is not None:
        return done
    root = media_root_of(version)
    params = {"root": root, "knobs": knobs, "endpoint_url": cfg.storage.endpoint_url}

    def jobs(staging: str) -> list[ShardJob]:
        return per_shard_jobs(
            version,
            staging,
            step,
            fn,
            params,
            cfg.storage.endpoint_url,
            rows_per_job=cfg.prep.videos_per_shard,
        )

    return execute(
        plan,
        cfg,
        jobs,
        stats={
            "group_semantics": semantics or version.manifest.stats.get("group_semantics", "none")
        },
        media_root=root,
        show_progress=show_progress,
    )


def run_split_clips(
    cfg: PipelineConfig, version: DatasetVersion, show_progress: bool = True
) -> DatasetVersion:
    return _run(cfg, version, SPLIT_STEP, split_rows, "siblings", show_progress)


def run_package_long_videos(
    cfg: PipelineConfig, version: DatasetVersion, show_progress: bool = True
) -> DatasetVersion:
    return _run(cfg, version, PACKAGE_STEP, package_rows, "none", show_progress)


def run_extract_frames(
    cfg: PipelineConfig, version: DatasetVersion, show_progress: bool = True
) -> DatasetVersion:
    return _run(cfg, version, FRAMES_STEP, frame_rows, None, show_progress)


# --------------------------------------------------------------------------- helpers


def find_video(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The side holding the row's video ("positive" preferred) and the media item."""
    for where in ("positive", "query"):
        for item in row[where].get("media") or []:
            if item["kind"] == "video":
                return where, item
    raise RowError("no_video", "the row has no video media item")


def clip_windows(
    duration: float, segments: list[dict] | None, clip_s: float, min_s: float
) -> list[tuple[float, float, str | None]]:
    """(start, end, caption) of each clip: the segments, or fixed windows over the video."""
    if segments:
        windows = []
        for seg in sorted(segments, key=lambda s: s["start_s"]):
            start, end = max(0.0, seg["start_s"]), min(duration, seg["end_s"])
            if end - start >= min_s:
                windows.append((start, end, seg.get("text")))
        return windows
    windows, start = [], 0.0
    while start < duration:
        end = min(start + clip_s, duration)
        if end - start >= min_s or not windows:
            windows.append((start, end, None))
        start = end
    return windows


def sample_clip(
    data: bytes,
    info: media_ops.VideoInfo,
    uri: str,
    start: float,
    end: float,
    knobs: dict[str, Any],
) -> dict[str, Any]:
    """A ``frames`` media item: uniformly sampled frames of [start, end) as JPEG bytes."""
    budget = media_ops.VideoBudget(
        frames=knobs["video_frames"],
        max_visual_tokens=knobs["max_visual_tokens"],
        min_visual_tokens=knobs["min_visual_tokens"],
        patch=knobs.get("patch", 14),
    )
    times = media_ops.frame_timestamps(start, end, budget.frame_count(info.width, info.height))
    images = media_ops.resize_frames(
        media_ops.decode_frames(data, times), budget.frame_size(info.width, info.height)
    )
    frames = media_ops.encode_frames(images, knobs["jpeg_quality"])
    return media("frames", uri, start_s=start, end_s=end, timestamps=times, frames=frames)


def _load_video(row: dict, root: str, endpoint_url: str | None):
    where, item = find_video(row)
    data = read_media(resolve_media_uri(root, item["uri"]), item["uri"], endpoint_url)
    try:
        info = media_ops.probe_video(data)
    except media_ops.MediaError as exc:
        raise RowError(exc.reason, f"{item['uri']}: {exc}") from None
    return where, item, data, info


def _replace_media(side: dict, old: dict, new: dict) -> dict:
    items = [new if m is old else m for m in side.get("media") or []]
    return {**side, "media": items}


# --------------------------------------------------------------------------- split clips


def split_rows(rows: list[dict], shard: str, *, root: str, knobs: dict, endpoint_url: str | None):
    kept, rejected, added = [], [], 0
    for position, row in enumerate(rows):
        try:
            clips = split_row(row, root, knobs, endpoint_url)
        except (RowError, media_ops.MediaError) as err:
            reason = getattr(err, "reason", "media_undecodable")
            rejected.append(reject(SPLIT_STEP, row, reason, str(err), shard, position))
            continue
        kept.extend(clips)
        added += len(clips) - 1
    return kept, rejected, {"rows_added": added, "clips": len(kept)}


def split_row(row: dict, root: str, knobs: dict, endpoint_url: str | None) -> list[dict]:
    where, item, data, info = _load_video(row, root, endpoint_url)
    windows = clip_windows(
        info.duration_s, row.get("segments"), knobs["clip_seconds"], knobs["clip_min_s"]
    )
    if not windows:
        raise RowError("video_too_short", f"no clip of at least {knobs['clip_min_s']} s")
    items = [sample_clip(data, info, item["uri"], s, e, knobs) for s, e, _ in windows]
    text_side = "query" if where == "positive" else "positive"
    clips = []
    for k, ((_, _, caption), clip_item) in enumerate(zip(windows, items, strict=True)):
        clip = {**row, "id": f"{row['id']}#clip{k:03d}", "group_id": f"video:{row['id']}"}
        clip[where] = _replace_media(row[where], item, clip_item)
        if caption is not None:  # each segment is paired with its own caption
            clip[text_side] = {**row[text_side], "text": caption}
        clip["segments"] = None
        clips.append(clip)
    for k, clip in enumerate(clips):
        siblings = _neighbours(k, len(clips), knobs["clip_hard_negatives"])
        # Negatives are candidates for the query, so they take the positive's shape: a
        # reference to the sibling's row, whose positive it is (its frames stay stored
        # once). A sibling whose positive equals this clip's own (uncaptioned text) is no
        # negative.
        clip["negatives"] = [
            reference(clips[j]["id"]) for j in siblings if clips[j]["positive"] != clip["positive"]
        ]
    return clips


def _neighbours(k: int, count: int, limit: int) -> list[int]:
    """Up to ``limit`` sibling indexes, nearest in time first."""
    order = sorted((j for j in range(count) if j != k), key=lambda j: (abs(j - k), j))
    return order[:limit]


# --------------------------------------------------------------------------- long videos


def package_rows(rows: list[dict], shard: str, *, root: str, knobs: dict, endpoint_url: str | None):
    kept, rejected = [], []
    for position, row in enumerate(rows):
        try:
            kept.append(package_row(row, root, knobs, endpoint_url))
        except (RowError, media_ops.MediaError) as err:
            reason = getattr(err, "reason", "media_undecodable")
            rejected.append(reject(PACKAGE_STEP, row, reason, str(err), shard, position))
    return kept, rejected, {}


def package_row(row: dict, root: str, knobs: dict, endpoint_url: str | None) -> dict:
    where, item, data, info = _load_video(row, root, endpoint_url)
    if info.duration_s < knobs["long_video_min_s"]:
        raise RowError(
            "video_too_short", f"{info.duration_s:.1f} s < {knobs['long_video_min_s']} s"
        )
    if info.duration_s > knobs["long_video_max_s"]:
        raise RowError("video_too_long", f"{info.duration_s:.1f} s > {knobs['long_video_max_s']} s")
    frames = sample_clip(data, info, item["uri"], 0.0, info.duration_s, knobs)
    return {**row, where: _replace_media(row[where], item, frames), "segments": None}


# --------------------------------------------------------------------------- frames


def frame_rows(rows: list[dict], shard: str, *, root: str, knobs: dict, endpoint_url: str | None):
    """Every video item of every row replaced by its frames; a row whose video cannot be
    read or decoded is rejected with the reason. Videos are decoded once per task."""
    kept, rejected = [], []
    sampled: dict[tuple[str, float | None, float | None], dict[str, Any]] = {}
    videos = 0
    for position, row in enumerate(rows):
        try:
            out, count = frame_row(row, root, knobs, endpoint_url, sampled)
        except (RowError, media_ops.MediaError) as err:
            reason = getattr(err, "reason", "media_undecodable")
            rejected.append(reject(FRAMES_STEP, row, reason, str(err), shard, position))
            continue
        kept.append(out)
        videos += count
    return kept, rejected, {"videos_sampled": videos, "videos_decoded": len(sampled)}


def frame_row(
    row: dict,
    root: str,
    knobs: dict,
    endpoint_url: str | None,
    sampled: dict[tuple[str, float | None, float | None], dict[str, Any]],
) -> tuple[dict, int]:
    """The row with its videos as frames (from ``sampled`` when this task already decoded
    the same span of the same file), and how many video items it had."""
    count = 0

    def framed(side: dict) -> dict:
        nonlocal count
        items = []
        for item in side.get("media") or []:
            if item["kind"] != "video":
                items.append(item)
                continue
            count += 1
            key = (item["uri"], item.get("start_s"), item.get("end_s"))
            if key not in sampled:
                sampled[key] = _sample_item(item, root, knobs, endpoint_url)
            items.append(sampled[key])
        return {**side, "media": items}

    out = {**row, "query": framed(row["query"]), "positive": framed(row["positive"])}
    out["negatives"] = [n if n.get("ref") else framed(n) for n in row.get("negatives") or []]
    return out, count


def _sample_item(item: dict, root: str, knobs: dict, endpoint_url: str | None) -> dict[str, Any]:
    """One video item's frames over its span (the whole video when it names none)."""
    data = read_media(resolve_media_uri(root, item["uri"]), item["uri"], endpoint_url)
    try:
        info = media_ops.probe_video(data)
    except media_ops.MediaError as exc:
        raise RowError(exc.reason, f"{item['uri']}: {exc}") from None
    start = float(item.get("start_s") or 0.0)
    end = min(float(item["end_s"]), info.duration_s) if item.get("end_s") else info.duration_s
    if end <= start:
        raise RowError("video_too_short", f"{item['uri']}: empty span [{start}, {end}) s")
    return sample_clip(data, info, item["uri"], start, end, knobs)
