"""Embed a JSONL file of inputs into a Parquet table, resumably.

Input: one JSON object per line with an optional ``id`` (default: the line number) and
the fields of ``EmbedInput``: ``text``, ``instruction``, and media as paths relative to the
input file (or absolute): ``image`` or ``images`` (photos, document pages), ``video`` (a
file, decoded with decord) or ``frames`` (image files in time order).

Output: ``id`` (string) and ``embedding`` (fixed-size list of float32), in input order, with
the model path and digest in the file's metadata.

Every line is checked before the model is loaded (JSON, known fields, media present and of
a supported kind, unique ids), so a bad line fails the job at once with its line number,
not after hours of work. Work is written in parts of ``part_rows`` rows beside the output
(``OUT.parts/``); a rerun of the same job skips the parts already written and only then
assembles the table. The job is identified by the input's and the model's digests: a rerun
with another input or model refuses to mix their parts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rzenembed.modeling import EmbedInput, ModelCard, ModelFolderError, RzenEmbedder
from rzenembed.modeling.digest import file_digest, folder_digest
from rzenembed.runtime import task_device
from rzenembed.training.collate import MediaReader

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}
FIELDS = {"id", "text", "instruction", "image", "images", "video", "frames"}
JOB_FILE = "job.json"


class EmbedJobError(ValueError):
    """An input file that cannot be embedded as written."""


@dataclass
class EmbedRow:
    id: str
    text: str
    instruction: str
    images: list[str]
    video: str | None
    frames: list[str]


def _paths(value: Any, line: int, key: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise EmbedJobError(f"line {line}: {key!r} must be a path or a list of paths")
    return values


def _check_media(root: Path, path: str, line: int, suffixes: set[str], kind: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in suffixes:
        raise EmbedJobError(
            f"line {line}: {path!r} is not a supported {kind} (expected one of {sorted(suffixes)})"
        )
    if not (root / path).is_file():
        raise EmbedJobError(f"line {line}: {kind} file not found: {root / path}")


def read_inputs(path: str | Path) -> list[EmbedRow]:
    """Parse and check every line of the input file."""
    path = Path(path)
    if not path.is_file():
        raise EmbedJobError(f"input file not found: {path}")
    root = path.parent
    rows: list[EmbedRow] = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise EmbedJobError(f"line {line}: not JSON ({error.msg})") from None
            if not isinstance(raw, dict):
                raise EmbedJobError(f"line {line}: expected a JSON object")
            unknown = sorted(set(raw) - FIELDS)
            if unknown:
                raise EmbedJobError(
                    f"line {line}: unknown fields {unknown}; known {sorted(FIELDS)}"
                )
            images = _paths(raw.get("images", raw.get("image", [])), line, "images")
            frames = _paths(raw.get("frames", []), line, "frames")
            video = raw.get("video")
            if video is not None and not (isinstance(video, str) and video):
                raise EmbedJobError(f"line {line}: 'video' must be a path")
            if video and frames:
                raise EmbedJobError(f"line {line}: give 'video' or 'frames', not both")
            for p in [*images, *frames]:
                _check_media(root, p, line, IMAGE_SUFFIXES, "image")
            if video:
                _check_media(root, video, line, VIDEO_SUFFIXES, "video")
            row = EmbedRow(
                id=str(raw.get("id", line)), text=str(raw.get("text") or ""),
                instruction=str(raw.get("instruction") or ""), images=images, video=video,
                frames=frames,
            )  # fmt: skip
            if not (row.text or row.instruction or row.images or row.video or row.frames):
                raise EmbedJobError(f"line {line}: nothing to embed (no text, image or video)")
            rows.append(row)
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise EmbedJobError(f"{path}: ids repeat: {repeated}")
    return rows


def to_embed_input(row: EmbedRow, reader: MediaReader, max_frames: int) -> EmbedInput:
    video = None
    if row.video:
        video = reader.frames({"uri": row.video}, max_frames)
    elif row.frames:
        video = [reader.image(p) for p in row.frames]
    return EmbedInput(
        text=row.text, instruction=row.instruction,
        images=[reader.image(p) for p in row.images], video=video,
    )  # fmt: skip


def _write_atomic(table: pa.Table, path: Path) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, partial)
    os.replace(partial, path)


def embed_file(
    model: str | Path,
    input_path: str | Path,
    out_path: str | Path,
    batch_size: int = 16,
    part_rows: int = 1024,
    show_progress: bool = True,
) -> Path:
    """Embed every line of ``input_path`` with the model folder ``model``; see the module doc."""
    rows = read_inputs(input_path)
    if not Path(model).is_dir():
        raise ModelFolderError(f"model folder not found: {model}")
    ModelCard.load(model)  # a folder without rzenembed.json fails here, before any work
    out = Path(out_path)
    parts = out.with_name(out.name + ".parts")
    job = {"input_digest": file_digest(input_path), "model_digest": folder_digest(model),
           "model": str(Path(model).resolve()), "part_rows": part_rows}  # fmt: skip
    if parts.is_dir() and (parts / JOB_FILE).is_file():
        before = json.loads((parts / JOB_FILE).read_text())
        if before != job:
            raise EmbedJobError(
                f"{parts} holds parts of another job (input, model or part size differ); "
                f"remove it to start over"
            )
    parts.mkdir(parents=True, exist_ok=True)
    (parts / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
    # A local command: the GPU when one is visible (rzenembed.runtime), else the CPU.
    embedder = RzenEmbedder.from_pretrained(model, device=task_device(want_gpu=True))
    reader = MediaReader(str(Path(input_path).parent.resolve()))
    max_frames = embedder.cfg.video_frames
    starts = range(0, len(rows), part_rows)
    done = sum((parts / f"part-{i:06d}.parquet").is_file() for i in range(len(starts)))
    bar = tqdm(total=len(rows), initial=min(done * part_rows, len(rows)), unit="item",
               desc="embed", disable=not show_progress)  # fmt: skip
    for number, start in enumerate(starts):
        part = parts / f"part-{number:06d}.parquet"
        if part.is_file():
            continue
        chunk = rows[start : start + part_rows]
        vectors = embedder.encode(
            [to_embed_input(r, reader, max_frames) for r in chunk], batch_size
        )
        _write_atomic(_table([r.id for r in chunk], vectors.numpy(), job), part)
        bar.update(len(chunk))
    bar.close()
    tables = [pq.read_table(parts / f"part-{i:06d}.parquet") for i in range(len(starts))]
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = _table([], None, job, dim=embedder.embedding_dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(table.replace_schema_metadata(_metadata(job)), out)
    shutil.rmtree(parts)
    return out


def _metadata(job: dict[str, Any]) -> dict[bytes, bytes]:
    return {b"rzenembed": json.dumps(job, sort_keys=True).encode()}


def _table(ids: list[str], vectors, job: dict[str, Any], dim: int | None = None) -> pa.Table:
    dim = dim if vectors is None else vectors.shape[1]
    flat = pa.array([] if vectors is None else vectors.reshape(-1), type=pa.float32())
    embedding = pa.FixedSizeListArray.from_arrays(flat, dim)
    table = pa.table({"id": pa.array(ids, type=pa.string()), "embedding": embedding})
    return table.replace_schema_metadata(_metadata(job))


def read_embeddings(path: str | Path) -> tuple[list[str], Any]:
    """The ids and an (n, dim) float32 array of an embedding table."""
    import numpy as np

    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return table.column("id").to_pylist(), vectors.reshape(-1, dim)
