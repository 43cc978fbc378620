"""A scaled-down MMEB-V2 release, generated in code, in exactly the release's layout.

Ten datasets (twelve in the small release, see below), three rows each by default: one of
every image category (ImageNet-1K, OK-VQA, MSCOCO_t2i, MSCOCO), one video dataset of every
kind (MSR-VTT retrieval, Breakfast classification over its 10-label list, NExTQA multiple
choice, QVHighlight moment retrieval with ``query/``, ``positive*`` and negative clip
folders) and two BEIR visual-document sets with graded qrels (ViDoRe V2 ESG with its pages
on disk, ViDoRe arXivQA with its pages only inside the corpus Parquet). Pictures are flat
colours with a shape, named by the texts, so a model can learn the pairing.
``broken=True`` adds DiDeMo with a video whose frame folder is missing and ViDoRe DocVQA
with a qrel to a corpus id that is not in the corpus: the importer must skip both and say
why.

The small release also holds the two video datasets whose layout is the reference's most
particular: MVBench (a folder per task, frame folders named by the video file, extension
included: ``<task>/<video>.mp4/``) and MomentSeeker (clips and video queries flattened
under ``video_frames/``, image queries as ``query_<input_frames>`` with their folders
kept, text-only queries). Media lie where VLM2Vec's loaders look for them
(``rzenembed.evaluation.benchmark``'s ``media_path``), so importing this release proves the
importer reads the release as published.

``queries`` asks for more rows per dataset (``make demo``: 30, so that a score's bootstrap
interval is narrow enough to read). Those rows replace the first three, whose flat colours
would be hubs (every caption naming a colour ranks them first): a colour and a shape of
their own for the classification, QA, grounding and NExTQA/Breakfast rows; scenes,
motions and one-colour survey pages drawn by the sample corpus's renderer for MSCOCO_t2i,
MSR-VTT and the ViDoRe sets, with captions and questions in its style, from seeds of their
own; for QVHighlight, four moments of coloured shapes named in the sample's words over a
whole video that shows all four. Held-out examples of what a model trained on the sample
corpus has seen, in the benchmark's layout and instructions.

Tests and ``make demo`` use it; nothing is downloaded.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from rzenembed.data import sample_render as draw
from rzenembed.data.sample import SCENE_SIZE, VIDEO_SIZE
from rzenembed.data.sample_render import COLOURS
from rzenembed.evaluation.benchmark import benchmark_dataset
from rzenembed.evaluation.release import ANNOTATIONS

# The sample corpus's six colours and four more: ten distinct backgrounds.
COLORS = {
    **COLOURS,
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
    "brown": (120, 80, 40),
    "gray": (128, 128, 128),
}
NAMES = list(COLORS)
SIZE = 56  # pixels: two 28-pixel patches a side
FRAMES = 4  # frames per video folder (the importer samples up to 8)
BREAKFAST_LABELS = [
    "cereals",
    "coffee",
    "friedegg",
    "juice",
    "milk",
    "pancake",
    "salat",
    "sandwich",
    "scrambledegg",
    "tea",
]


SHAPES = ("square", "circle", "triangle", "diamond")  # 10 colours x 4 shapes: 40 pictures


def _shape(
    image: Image.Image, shape: str, fill: Any, outline: Any = None, shift: int = 0
) -> Image.Image:
    """Draw ``shape`` in the middle of a SIZE-pixel ``image``, ``shift`` pixels right."""
    draw = ImageDraw.Draw(image)
    x = shift
    if shape == "circle":
        draw.ellipse((14 + x, 14, 42 + x, 42), fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(28 + x, 12), (44 + x, 42), (12 + x, 42)], fill=fill, outline=outline)
    elif shape == "diamond":
        corners = [(28 + x, 10), (46 + x, 28), (28 + x, 46), (10 + x, 28)]
        draw.polygon(corners, fill=fill, outline=outline)
    else:
        draw.rectangle((14 + x, 14, 42 + x, 42), fill=fill, outline=outline)
    return image


def picture(color: str, shape: str = "square", shade: int = 0) -> Image.Image:
    """A flat background of ``color`` with a white ``shape``; ``shade`` varies frames."""
    r, g, b = COLORS[color]
    return _shape(Image.new("RGB", (SIZE, SIZE), (min(r + shade, 255), g, b)), shape, "white")


COLOURS_IN_WORLD = list(COLOURS)  # the sample corpus's six, named as its captions name them


def object_picture(colour: str, shape: str, shift: int = 0) -> Image.Image:
    """A ``colour`` ``shape`` (outlined, as the sample corpus draws its shapes) on a light
    background: what a caption "a red circle" describes in the sample world."""
    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 228))
    return _shape(image, shape, COLORS[colour], (25, 25, 25), shift)


# Raised whenever a change alters what the fixture writes (the demo rebuilds an older one).
# 2: the larger release holds only new looks and sample-world rows. 3: the reference's
# media layout (MomentSeeker's frame root), MVBench and MomentSeeker in the small release.
FIXTURE_VERSION = 3
FIRST = 3  # the rows every dataset has (the tests' golden numbers are on these)


def _extra(i: int) -> tuple[str, str]:
    """The (colour, shape) of row ``i`` >= FIRST: every colour with a circle, then with a
    triangle, then a diamond (30 looks that none of the first rows' squares repeat)."""
    k = i - FIRST
    return NAMES[k % len(NAMES)], SHAPES[1 + (k // len(NAMES)) % (len(SHAPES) - 1)]


def _rows(queries: int) -> list[int]:
    """The row indices of a dataset: the first rows in the small release; in a larger one
    only new looks (``FIRST`` onwards). The first rows' flat colours would be hubs among the
    sample world's pictures (every caption naming a colour lands on them first), so a larger
    release leaves them out and measures what training teaches."""
    return list(range(queries)) if queries <= FIRST else list(range(FIRST, FIRST + queries))


def _next_in(rows: list[int], i: int, step: int = 1) -> int:
    return rows[(rows.index(i) + step) % len(rows)]


class SampleWorld:
    """Extra rows drawn by the sample corpus's renderer (its scenes, motions and pages,
    from a seed of their own): what a model trained on the sample corpus can learn, so the
    larger release shows whether it did. Texts are never repeated."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.texts: set[str] = set()

    def _new(self, make):
        while True:
            text, *rest = make()
            if text not in self.texts:
                self.texts.add(text)
                return (text, *rest)

    def scene(self) -> tuple[str, Image.Image]:
        def make():
            placed = draw.place_shapes(self.rng, SCENE_SIZE, int(self.rng.integers(1, 4)))
            return draw.caption(placed), draw.scene_image(self.rng, placed, SCENE_SIZE)

        return self._new(make)

    def motion(self) -> tuple[str, list[Image.Image]]:
        def make():
            motion = draw.random_motion(self.rng, VIDEO_SIZE, int(self.rng.integers(2)))
            frames = motion.frames(2.0, 10)
            picked = [frames[round(k * (len(frames) - 1) / (FRAMES - 1))] for k in range(FRAMES)]
            return motion.caption, picked

        return self._new(make)

    def page(self) -> tuple[str, Image.Image]:
        """A question about one line of a new page, and the page."""

        def make():
            page = draw.random_page(self.rng, "survey")
            label = page.lines[int(self.rng.integers(len(page.lines)))][0]
            return f"How many {label} were counted in the {page.title}?", draw.render_page(page)

        return self._new(make)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _frames(folder: Path, color: str, shape: str = "square") -> None:
    for i in range(FRAMES):
        _save(picture(color, shape, shade=6 * i), folder / f"frame_{i + 1:04d}.jpg")


def _table(root: Path, repo: str, relative: str, rows: list[dict[str, Any]]) -> None:
    path = root / ANNOTATIONS / repo / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _media(root: Path, dataset: str) -> Path:
    return root / benchmark_dataset(dataset).media


SHARD = "test-00000-of-00001.parquet"
IMAGE_REPO = "ziyjiang/MMEB_Test_Instruct"


def _image_tasks(root: Path, queries: int) -> None:
    tasks = root / "image-tasks"
    cls, qa, t2i, vg = [], [], [], []
    width = 3 if queries <= FIRST else 5  # candidates per retrieval query
    world = SampleWorld(seed=2026)
    rows = _rows(queries)
    scenes = {i: world.scene() for i in rows if i >= FIRST}
    for i in rows:
        color, shape = (NAMES[i], "square") if i < FIRST else _extra(i)
        others = [n for n in NAMES[:4] if n != color][:3]
        _save(picture(color, shape), tasks / f"ImageNet-1K/{i}.png")
        cls.append(
            {
                "qry_inst": "<|image_1|> Represent the given image for classification",
                "qry_text": "",
                "qry_img_path": f"ImageNet-1K/{i}.png",
                "tgt_inst": "Represent the class label: ",
                "tgt_text": [color, *others],
                "tgt_img_path": ["", "", "", ""],
            }
        )
        color, shape = (NAMES[i + 3], "circle") if i < FIRST else _extra(i)
        k = NAMES.index(color)
        _save(picture(color, shape), tasks / f"OK-VQA/{i}.png")
        qa.append(
            {
                "qry_inst": "<|image_1|> Represent the given image with the following question:",
                "qry_text": "What colour is the background?",
                "qry_img_path": f"OK-VQA/{i}.png",
                "tgt_inst": "",
                "tgt_text": [color, NAMES[(k + 1) % 10], NAMES[(k + 2) % 10]],
                "tgt_img_path": ["", "", ""],
            }
        )
        if i < FIRST:
            text, image = f"a white square on {NAMES[6 + i]}", picture(NAMES[6 + i])
        else:
            text, image = scenes[i]
        # Its own picture and the next ones.
        targets = [f"MSCOCO_t2i/{_next_in(rows, i, j)}.png" for j in range(min(width, len(rows)))]
        t2i.append(
            {
                "qry_inst": "Find me an everyday image that matches the given caption:",
                "qry_text": text,
                "qry_img_path": "",
                "tgt_inst": "<|image_1|> Represent the given image.",
                "tgt_text": [""] * len(targets),
                "tgt_img_path": targets,
            }
        )
        _save(image, tasks / f"MSCOCO_t2i/{i}.png")
        color, shape = (NAMES[i], "square") if i < FIRST else _extra(i)
        seen_as = "circle" if i < FIRST else "square"  # the query shows another shape
        _save(picture(color, seen_as), tasks / f"MSCOCO/query_{i}.png")
        _save(picture(color, shape), tasks / f"MSCOCO/crop_{i}.png")
        vg.append(
            {
                "qry_inst": "<|image_1|> Select the portion of the image that isolates the "
                "object labeled as",
                "qry_text": f'"{color} {shape}"',
                "qry_img_path": f"MSCOCO/query_{i}.png",
                "tgt_inst": "<|image_1|> Represent the given cropped image of the object",
                "tgt_text": ["", ""],
                "tgt_img_path": [
                    f"MSCOCO/crop_{i}.png",
                    f"MSCOCO/crop_{_next_in(rows, i)}.png",
                ],
            }
        )
    for key, table in (("ImageNet-1K", cls), ("OK-VQA", qa), ("MSCOCO_t2i", t2i), ("MSCOCO", vg)):
        _table(root, IMAGE_REPO, f"{key}/{SHARD}", table)


def _video_tasks(root: Path, broken: bool, queries: int) -> None:
    indices = _rows(queries)
    rows = []
    world = SampleWorld(seed=2027)
    for i in indices:
        folder = _media(root, "MSR-VTT") / f"video{7000 + i}"
        if i < FIRST:
            _frames(folder, NAMES[i])
            caption = f"a white square on {NAMES[i]}"
        else:
            caption, frames = world.motion()
            for k, frame in enumerate(frames):
                _save(frame, folder / f"frame_{k + 1:04d}.jpg")
        rows.append(
            {
                "video_id": f"video{7000 + i}",
                "video": f"TestVideo/video{7000 + i}.mp4",
                "caption": caption,
            }
        )
    _table(root, "VLM2Vec/MSR-VTT", f"test_1k/{SHARD}", rows)

    rows = []
    for i in indices:
        label = BREAKFAST_LABELS[i % len(BREAKFAST_LABELS)]
        color, shape = (NAMES[i + 3], "circle") if i < FIRST else _extra(i)
        _frames(_media(root, "Breakfast") / f"P{i:02d}_cam01_{label}", color, shape)
        rows.append({"video_id": f"P{i:02d}_cam01_{label}", "pos_text": label})
    _table(root, "VLM2Vec/Breakfast", f"data/{SHARD}", rows)
    (root / ANNOTATIONS / "VLM2Vec/Breakfast/labels.txt").write_text("\n".join(BREAKFAST_LABELS))

    rows = []
    for i in indices:
        color, shape = (NAMES[i + 6], "square") if i < FIRST else _extra(i)
        _frames(_media(root, "NExTQA") / f"{4000 + i}", color, shape)
        k = NAMES.index(color)
        options = [NAMES[(k + j) % 10] for j in range(5)]
        rows.append(
            {
                "video": 4000 + i,
                "question": "what colour is the scene",
                "answer": 0,
                "qid": i,
                "type": "DC",
                **{f"a{j}": o for j, o in enumerate(options)},
            }
        )
    _table(root, "VLM2Vec/NExTQA", f"MC/{SHARD}", rows)

    rows = []
    for i in indices[:2] if queries <= FIRST else indices:  # two rows in the small release
        video = _media(root, "QVHighlight") / f"clip_{i}"
        if i < FIRST:
            color, shape = NAMES[i], "circle"
            _frames(video / "query", color, "square")
            _frames(video / "positive_0", color, shape)
            for k in range(3):
                _frames(video / f"negative_{k}", NAMES[(NAMES.index(color) + k + 1) % 10], shape)
            rows.append({"query": f"a white {shape} on {color}", "video_path": f"clip_{i}.mp4"})
            continue
        # Four moments, each a shape of one colour; the whole video (the query's) shows the
        # four side by side throughout, and the query names one moment's colour in the
        # sample world's words: only the text tells the clips apart.
        shape = SHAPES[i % len(SHAPES)]
        colours = [COLOURS_IN_WORLD[(i + k) % len(COLOURS_IN_WORLD)] for k in range(4)]
        overview = Image.new("RGB", (SIZE, SIZE))
        for k, colour in enumerate(colours):
            tile = object_picture(colour, shape).resize((SIZE // 2, SIZE // 2))
            overview.paste(tile, (SIZE // 2 * (k % 2), SIZE // 2 * (k // 2)))
        for f in range(FRAMES):
            _save(overview, video / "query" / f"frame_{f + 1:04d}.jpg")
        for k, colour in enumerate(colours):
            folder = video / ("positive_0" if k == 0 else f"negative_{k - 1}")
            for f in range(FRAMES):
                _save(object_picture(colour, shape, shift=2 * f), folder / f"frame_{f + 1:04d}.jpg")
        text = f"{draw.with_article(colours[0] + ' ' + shape)}"
        rows.append({"query": text, "video_path": f"clip_{i}.mp4"})
    _table(root, "VLM2Vec/QVHighlight", f"data/{SHARD}", rows)

    if queries <= FIRST:
        _mvbench(root)
        _momentseeker(root)

    if broken:
        rows = []
        for i in range(2):
            if i == 0:  # the other video's frames are missing
                _frames(_media(root, "DiDeMo") / f"didemo_{i}", NAMES[i])
            rows.append({"video": f"didemo_{i}.mp4", "caption": f"scene {i}"})
        _table(root, "VLM2Vec/DiDeMo", f"data/{SHARD}", rows)


def _mvbench(root: Path) -> None:
    """Three questions over two task folders; frame folders carry the video's extension."""
    tasks = {"action_sequence": [0, 1], "object_shuffle": [2]}
    for task, indices in tasks.items():
        rows = []
        for i in indices:
            colour = NAMES[i + 2]
            video = f"{task}_{i}.mp4"
            _frames(_media(root, "MVBench") / task / video, colour, "diamond")
            k = NAMES.index(colour)
            options = [NAMES[(k + 2) % 10], colour, NAMES[(k + 4) % 10]]
            rows.append(
                {
                    "question": "What colour fills the scene?",
                    "video": video,
                    "candidates": options,
                    "answer": colour,
                }
            )
        _table(root, "VLM2Vec/MVBench", f"{task}/train-00000-of-00001.parquet", rows)


def _momentseeker(root: Path) -> None:
    """A text query, an image query and a video-segment query, each over its clips."""
    media = _media(root, "MomentSeeker")
    rows = []
    for i, given in enumerate(["", "images/ms_1.jpg", "movies/ms_2/0_4.mp4"]):
        colour = NAMES[i + 5]
        clips = {
            f"movies/ms_{i}/{start}_{start + 3}.mp4": c
            for start, c in ((10, colour), (20, NAMES[(i + 7) % 10]), (30, NAMES[(i + 8) % 10]))
        }
        for path, c in clips.items():
            _frames(media / "video_frames" / path.replace("/", "_")[: -len(".mp4")], c, "circle")
        if given.endswith(".jpg"):
            _save(picture(colour, "circle"), media / f"query_{given}")
        elif given:
            _frames(media / "video_frames" / given.replace("/", "_")[: -len(".mp4")], colour)
        paths = list(clips)
        rows.append(
            {
                "query": f"the moment shown in {colour}",
                "input_frames": given,
                "positive_frames": [{"output_path": paths[0]}],
                "negative_frames": [{"output_path": p} for p in paths[1:]],
            }
        )
    _table(root, "VLM2Vec/MomentSeeker", f"data/{SHARD}", rows)


def _beir(
    root: Path, dataset: str, pages_on_disk: bool, queries: int, absent_qrel: bool = False
) -> None:
    item = benchmark_dataset(dataset)
    corpus, queries_rows, qrels = [], [], []
    world = SampleWorld(seed=2028 + len(dataset))
    small = queries <= FIRST
    pages = [picture(NAMES[i], "square" if i % 2 else "circle") for i in range(4)] if small else []
    questions = [f"which page is {NAMES[i]}?" for i in range(FIRST)] if small else []
    for _ in range(0 if small else queries):  # a question about one line of each new page
        question, page = world.page()
        questions.append(question)
        pages.append(page)
    for i, image in enumerate(pages):
        cid = f"{i}"
        if pages_on_disk:
            _save(image, root / item.media / f"{cid}.png")
        corpus.append({"corpus-id": cid, "image": {"bytes": _png(image), "path": f"{cid}.png"}})
    for i, text in enumerate(questions):
        queries_rows.append({"query-id": f"q{i}", "query": text})
        qrels.append({"query-id": f"q{i}", "corpus-id": f"{i}", "score": 2})
        if small:  # graded: the next page half counts
            qrels.append({"query-id": f"q{i}", "corpus-id": f"{i + 1}", "score": 1})
    if small:
        qrels.append({"query-id": "q0", "corpus-id": "3", "score": 0})  # dropped: score 0
    if absent_qrel:
        qrels.append({"query-id": "q1", "corpus-id": "999", "score": 1})
    if not pages_on_disk:
        for row in corpus:
            row["image"] = {"bytes": row["image"]["bytes"], "path": None}
    else:
        for row in corpus:
            row["image"] = {"bytes": None, "path": row["image"]["path"]}
    for config, rows in (("queries", queries_rows), ("corpus", corpus), ("qrels", qrels)):
        _table(root, item.annotations, f"{config}/{SHARD}", rows)


def build_release_fixture(out: str | Path, broken: bool = False, queries: int = FIRST) -> Path:
    """Write the scaled-down release at ``out`` (replacing it); returns its path.

    ``queries`` rows per dataset: ``FIRST`` is the small release (flat-colour rows the
    tests' golden numbers are on; QVHighlight has two); more gives that many rows of new
    looks and sample-world scenes, motions and pages (none of the first rows), so a score
    on the larger release is a mean over enough queries for its bootstrap interval to mean
    something, and measures what a model trained on the sample corpus learned."""
    if queries < FIRST:
        raise ValueError(f"queries must be at least {FIRST}, got {queries}")
    if queries > 3 * len(NAMES):
        raise ValueError(f"queries must be at most {3 * len(NAMES)} (distinct looks)")
    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _image_tasks(root, queries)
    _video_tasks(root, broken, queries)
    _beir(root, "ViDoRe_esg_reports_human_labeled_v2", True, queries)
    _beir(root, "ViDoRe_arxivqa", False, queries)
    if broken:
        _beir(root, "ViDoRe_docvqa", True, FIRST, absent_qrel=True)
    return root
