"""A scaled-down MMEB-V2 release, generated in code, in exactly the release's layout.

Ten datasets, a few rows each: one of every image category (ImageNet-1K, OK-VQA,
MSCOCO_t2i, MSCOCO), one video dataset of every kind (MSR-VTT retrieval, Breakfast
classification over its 10-label list, NExTQA multiple choice, QVHighlight moment
retrieval with ``query/``, ``positive*`` and negative clip folders) and two BEIR
visual-document sets with graded qrels (ViDoRe V2 ESG with its pages on disk, ViDoRe
arXivQA with its pages only inside the corpus Parquet). Pictures are flat colours with a
shape, named by the texts, so a model can learn the pairing. ``broken=True`` adds DiDeMo
with a video whose frame folder is missing and ViDoRe DocVQA with a qrel to a corpus id
that is not in the corpus: the importer must skip both and say why.

Tests and ``make demo`` use it; nothing is downloaded.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

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


def picture(color: str, shape: str = "square", shade: int = 0) -> Image.Image:
    """A flat background of ``color`` with a white ``shape``; ``shade`` varies frames."""
    r, g, b = COLORS[color]
    image = Image.new("RGB", (SIZE, SIZE), (min(r + shade, 255), g, b))
    draw = ImageDraw.Draw(image)
    box = (14, 14, 42, 42)
    if shape == "circle":
        draw.ellipse(box, fill="white")
    else:
        draw.rectangle(box, fill="white")
    return image


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


def _image_tasks(root: Path) -> None:
    tasks = root / "image-tasks"
    cls, qa, t2i, vg = [], [], [], []
    for i in range(3):
        color, others = NAMES[i], [n for n in NAMES[:4] if n != NAMES[i]]
        _save(picture(color), tasks / f"ImageNet-1K/{i}.png")
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
        _save(picture(NAMES[i + 3], "circle"), tasks / f"OK-VQA/{i}.png")
        qa.append(
            {
                "qry_inst": "<|image_1|> Represent the given image with the following question:",
                "qry_text": "What colour is the background?",
                "qry_img_path": f"OK-VQA/{i}.png",
                "tgt_inst": "",
                "tgt_text": [NAMES[i + 3], NAMES[(i + 4) % 10], NAMES[(i + 5) % 10]],
                "tgt_img_path": ["", "", ""],
            }
        )
        targets = [f"MSCOCO_t2i/{j}.png" for j in (i, (i + 1) % 3, (i + 2) % 3)]
        t2i.append(
            {
                "qry_inst": "Find me an everyday image that matches the given caption:",
                "qry_text": f"a white square on {NAMES[6 + i]}",
                "qry_img_path": "",
                "tgt_inst": "<|image_1|> Represent the given image.",
                "tgt_text": ["", "", ""],
                "tgt_img_path": targets,
            }
        )
        _save(picture(NAMES[6 + i]), tasks / f"MSCOCO_t2i/{i}.png")
        _save(picture(NAMES[i], "circle"), tasks / f"MSCOCO/query_{i}.png")
        _save(picture(NAMES[i], "square"), tasks / f"MSCOCO/crop_{i}.png")
        vg.append(
            {
                "qry_inst": "<|image_1|> Select the portion of the image that isolates the "
                "object labeled as",
                "qry_text": f'"{NAMES[i]} square"',
                "qry_img_path": f"MSCOCO/query_{i}.png",
                "tgt_inst": "<|image_1|> Represent the given cropped image of the object",
                "tgt_text": ["", ""],
                "tgt_img_path": [f"MSCOCO/crop_{i}.png", f"MSCOCO/crop_{(i + 1) % 3}.png"],
            }
        )
    for key, rows in (("ImageNet-1K", cls), ("OK-VQA", qa), ("MSCOCO_t2i", t2i), ("MSCOCO", vg)):
        _table(root, IMAGE_REPO, f"{key}/{SHARD}", rows)


def _video_tasks(root: Path, broken: bool) -> None:
    rows = []
    for i in range(3):
        _frames(_media(root, "MSR-VTT") / f"video{7000 + i}", NAMES[i])
        rows.append(
            {
                "video_id": f"video{7000 + i}",
                "video": f"TestVideo/video{7000 + i}.mp4",
                "caption": f"a white square on {NAMES[i]}",
            }
        )
    _table(root, "VLM2Vec/MSR-VTT", f"test_1k/{SHARD}", rows)

    rows = []
    for i, label in enumerate(BREAKFAST_LABELS[:3]):
        _frames(_media(root, "Breakfast") / f"P{i:02d}_cam01_{label}", NAMES[i + 3], "circle")
        rows.append({"video_id": f"P{i:02d}_cam01_{label}", "pos_text": label})
    _table(root, "VLM2Vec/Breakfast", f"data/{SHARD}", rows)
    (root / ANNOTATIONS / "VLM2Vec/Breakfast/labels.txt").write_text("\n".join(BREAKFAST_LABELS))

    rows = []
    for i in range(3):
        _frames(_media(root, "NExTQA") / f"{4000 + i}", NAMES[i + 6])
        options = [NAMES[(i + 6 + k) % 10] for k in range(5)]
        rows.append(
            {
                "video": 4000 + i,
                "question": "what colour is the scene",
                "answer": 0,
                "qid": i,
                "type": "DC",
                **{f"a{k}": o for k, o in enumerate(options)},
            }
        )
    _table(root, "VLM2Vec/NExTQA", f"MC/{SHARD}", rows)

    rows = []
    for i in range(2):
        video = _media(root, "QVHighlight") / f"clip_{i}"
        _frames(video / "query", NAMES[i])
        _frames(video / "positive_0", NAMES[i], "circle")
        for k in range(3):
            _frames(video / f"negative_{k}", NAMES[(i + k + 1) % 10], "circle")
        rows.append({"query": f"a white circle on {NAMES[i]}", "video_path": f"clip_{i}.mp4"})
    _table(root, "VLM2Vec/QVHighlight", f"data/{SHARD}", rows)

    if broken:
        rows = []
        for i in range(2):
            if i == 0:  # the other video's frames are missing
                _frames(_media(root, "DiDeMo") / f"didemo_{i}", NAMES[i])
            rows.append({"video": f"didemo_{i}.mp4", "caption": f"scene {i}"})
        _table(root, "VLM2Vec/DiDeMo", f"data/{SHARD}", rows)


def _beir(root: Path, dataset: str, pages_on_disk: bool, absent_qrel: bool = False) -> None:
    item = benchmark_dataset(dataset)
    corpus, queries, qrels = [], [], []
    for i in range(4):
        image = picture(NAMES[i], "square" if i % 2 else "circle")
        cid = f"{i}"
        if pages_on_disk:
            _save(image, root / item.media / f"{cid}.png")
        corpus.append({"corpus-id": cid, "image": {"bytes": _png(image), "path": f"{cid}.png"}})
    for i in range(3):
        queries.append({"query-id": f"q{i}", "query": f"which page is {NAMES[i]}?"})
        qrels.append({"query-id": f"q{i}", "corpus-id": f"{i}", "score": 2})
        qrels.append({"query-id": f"q{i}", "corpus-id": f"{i + 1}", "score": 1})
    qrels.append({"query-id": "q0", "corpus-id": "3", "score": 0})  # dropped: score 0
    if absent_qrel:
        qrels.append({"query-id": "q1", "corpus-id": "999", "score": 1})
    if not pages_on_disk:
        for row in corpus:
            row["image"] = {"bytes": row["image"]["bytes"], "path": None}
    else:
        for row in corpus:
            row["image"] = {"bytes": None, "path": row["image"]["path"]}
    for config, rows in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
        _table(root, item.annotations, f"{config}/{SHARD}", rows)


def build_release_fixture(out: str | Path, broken: bool = False) -> Path:
    """Write the scaled-down release at ``out`` (replacing it); returns its path."""
    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _image_tasks(root)
    _video_tasks(root, broken)
    _beir(root, "ViDoRe_esg_reports_human_labeled_v2", pages_on_disk=True)
    _beir(root, "ViDoRe_arxivqa", pages_on_disk=False)
    if broken:
        _beir(root, "ViDoRe_docvqa", pages_on_disk=True, absent_qrel=True)
    return root
