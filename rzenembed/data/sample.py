"""A small generated corpus of raw source datasets, for tests, CI and the local demo.

``build_sample_corpus(out, seed)`` writes a few MB of raw datasets that exercise every task
group and every data-preparation step: a made-up world of coloured shapes drawn with PIL,
text pages with numbers, scikit-learn's bundled handwritten digits and short H.264 videos
of moving shapes. Nothing is downloaded. The same seed writes byte-identical files.

Layout under ``OUT``::

    sources.yaml              the source entries (``SourceConfig`` shape); each ``uri`` is a
                              folder relative to OUT: resolve it against OUT before use
    corpus.json               what ``SampleCorpus`` says, paths relative to OUT
    <dataset>/records.jsonl   the project's own format: one record per line, media URIs
    <dataset>/media/...       relative to the dataset folder
    <mmeb-dataset>/train.jsonl  VLM2Vec's MMEB training format (qry, qry_image_path, ...)
    eval/<name>/queries.jsonl, candidates.jsonl, media/...   evaluation sets

Some training rows are planted bad rows (corrupt, missing, tiny, blurry, duplicated,
truncated, empty, copied from an evaluation set); ``SampleCorpus`` lists each with the
reason code the preparation steps are expected to give it, so their tests can check the
rejects exactly. Apart from the two planted copies (an evaluation picture re-encoded, an
evaluation caption re-typed), the evaluation sets share neither ids, texts, media bytes nor
near-duplicate images with the training datasets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml
from PIL import Image

from rzenembed.data import sample_render as draw
from rzenembed.data.sample_render import COLOURS, SHAPES, Shape
from rzenembed.data.schema import media, record, side

# Reason codes of the planted rows; the preparation steps reject with the same codes.
MEDIA_UNDECODABLE = "media_undecodable"
MEDIA_MISSING = "media_missing"
URI_ESCAPES_ROOT = "uri_escapes_root"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_BLURRY = "image_blurry"
DUPLICATE_EXACT = "duplicate_exact"
DUPLICATE_NEAR = "duplicate_near"
VIDEO_TRUNCATED = "video_truncated"
TEXT_EMPTY = "text_empty"
EVAL_OVERLAP = "eval_overlap"
# What the builders draw; raised whenever a change alters the corpus, so a folder built by
# an older release of this code is known to be stale (``corpus.json`` records it).
# 2: survey pages count shapes of one colour and are drawn in it.
SAMPLE_VERSION = 2
REASON_CODES: tuple[str, ...] = (
    MEDIA_UNDECODABLE,
    MEDIA_MISSING,
    URI_ESCAPES_ROOT,
    IMAGE_TOO_SMALL,
    IMAGE_BLURRY,
    DUPLICATE_EXACT,
    DUPLICATE_NEAR,
    VIDEO_TRUNCATED,
    TEXT_EMPTY,
    EVAL_OVERLAP,
)

SCENE_SIZE = (96, 96)
VIDEO_SIZE = (96, 72)
CLASSIFY_INSTRUCTION = "Represent the given image for classification."
CAPTION_INSTRUCTION = "Find an image that matches the given caption."
COMPOSE_INSTRUCTION = "Given an image and a requested change, find the changed image."
QA_INSTRUCTION = "Represent the given image with the following question:"
GROUNDING_INSTRUCTION = "Select the part of the image that shows the described object."
VISDOC_INSTRUCTION = "Find the document page that answers the question."
VIDEO_INSTRUCTION = "Find the video that matches the description."
VIDEO_QA_INSTRUCTION = "Represent the given video with the following question:"
MMEB_IMAGE_TOKEN = "<|image_1|>"
T = TypeVar("T")


# --------------------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class DatasetInfo:
    """One raw dataset of the corpus, as a source entry plus what was planted in it."""

    name: str
    folder: Path
    format: str
    task_group: str
    stage: str
    classification: bool
    rows: int  # MMEB rows carry no id; the format's reader names them
    # Row id -> the reason code a preparation step is expected to reject it with.
    planted: dict[str, str] = field(default_factory=dict)
    # Planted duplicate row id -> the id of the earlier row it duplicates.
    duplicate_of: dict[str, str] = field(default_factory=dict)
    # Planted copy row id -> the evaluation query or candidate id it copies.
    copies_eval: dict[str, str] = field(default_factory=dict)

    def source_entry(self, root: Path) -> dict[str, Any]:
        """The ``SourceConfig`` fields; ``uri`` is relative to the corpus root."""
        return {
            "name": self.name,
            "uri": self.folder.relative_to(root).as_posix(),
            "format": self.format,
            "task_group": self.task_group,
            "stage": self.stage,
            "classification": self.classification,
            # Every video source goes through clip splitting: it stores sampled frames
            # inline (a short video becomes one clip, a long one is cut along segments).
            "video": "split-clips" if self.task_group.startswith("video_") else "none",
        }


@dataclass(frozen=True)
class EvalSetInfo:
    """One evaluation set: ``local`` queries list their candidates, ``global`` ones do not."""

    name: str
    folder: Path
    category: str
    ranking: str
    queries: int
    candidates: int


@dataclass(frozen=True)
class SampleCorpus:
    """What ``build_sample_corpus`` wrote."""

    root: Path
    seed: int
    scale: int
    datasets: tuple[DatasetInfo, ...]
    eval_sets: tuple[EvalSetInfo, ...]
    # Every video written (path relative to root) -> its length in seconds.
    video_seconds: dict[str, float]

    @property
    def sources_yaml(self) -> Path:
        return self.root / "sources.yaml"

    @property
    def planted(self) -> dict[str, str]:
        """Every planted row id of every dataset -> its expected reason code."""
        return {row: reason for info in self.datasets for row, reason in info.planted.items()}

    @property
    def eval_folders(self) -> list[Path]:
        return [info.folder for info in self.eval_sets]

    def dataset(self, name: str) -> DatasetInfo:
        for info in self.datasets:
            if info.name == name:
                return info
        raise KeyError(f"no sample dataset {name!r}; have {[d.name for d in self.datasets]}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description with paths relative to the root (so builds compare equal)."""
        return {
            "version": SAMPLE_VERSION,
            "seed": self.seed,
            "scale": self.scale,
            "datasets": [
                {
                    **info.source_entry(self.root),
                    "rows": info.rows,
                    "planted": info.planted,
                    "duplicate_of": info.duplicate_of,
                    "copies_eval": info.copies_eval,
                }
                for info in self.datasets
            ],
            "eval_sets": [
                {
                    "name": e.name,
                    "folder": e.folder.relative_to(self.root).as_posix(),
                    "category": e.category,
                    "ranking": e.ranking,
                    "queries": e.queries,
                    "candidates": e.candidates,
                }
                for e in self.eval_sets
            ],
            "video_seconds": self.video_seconds,
        }


