"""Small source folders in the on-disk layouts of the published datasets, written in code,
each with planted bad rows (the tests list what every bad row must be rejected for)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")


def picture(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):  # some edges, so the picture is not blurry
        for y in range(size[1]):
            image.putpixel((x, y), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
    image.save(path)
    return path.name


def text_retrieval(folder: Path) -> None:
    """The three shapes, one file each (the pairs as Parquet), and four bad rows."""
    write_jsonl(
        folder / "bge.jsonl",
        [
            {
                "query": "what is the capital of france",
                "pos": ["Paris is the capital of France.", "France's capital is Paris."],
                "neg": ["Berlin is in Germany.", {"title": "Rome", "text": "Capital of Italy."}],
                "pos_scores": [0.9, 0.8],
            },
            {"query": "   ", "pos": ["an answer"], "neg": []},  # empty query
            {"query": "nothing relevant", "pos": [], "neg": ["x"]},  # no positive
            '{"query": "cut off',  # not JSON
        ],
    )
    write_jsonl(
        folder / "tevatron.jsonl",
        [
            {
                "query_id": "q17",
                "query": "how do bees fly",
                "positive_passages": [
                    {"docid": "d1", "title": "Bees", "text": "Bees beat their wings fast."}
                ],
                "negative_passages": [
                    {"docid": "d2", "title": "", "text": "Birds fly with feathers."},
                    {"docid": "d3", "title": "Planes", "text": "Planes use jet engines."},
                ],
            },
            {"question": "a row of no known shape", "answers": ["x"]},  # unknown shape
        ],
    )
    triplets = pa.table(
        {
            "anchor": ["red fruit", "green fruit"],
            "positive": ["an apple", "a lime"],
            "negative_2": ["a cherry", "a kiwi"],
            "negative_1": ["a banana", "a grape"],
        }
    )
    pq.write_table(triplets, folder / "triplets.parquet")
    write_jsonl(folder / "pairs.jsonl", [{"query": "two plus two", "answer": "four"}])


def megapairs(folder: Path) -> None:
    """Images under images/, rows in rows.jsonl; bad: a missing image, undecodable bytes,
    a path outside the folder, no q_text."""
    images = folder / "images"
    names = [picture(images / f"img{k}.png", (40 * k, 90, 200 - 30 * k)) for k in range(5)]
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_jsonl(
        folder / "rows.jsonl",
        [
            {
                "q_img": f"images/{names[0]}",
                "q_text": ["make it red", "the same scene at night", "add a dog"],
                "t_img": f"images/{names[1]}",
                "hns": [f"images/{names[0]}", f"images/{names[2]}", f"images/{names[3]}"],
            },
            {
                "q_img": f"images/{names[2]}",
                "q_text": "a single text",
                "t_img": f"images/{names[4]}",
                "hns": [],
            },
            {"q_img": "images/gone.png", "q_text": ["x"], "t_img": f"images/{names[1]}"},
            {"q_img": "images/broken.png", "q_text": ["x"], "t_img": f"images/{names[1]}"},
            {"q_img": "../outside.png", "q_text": ["x"], "t_img": f"images/{names[1]}"},
            {"q_img": f"images/{names[3]}", "q_text": [], "t_img": f"images/{names[1]}"},
        ],
    )


def mmeb(folder: Path) -> None:
    """MMEB-train's original and diverse_instruction splits and an mmE5-synthetic file
    with stringified lists; bad: a list that does not parse, code in a list cell."""
    images = folder / "images"
    for k in range(3):
        picture(images / f"m{k}.png", (200, 60 * k, 30))
    write_jsonl(
        folder / "original.jsonl",
        [
            {
                "qry": "<|image_1|>\nRepresent the given image for classification",
                "qry_image_path": "images/m0.png",
                "pos_text": "a red square",
                "pos_image_path": "",
                "neg_text": "",
                "neg_image_path": "",
            }
        ],
    )
    write_jsonl(
        folder / "diverse_instruction.jsonl",
        [
            {
                "qry": "<|image_1|>\nWhich object does the picture show?",
                "qry_image_path": "images/m0.png",
                "pos_text": "a red square",
                "pos_image_path": "",
            }
        ],
    )
    write_jsonl(
        folder / "mme5_synthetic.jsonl",
        [
            {
                "qry": "Find an image that matches: a warm sunset",
                "qry_image_path": "",
                "pos_text": "<|image_1|> Represent the given image.",
                "pos_image_path": "images/m1.png",
                "neg_text": "['<|image_1|> Represent the given image.', 'a cold morning']",
                "neg_image_path": "['images/m2.png', '']",
            },
            {
                "qry": "broken negatives",
                "qry_image_path": "",
                "pos_text": "x",
                "pos_image_path": "",
                "neg_text": "['unclosed",
                "neg_image_path": "",
            },
            {
                "qry": "code in a cell",
                "qry_image_path": "",
                "pos_text": "x",
                "pos_image_path": "",
                "neg_text": "[__import__('os').system('echo owned')]",
                "neg_image_path": "",
            },
        ],
    )
