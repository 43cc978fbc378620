"""Small source folders in the on-disk layouts of the published datasets, written in code,
each with planted bad rows (the tests list what every bad row must be rejected for)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
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


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    # Stripes at a spacing of its own per colour: pictures differ in structure, not only in
    # colour, so the clean step's perceptual hash does not take them for near duplicates.
    step = 3 + (7 * colour[0] + 3 * colour[1] + colour[2]) % 11
    stripe = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    for x in range(0, size[0], step):
        for y in range(size[1]):
            # vertical stripes, or horizontal ones in the blue-dominant pictures
            spot = (
                (x, y)
                if colour[0] >= colour[2]
                else (y * size[0] // size[1], x * size[1] // size[0])
            )
            image.putpixel(spot, stripe)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(colour))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def _meta(key: str, status: str = "success", **extra) -> bytes:
    body = {"url": f"https://example.com/{key}.jpg", "key": key, "status": status, **extra}
    return json.dumps(body).encode()


def webdataset(folder: Path) -> None:
    """Two img2dataset shards; bad: a failed download, undecodable bytes, no image, no
    caption. Shard 0 holds five samples, so with 4-row chunks its second chunk starts
    mid-tar."""
    _tar(
        folder / "00000.tar",
        [
            ("000000000.jpg", _jpeg((200, 30, 30))),
            ("000000000.txt", b"a red square on white"),
            ("000000000.json", _meta("000000000", width=64, height=48)),
            ("000000001.json", _meta("000000001", "failed_to_download", error_message="timeout")),
            ("000000002.jpg", b"\xff\xd8\xff not a jpeg at all"),
            ("000000002.txt", b"broken bytes"),
            ("000000002.json", _meta("000000002")),
            ("000000003.png", _png((30, 200, 30))),
            ("000000003.json", _meta("000000003", caption="a green square, from the json")),
            ("000000004.txt", b"an image that never came"),
            ("000000004.json", _meta("000000004")),
        ],
    )
    _tar(
        folder / "00001.tar",
        [
            ("000010000.jpg", _jpeg((30, 30, 200))),
            ("000010000.txt", b"a blue square"),
            ("000010000.json", _meta("000010000")),
            ("000010001.jpg", _jpeg((90, 90, 90))),
            ("000010001.txt", b"   "),
            ("000010001.json", _meta("000010001")),
        ],
    )


def visdoc_parquet(folder: Path) -> None:
    """colpali's and VisRAG's layouts; two queries share a page; bad: no image bytes, an
    empty query, undecodable bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    page, other = _png((240, 240, 240), (96, 128)), _png((250, 230, 200), (96, 128))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    colpali = pa.table(
        {
            "query": [
                "What is the revenue in 2020?",
                "Who signed the report?",
                "Missing",
                " ",
                "Broken",
            ],
            "image": pa.array(
                [
                    {"bytes": page, "path": "p1.png"},
                    {"bytes": page, "path": "p1.png"},
                    {"bytes": None, "path": "p2.png"},
                    {"bytes": other, "path": "p3.png"},
                    {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "p4.png"},
                ],
                type=image,
            ),
            "image_filename": ["p1.png", "p1.png", "p2.png", "p3.png", "p4.png"],
            "answer": ["12 million", "The board", "x", "y", "z"],
        }
    )
    pq.write_table(colpali, folder / "colpali.parquet")
    visrag = pa.table(
        {
            "query": ["Which chart shows rainfall?"],
            "image": pa.array([{"bytes": other, "path": None}], type=image),
            "source": ["arxiv"],
        }
    )
    pq.write_table(visrag, folder / "visrag.parquet")


def _mp4(path: Path, frames: int = 12, fps: int = 4) -> None:
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(frames):
            pixels = np.full((48, 64, 3), 15 * index, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def llava_video(folder: Path) -> None:
    """An mp4 and a folder of ten frames (named frame_1..frame_10, each coloured by its
    number); bad: a missing video, no gpt turn, a folder without images."""
    _mp4(folder / "videos" / "clip.mp4")
    for k in range(1, 11):
        picture(folder / "frames" / "v2" / f"frame_{k}.jpg", (20 * k, 0, 0))
    (folder / "frames" / "empty").mkdir(parents=True)
    write_jsonl(
        folder / "train.jsonl",
        [
            {
                "id": "r0",
                "video": "videos/clip.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nDescribe the video."},
                    {"from": "gpt", "value": "A square fades from black to grey."},
                ],
            },
            {
                "id": "r1",
                "video": "frames/v2",
                "conversations": [
                    {"from": "human", "value": "<video>\nWhat colour is it at the end?"},
                    {"from": "gpt", "value": "Red."},
                ],
            },
            {
                "id": "r2",
                "video": "videos/missing.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nAnything?"},
                    {"from": "gpt", "value": "No."},
                ],
            },
            {
                "id": "r3",
                "video": "videos/clip.mp4",
                "conversations": [{"from": "human", "value": "<video>\nNo answer follows."}],
            },
            {
                "id": "r4",
                "video": "frames/empty",
                "conversations": [
                    {"from": "human", "value": "<video>\nEmpty?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            },
        ],
    )


def img2dataset_siblings(folder: Path) -> list[str]:
    """What img2dataset writes next to each ``NNNNN.tar`` of a ``webdataset`` folder: the
    shard's metadata table ``NNNNN.parquet`` (one row per sample it tried, failures
    included) and ``NNNNN_stats.json``. Neither is data: a reader that took the Parquet
    rows for samples would reject every one as ``schema_invalid``. The names written."""
    names = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        table = pa.table(
            {
                "key": [m["key"] for m in metas],
                "url": [m["url"] for m in metas],
                "caption": [m.get("caption") for m in metas],
                "status": [m["status"] for m in metas],
                "error_message": [m.get("error_message") for m in metas],
                "width": [m.get("width") for m in metas],
                "height": [m.get("height") for m in metas],
            }
        )
        pq.write_table(table, folder / f"{shard.stem}.parquet")
        stats = {"count": len(metas), "successes": sum(m["status"] == "success" for m in metas)}
        (folder / f"{shard.stem}_stats.json").write_text(json.dumps(stats, indent=4))
        names += [f"{shard.stem}.parquet", f"{shard.stem}_stats.json"]
    return names


LLAVA_MALFORMED = '{"id": "r5", "video": "videos/clip.mp4", "conversations": }'


def llava_video_json_array(folder: Path) -> None:
    """``llava_video``'s folder with its rows as one pretty-printed JSON array in
    ``train.json`` (as LLaVA releases ship them) and a malformed element
    (``LLAVA_MALFORMED``) third, at position 2: the rows after it shift by one."""
    llava_video(folder)
    lines = (folder / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").unlink()
    elements = [json.dumps(json.loads(line), indent=2) for line in lines]
    elements.insert(2, LLAVA_MALFORMED)
    (folder / "train.json").write_text("[\n" + ",\n".join(elements) + "\n]\n")


def llava_video_jsonl_gz(folder: Path) -> None:
    """``llava_video``'s folder with its rows gzipped (``train.jsonl.gz``) and a line that
    is not JSON third, at position 2."""
    llava_video(folder)
    lines = (folder / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").unlink()
    lines.insert(2, LLAVA_MALFORMED)
    with gzip.open(folder / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