# --------------------------------------------------------------------------- writing


def _dump_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")


class _MediaFolder:
    """Writes media files under a folder and hands back their URIs relative to it."""

    def __init__(self, folder: Path, subdir: str = "media", scale: int = 1) -> None:
        self.folder = folder
        self.subdir = subdir
        # How many times the default number of clean rows the scalable builders write.
        self.scale = scale
        self.video_seconds: dict[str, float] = {}

    def save(self, data: bytes, filename: str) -> str:
        uri = f"{self.subdir}/{filename}"
        path = self.folder / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return uri

    def image(self, image: Image.Image, stem: str) -> dict[str, Any]:
        return media("image", self.save(draw.png_bytes(image), f"{stem}.png"))

    def video(self, frames: list[Image.Image], fps: int, stem: str) -> dict[str, Any]:
        uri = self.save(draw.mp4_bytes(frames, fps), f"{stem}.mp4")
        self.video_seconds[uri] = round(len(frames) / fps, 6)
        return media("video", uri)


class _RawDataset(_MediaFolder):
    """Collects one raw dataset's rows and planted-row notes, then writes its JSONL."""

    def __init__(
        self,
        root: Path,
        name: str,
        task_group: str,
        stage: str,
        format: str = "rzenembed",
        classification: bool = False,
        scale: int = 1,
    ) -> None:
        super().__init__(root / name, "images" if format == "mmeb" else "media", scale)
        self.name, self.task_group, self.stage = name, task_group, stage
        self.format, self.classification = format, classification
        self.rows: list[dict[str, Any]] = []
        self.planted: dict[str, str] = {}
        self.duplicate_of: dict[str, str] = {}
        self.copied: dict[str, str] = {}  # planted row id -> the evaluation item it copies

    def row_id(self, index: int) -> str:
        return f"{self.name}-{index:04d}"

    def add(self, query: dict, positive: dict, reason: str | None = None, **extra: Any) -> str:
        """Append a record; ``reason`` marks it as planted, ``duplicate_of`` names its original,
        ``row_id`` replaces the positional id (rows that must keep theirs at every scale)."""
        row_id = extra.pop("row_id", None) or self.row_id(len(self.rows))
        original = extra.pop("duplicate_of", None)
        self.rows.append(record(row_id, self.name, self.task_group, query, positive, **extra))
        if reason:
            self.planted[row_id] = reason
        if original is not None:
            self.duplicate_of[row_id] = self.row_id(original)
        return row_id

    def finish(self) -> DatasetInfo:
        _dump_jsonl(
            self.folder / ("train.jsonl" if self.format == "mmeb" else "records.jsonl"), self.rows
        )
        return DatasetInfo(
            name=self.name, folder=self.folder, format=self.format, task_group=self.task_group,
            stage=self.stage, classification=self.classification, rows=len(self.rows),
            planted=self.planted, duplicate_of=self.duplicate_of, copies_eval=self.copied,
        )  # fmt: skip


def _bad_image(
    ds: _MediaFolder, rng: np.random.Generator, image: Image.Image, reason: str, stem: str
) -> dict[str, Any]:
    """Store ``image`` damaged the way ``reason`` describes and return its media item."""
    if reason == MEDIA_UNDECODABLE:
        return media("image", ds.save(rng.bytes(1500), f"{stem}.png"))
    if reason == MEDIA_MISSING:
        return media("image", f"{ds.subdir}/{stem}.png")  # never written
    if reason == URI_ESCAPES_ROOT:
        return media("image", "../outside.png")  # nothing is written there either
    if reason == IMAGE_TOO_SMALL:
        return ds.image(image.resize((12, 12), Image.Resampling.BILINEAR), stem)
    if reason == IMAGE_BLURRY:
        return ds.image(draw.heavy_blur(image), stem)
    if reason == DUPLICATE_NEAR:
        # +3 brightness: other bytes, the same perceptual hash. (A JPEG re-encode moved the
        # hash of some flat scenes by up to 8 bits, past the near-duplicate radius.)
        return ds.image(draw.brighter(image, 3), stem)
    if reason == DUPLICATE_EXACT:
        return ds.image(image, stem)  # same pixels, same PNG bytes, another file
    raise ValueError(f"no way to plant {reason!r} in an image")


def _image_item(
    ds: _MediaFolder, rng: np.random.Generator, image: Image.Image, reason: str | None, stem: str
) -> dict[str, Any]:
    return _bad_image(ds, rng, image, reason, stem) if reason else ds.image(image, stem)


# --------------------------------------------------------------------------- uniqueness

# Any two images the corpus generates (planted duplicates aside) differ in at least this
# many of the 64 perceptual-hash bits: far beyond the near-duplicate radius the
# preparation uses (4 by default), so only the planted near-duplicate is one.
MIN_HASH_DISTANCE = 12
_ATTEMPTS = 2000


def _rng(seed: int, stream: str) -> np.random.Generator:
    """A generator of its own for each dataset, seeded from the corpus seed and its name."""
    key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, key])


class _Seen:
    """Texts and image hashes given out so far, train and eval together.

    Generators draw until what they made is new, so no caption, question or title repeats
    and no image is a near-duplicate of another: the only duplicates are the planted ones,
    and evaluation sets are not contaminated by training data.
    """

    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.hashes: list[int] = []

    def accept(self, texts: Sequence[str] = (), images: Sequence[Image.Image] = ()) -> bool:
        """Record ``texts`` and ``images`` and return True, unless one of them is not new."""
        if len(set(texts)) < len(texts) or any(text in self.texts for text in texts):
            return False
        codes = [draw.perceptual_hash(image) for image in images]
        known = [*self.hashes]
        for code in codes:
            if any(draw.hamming(code, other) < MIN_HASH_DISTANCE for other in known):
                return False
            known.append(code)
        self.texts.update(texts)
        self.hashes = known
        return True

    def first_new(self, make: Callable[[], tuple[Sequence[str], Sequence[Image.Image], T]]) -> T:
        """Call ``make`` (texts, images, result) until its texts and images are new."""
        for _ in range(_ATTEMPTS):
            texts, images, result = make()
            if self.accept(texts, images):
                return result
        raise RuntimeError("the sample world ran out of new texts or images")


def _captioned_scene(rng: np.random.Generator, seen: _Seen) -> tuple[str, Image.Image]:
    """A scene of 1-3 shapes; its caption and its look are new to the corpus."""

    def make():
        placed = draw.place_shapes(rng, SCENE_SIZE, int(rng.integers(1, 4)))
        text, image = draw.caption(placed), draw.scene_image(rng, placed, SCENE_SIZE)
        return [text], [image], (text, image)

    return seen.first_new(make)


def _new_shape_image(
    rng: np.random.Generator, seen: _Seen, kind: str, colour: str, style: str = "filled"
) -> Image.Image:
    def make():
        image = draw.single_shape_image(rng, kind, colour, style, SCENE_SIZE)
        return [], [image], image

    return seen.first_new(make)


# --------------------------------------------------------------------------- text and images


SHAPE_FACTS = {
    "circle": "is round and has no corners",
    "square": "has four equal sides and four right angles",
    "triangle": "has three straight sides and three corners",
    "diamond": "has four sides and stands on one of its corners",
    "star": "has five points",
    "cross": "is made of two bars that cross at right angles",
}


def _build_text_pairs(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Questions about the shapes of the world, each answered by one short passage."""
    forms = ("Which {colour} shape {fact}?", "What is the name of the {colour} shape that {fact}?")
    combos = rng.permutation(len(SHAPES) * len(COLOURS)).tolist()
    instruction = "Given a question, retrieve the passage that answers it."
    for i in range(30):
        if i == 9:
            ds.add(side(""), side("A shape with no colour is not part of this world."), TEXT_EMPTY)
            continue
        kind, colour = draw.combo(combos.pop())
        question = str(rng.choice(forms)).format(colour=colour, fact=SHAPE_FACTS[kind])
        seen.accept([question])
        answer = f"The {colour} {kind} is the one that {SHAPE_FACTS[kind]}."
        ds.add(side(question, instruction), side(answer))


def _build_captions(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Caption -> scene. Plants broken media and an exact and a near duplicate."""
    plants = {5: MEDIA_UNDECODABLE, 11: MEDIA_MISSING, 17: URI_ESCAPES_ROOT}
    originals = {23: (2, DUPLICATE_EXACT), 29: (8, DUPLICATE_NEAR)}
    made: list[tuple[str, Image.Image]] = []
    for i in range(40 * ds.scale):
        original, reason = originals.get(i, (None, plants.get(i)))
        if original is None:
            caption, image = _captioned_scene(rng, seen)
        else:
            caption, image = made[original]
            if reason == DUPLICATE_NEAR:  # the same example re-typed and re-encoded
                caption = _retyped(caption)
        made.append((caption, image))
        item = _image_item(ds, rng, image, reason, f"img_{i:04d}")
        positive = side(media_items=[item])
        ds.add(side(caption, CAPTION_INSTRUCTION), positive, reason, duplicate_of=original)


def _retyped(text: str) -> str:
    """The same text as a careless copy types it: other case, doubled spaces (equal after
    the preparation's text normalisation)."""
    return "  ".join(text.upper().split()) + " "


def _plant_eval_copies(ds: _RawDataset, ev: _EvalSet, rng: np.random.Generator, seen: _Seen):
    """Two training rows that copy items of the image retrieval evaluation set, for the
    decontamination to find: one whose positive is an evaluation picture re-encoded
    (brighter by 3: other bytes, the same perceptual hash), one whose query is an evaluation
    caption re-typed. Each points at the evaluation item it copies (``duplicate_of``)."""
    copied = ev.candidates[0]
    picture = Image.open(ev.folder / copied["candidate"]["media"][0]["uri"]).convert("RGB")
    item = ds.image(draw.brighter(picture, 3), "copy_0000")
    query = side("an evaluation picture, copied", CAPTION_INSTRUCTION)
    row_id = ds.add(query, side(media_items=[item]), EVAL_OVERLAP, row_id=f"{ds.name}-copy0")
    ds.copied[row_id] = copied["cid"]
    question = ev.queries[0]
    _, scene = _captioned_scene(rng, seen)
    item = ds.image(scene, "copy_0001")
    query = side(_retyped(question["query"]["text"]), CAPTION_INSTRUCTION)
    row_id = ds.add(query, side(media_items=[item]), EVAL_OVERLAP, row_id=f"{ds.name}-copy1")
    ds.copied[row_id] = question["qid"]


def _composed_change(rng: np.random.Generator, kind: str, colour: str) -> tuple[str, str, str]:
    """A requested change in words and the target's kind and colour."""
    if rng.random() < 0.5:
        new_colour = draw.random_colour(rng, exclude=colour)
        return f"the same shape but {new_colour}", kind, new_colour
    new_kind = str(rng.choice([s for s in SHAPES if s != kind]))
    return f"the same colour but {draw.with_article(new_kind)}", new_kind, colour


def _build_composed(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Source image + change in words -> target image (a new picture, not an edit)."""
    for i in range(20 * ds.scale):
        kind, colour = draw.combo(int(rng.integers(len(SHAPES) * len(COLOURS))))
        change, new_kind, new_colour = _composed_change(rng, kind, colour)
        source = _new_shape_image(rng, seen, kind, colour)
        target = _new_shape_image(rng, seen, new_kind, new_colour)
        query = side(change, COMPOSE_INSTRUCTION, [ds.image(source, f"src_{i:04d}")])
        ds.add(query, side(media_items=[ds.image(target, f"tgt_{i:04d}")]))


@dataclass(frozen=True)
class _ClassificationSpec:
    labels: tuple[str, ...]
    style: str
    rows: int
    plants: dict[int, str]


def _classification_builder(spec: _ClassificationSpec) -> Callable:
    def build(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
        """Image -> label text; the hard negative is another label of the same dataset."""
        order = rng.permutation(np.arange(spec.rows * ds.scale) % len(spec.labels)).tolist()
        for i, label_index in enumerate(order):
            label, reason = spec.labels[label_index], spec.plants.get(i)
            colour = draw.random_colour(rng)
            image = _new_shape_image(rng, seen, label, colour, spec.style)
            item = _image_item(ds, rng, image, reason, f"img_{i:04d}")
            wrong = str(rng.choice([x for x in spec.labels if x != label]))
            query = side("", CLASSIFY_INSTRUCTION, [item])
            ds.add(query, side(label), reason, negatives=[side(wrong)], label=label)

    return build


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _distinct_digits(
    rng: np.random.Generator, seen: _Seen, per_class: int
) -> list[tuple[int, Image.Image]]:
    """Digits picked so that no two look alike to a perceptual hash (they are not duplicates)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen: list[tuple[int, Image.Image]] = []
    counts = dict.fromkeys(range(10), 0)
    for index in rng.permutation(len(digits.target)).tolist():
        target = int(digits.target[index])
        if counts[target] >= per_class:
            continue
        image = draw.digit_image(digits.data[index])
        if seen.accept(images=[image]):
            chosen.append((target, image))
            counts[target] += 1
        if len(chosen) == 10 * per_class:
            break
    return chosen


def _build_digits(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """The one real dataset: scikit-learn's bundled 8x8 digits, upscaled to 56x56."""
    for i, (target, image) in enumerate(_distinct_digits(rng, seen, per_class=4)):
        label = DIGIT_NAMES[target]
        query = side("", CLASSIFY_INSTRUCTION, [ds.image(image, f"digit_{i:04d}")])
        ds.add(query, side(label), label=label)


def _question(rng: np.random.Generator, placed: list[draw.Placed]) -> tuple[str, str]:
    """A question about a scene and its short answer."""
    target = placed[int(rng.integers(len(placed)))]
    asks = int(rng.integers(4))
    if asks == 0:
        return f"What colour is the {target.shape.kind}?", target.shape.colour
    if asks == 1:
        return f"What shape is {target.shape.colour}?", target.shape.kind
    if asks == 2:
        return f"Where is the {target.shape.name}?", draw.CELLS[target.cell]
    return "How many shapes are there?", ("one", "two", "three")[len(placed) - 1]


def _build_image_qa(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    def make():
        placed = draw.place_shapes(rng, SCENE_SIZE, int(rng.integers(1, 4)))
        image = draw.scene_image(rng, placed, SCENE_SIZE)
        return [], [image], (image, *_question(rng, placed))

    for i in range(24):
        image, question, answer = seen.first_new(make)
        ds.add(side(question, QA_INSTRUCTION, [ds.image(image, f"img_{i:04d}")]), side(answer))


def _build_mmeb_qa(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """VLM2Vec's MMEB training rows; the image placeholder marks where the query image goes."""
    for i in range(20):
        kind, colour = draw.combo(int(rng.integers(len(SHAPES) * len(COLOURS))))
        image = _new_shape_image(rng, seen, kind, colour)
        path = ds.save(draw.png_bytes(image), f"qa_{i:04d}.png")
        if i % 2 == 0:
            question, answer, wrong = "What colour is the shape?", colour, draw.random_colour(rng)
        else:
            question, answer = "What shape is shown?", kind
            wrong = SHAPES[(SHAPES.index(kind) + 1) % len(SHAPES)]
        if wrong == answer:
            wrong = draw.random_colour(rng, exclude=colour)
        ds.rows.append({
            "qry": f"{MMEB_IMAGE_TOKEN} {QA_INSTRUCTION} {question}",
            "qry_image_path": path, "pos_text": answer, "pos_image_path": "",
            "neg_text": wrong, "neg_image_path": "",
        })  # fmt: skip


def _grounding_crop(rng: np.random.Generator, image: Image.Image, shape: Shape) -> Image.Image:
    """The object's box with a random margin, at least 36 px a side."""
    left, top, right, bottom = shape.bbox()
    pad = rng.integers(2, 12, 4).tolist()
    box = [left - pad[0], top - pad[1], right + pad[2], bottom + pad[3]]
    for lo, hi in ((0, 2), (1, 3)):
        while box[hi] - box[lo] < 36:
            box[lo], box[hi] = box[lo] - 1, box[hi] + 1
    width, height = image.size
    return image.crop((max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)))


def _build_grounding(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Full scene + "the green triangle" -> the crop that shows it."""

    def make():
        placed = draw.place_shapes(rng, (128, 128), 3)
        image = draw.scene_image(rng, placed, (128, 128))
        target = placed[int(rng.integers(3))].shape
        crop = _grounding_crop(rng, image, target)
        return [], [image, crop], (image, crop, f"the {target.name}")

    for i in range(20):
        image, crop, phrase = seen.first_new(make)
        query = side(phrase, GROUNDING_INSTRUCTION, [ds.image(image, f"img_{i:04d}")])
        ds.add(query, side(media_items=[ds.image(crop, f"crop_{i:04d}")]))


def _new_page(rng: np.random.Generator, seen: _Seen, kind: str) -> tuple[draw.Page, Image.Image]:
    """A page whose title is new and which looks like no other page."""

    def make():
        page = draw.random_page(rng, kind)
        image = draw.render_page(page)
        return [page.title], [image], (page, image)

    return seen.first_new(make)


def _page_question(page: draw.Page, line: int) -> str:
    return f"How many {page.lines[line][0]} were counted in the {page.title}?"


def _build_visdoc(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Question about a number on a page -> the page image."""
    for i in range(20):
        page, image = _new_page(rng, seen, "census")
        question = _page_question(page, int(rng.integers(len(page.lines))))
        ds.add(
            side(question, VISDOC_INSTRUCTION), side(media_items=[ds.image(image, f"page_{i:04d}")])
        )


# --------------------------------------------------------------------------- videos


def _new_motion(rng: np.random.Generator, seen: _Seen, still: int = 0) -> draw.Motion:
    """A motion whose caption no other video of the corpus has."""

    def make():
        motion = draw.random_motion(rng, VIDEO_SIZE, still)
        return [motion.caption], [], motion

    return seen.first_new(make)


def _build_video_clips(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Motion description -> short video. Row 6 is an MP4 cut off half way."""
    for i in range(14):
        seconds = float(rng.choice([1.5, 2.0, 2.5, 3.0]))
        motion = _new_motion(rng, seen, still=int(rng.integers(2)))
        query = side(motion.caption, VIDEO_INSTRUCTION)
        if i == 6:
            data = draw.mp4_bytes(motion.frames(seconds, 10), 10)
            item = media("video", ds.save(data[: len(data) // 2], f"clip_{i:04d}.mp4"))
            ds.add(query, side(media_items=[item]), VIDEO_TRUNCATED)
            continue
        item = ds.video(motion.frames(seconds, 10), 10, f"clip_{i:04d}")
        ds.add(query, side(media_items=[item]))


def _video_question(motion: draw.Motion, asks: int) -> tuple[str, str]:
    if asks == 0:
        return f"Which way does the {motion.moving.name} move?", motion.direction
    if asks == 1:
        return "Which shape is moving?", f"the {motion.moving.name}"
    return "What colour is the moving shape?", motion.moving.colour


def _build_video_qa(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Video + question about the motion -> short answer."""
    for i in range(10):
        motion = draw.random_motion(rng, VIDEO_SIZE, still=1)
        question, answer = _video_question(motion, i % 3)
        item = ds.video(motion.frames(2.0, fps=10), 10, f"clip_{i:04d}")
        ds.add(side(question, VIDEO_QA_INSTRUCTION, [item]), side(answer))


def _long_video(rng: np.random.Generator, fps: int) -> tuple[list[Image.Image], list[dict]]:
    """3-4 captioned segments, each with its own background, shape and motion (8-12 s)."""
    count = int(rng.integers(3, 5))
    lengths = rng.integers(24, 33, count) if count == 3 else rng.integers(20, 25, count)
    frames: list[Image.Image] = []
    segments: list[dict] = []
    for length in lengths.tolist():
        motion = draw.random_motion(rng, VIDEO_SIZE)
        while motion.caption in {segment["text"] for segment in segments}:
            motion = draw.random_motion(rng, VIDEO_SIZE)
        start = len(frames) / fps
        frames.extend(motion.frames(length / fps, fps))
        segments.append({"start_s": start, "end_s": len(frames) / fps, "text": motion.caption})
    return frames, segments


def _build_long_videos(ds: _RawDataset, rng: np.random.Generator, seen: _Seen) -> None:
    """Whole video + its segment captions; clip splitting cuts it at the segments."""
    for i in range(10):
        frames, segments = _long_video(rng, fps=8)
        description = ", then ".join(segment["text"] for segment in segments)
        item = ds.video(frames, 8, f"long_{i:04d}")
        ds.add(side(description, VIDEO_INSTRUCTION), side(media_items=[item]), segments=segments)


# --------------------------------------------------------------------------- eval sets


class _EvalSet(_MediaFolder):
    """Queries and candidates of one evaluation set, written as two JSONL tables."""

    def __init__(self, root: Path, name: str, category: str, scale: int = 1) -> None:
        super().__init__(root / "eval" / name, scale=scale)
        self.name, self.category = name, category
        self.queries: list[dict[str, Any]] = []
        self.candidates: list[dict[str, Any]] = []

    def candidate(self, candidate: dict) -> str:
        cid = f"{self.name}-c{len(self.candidates):04d}"
        self.candidates.append({"cid": cid, "dataset": self.name, "candidate": candidate})
        return cid

    def query(self, query: dict, relevant: list[str], candidate_ids: list[str] | None = None):
        """Add a query; no ``candidate_ids`` means it ranks every candidate of the set."""
        self.queries.append({
            "qid": f"{self.name}-q{len(self.queries):04d}", "dataset": self.name,
            "category": self.category, "query": query,
            "candidate_ids": list(candidate_ids or []), "relevant_ids": relevant,
        })  # fmt: skip

    def finish(self) -> EvalSetInfo:
        _dump_jsonl(self.folder / "queries.jsonl", self.queries)
        _dump_jsonl(self.folder / "candidates.jsonl", self.candidates)
        ranking = "local" if any(q["candidate_ids"] for q in self.queries) else "global"
        return EvalSetInfo(
            name=self.name, folder=self.folder, category=self.category, ranking=ranking,
            queries=len(self.queries), candidates=len(self.candidates),
        )  # fmt: skip


def _eval_classification(ev: _EvalSet, rng: np.random.Generator, seen: _Seen) -> None:
    """Image -> one of six label texts (a local candidate list, as MMEB does)."""
    label_ids = {label: ev.candidate(side(label)) for label in SHAPES}
    for i in range(12 * ev.scale):
        label = SHAPES[i % len(SHAPES)]
        style = "filled" if i % 2 == 0 else "outline"
        image = _new_shape_image(rng, seen, label, draw.random_colour(rng), style)
        query = side("", CLASSIFY_INSTRUCTION, [ev.image(image, f"q_{i:04d}")])
        ev.query(query, [label_ids[label]], list(label_ids.values()))


def _eval_image_retrieval(ev: _EvalSet, rng: np.random.Generator, seen: _Seen) -> None:
    """Caption -> its scene among five (its own and four others)."""
    captions, ids = [], []
    for i in range(15 * ev.scale):
        caption, image = _captioned_scene(rng, seen)
        captions.append(caption)
        ids.append(ev.candidate(side(media_items=[ev.image(image, f"c_{i:04d}")])))
    for i in range(10 * ev.scale):
        others = [ids[j] for j in rng.permutation(len(ids)).tolist() if j != i][:4]
        listed = [ids[i], *others]
        shuffled = [listed[j] for j in rng.permutation(len(listed)).tolist()]
        ev.query(side(captions[i], CAPTION_INSTRUCTION), [ids[i]], shuffled)


def _eval_visdoc(ev: _EvalSet, rng: np.random.Generator, seen: _Seen) -> None:
    """Two questions per page, each ranked against every page (global)."""
    for i in range(6):
        page, image = _new_page(rng, seen, "survey")
        cid = ev.candidate(side(media_items=[ev.image(image, f"page_{i:04d}")]))
        for line in rng.choice(len(page.lines), size=2, replace=False).tolist():
            ev.query(side(_page_question(page, line), VISDOC_INSTRUCTION), [cid])


def _eval_video(ev: _EvalSet, rng: np.random.Generator, seen: _Seen) -> None:
    """Motion description -> its video among all six (global)."""
    for i in range(6):
        motion = _new_motion(rng, seen, still=int(rng.integers(2)))
        item = ev.video(motion.frames(2.0, 10), 10, f"c_{i:04d}")
        ev.query(side(motion.caption, VIDEO_INSTRUCTION), [ev.candidate(side(media_items=[item]))])


# --------------------------------------------------------------------------- the corpus

_CLASSIFY = {"classification": True}
# Overlapping label names on purpose: "circle" and "square" are in both shape sets.
_SHAPES_A = _ClassificationSpec(
    ("circle", "square", "triangle", "diamond"),
    "filled",
    30,
    {7: IMAGE_TOO_SMALL, 19: IMAGE_BLURRY},
)
_SHAPES_B = _ClassificationSpec(("circle", "square", "star", "cross"), "outline", 24, {})

# name, builder, task group, stage, options. Built in this order (it fixes what is "new").
_DATASETS: tuple[tuple[str, Callable, str, str, dict[str, Any]], ...] = (
    ("sample-text-pairs", _build_text_pairs, "text_retrieval", "stage1", {}),
    ("sample-captions", _build_captions, "image_retrieval", "stage1", {}),
    ("sample-composed", _build_composed, "image_retrieval", "stage1", {}),
    (
        "sample-shapes-a",
        _classification_builder(_SHAPES_A),
        "image_classification",
        "stage2",
        _CLASSIFY,
    ),
    (
        "sample-shapes-b",
        _classification_builder(_SHAPES_B),
        "image_classification",
        "stage2",
        _CLASSIFY,
    ),
    ("sample-digits", _build_digits, "image_classification", "stage2", _CLASSIFY),
    ("sample-image-qa", _build_image_qa, "image_qa", "stage2", {}),
    ("sample-mmeb-vqa", _build_mmeb_qa, "image_qa", "stage2", {"format": "mmeb"}),
    ("sample-grounding", _build_grounding, "visual_grounding", "stage2", {}),
    ("sample-visdoc", _build_visdoc, "visdoc_retrieval", "both", {}),
    ("sample-video-clips", _build_video_clips, "video_retrieval", "both", {}),
    ("sample-video-qa", _build_video_qa, "video_qa", "stage2", {}),
    ("sample-long-videos", _build_long_videos, "video_retrieval", "stage2", {}),
)

_EVAL_SETS: tuple[tuple[str, str, Callable], ...] = (
    ("eval-shapes-classification", "image_classification", _eval_classification),
    ("eval-image-retrieval", "image_retrieval", _eval_image_retrieval),
    ("eval-visdoc", "visdoc_ood", _eval_visdoc),
    ("eval-video-retrieval", "video_retrieval", _eval_video),
)


def build_sample_corpus(out: str | Path, seed: int = 0, scale: int = 1) -> SampleCorpus:
    """Write the sample corpus under ``out`` and describe it; same seed, same bytes.

    ``scale`` multiplies the clean rows of the cheap image datasets (captions, composed
    changes, both shape classifications) and the queries of the two image evaluation sets.
    At 1 the corpus exercises every preparation step in seconds but is small enough for a
    model to memorise; a learning check needs more rows than it can memorise (see
    docs/data.md). Planted rows, pages and videos do not change with it.

    ``out`` should be empty or missing: files of an older build that this one does not
    write are left alone.
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    seen = _Seen()
    raw = []
    for name, builder, task_group, stage, options in _DATASETS:
        raw.append(_RawDataset(root, name, task_group, stage, **options, scale=scale))
        builder(raw[-1], _rng(seed, name), seen)
    evals = []
    for name, category, builder in _EVAL_SETS:
        evals.append(_EvalSet(root, name, category, scale))
        builder(evals[-1], _rng(seed, name), seen)
    captions = next(ds for ds in raw if ds.name == "sample-captions")
    retrieval = next(ev for ev in evals if ev.name == "eval-image-retrieval")
    _plant_eval_copies(captions, retrieval, _rng(seed, "eval-copies"), seen)
    corpus = SampleCorpus(
        root=root, seed=seed, scale=scale, datasets=tuple(ds.finish() for ds in raw),
        eval_sets=tuple(ev.finish() for ev in evals), video_seconds=_videos(root, [*raw, *evals]),
    )  # fmt: skip
    _write_descriptions(corpus)
    return corpus


def _videos(root: Path, parts: list[_MediaFolder]) -> dict[str, float]:
    return {
        (part.folder / uri).relative_to(root).as_posix(): seconds
        for part in parts
        for uri, seconds in part.video_seconds.items()
    }


def _write_descriptions(corpus: SampleCorpus) -> None:
    """sources.yaml for the pipeline config, corpus.json for everything else."""
    entries = [info.source_entry(corpus.root) for info in corpus.datasets]
    header = "# Sample corpus sources; each uri is relative to the folder of this file.\n"
    corpus.sources_yaml.write_text(header + yaml.safe_dump(entries, sort_keys=False), "utf-8")
    description = json.dumps(corpus.to_json(), indent=2, sort_keys=True) + "\n"
    (corpus.root / "corpus.json").write_text(description, encoding="utf-8")
