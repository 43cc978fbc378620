"""Clean on rows shaped like the real datasets, through ingest and clean on Ray: duplicate
*examples* go, shared images stay (VQA questions on one picture, colpali queries on one
page, COCO's five captions, a negative that is another row's positive); the ``image``
policy removes the extra captions of one picture; rows copied from an evaluation set are
rejected ``eval_overlap`` naming the set and item. Every input row is kept or rejected."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rzenembed.config import PipelineConfig, config_from_dict
from rzenembed.data import media as media_ops
from rzenembed.evaluation.evalset import write_eval_folder
from rzenembed.prep.clean import run_clean
from rzenembed.prep.ingest import run_ingest

from .format_fixtures import write_jsonl

pytestmark = pytest.mark.slow
RADIUS = 4


def photo(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A picture with the statistics of a photo: smooth structure (what pHash sees, stable
    under JPEG) and fine grain (so it is not blurry)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8), "RGB")
    smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str = "PNG", quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def phash_of(data: bytes) -> int:
    return media_ops.perceptual_hash(media_ops.decode_image(data, max_pixels=10**8))


def image_side(uri: str, text: str = "", instruction: str = "") -> dict:
    return {"instruction": instruction, "text": text, "media": [{"kind": "image", "uri": uri}]}


def text_side(text: str, instruction: str = "") -> dict:
    return {"instruction": instruction, "text": text, "media": []}


def row(row_id: str, query: dict, positive: dict, negatives: list[dict] | None = None) -> dict:
    return {"id": row_id, "query": query, "positive": positive, "negatives": negatives or []}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four sources and one evaluation set, written in their download layouts."""
    root = tmp_path_factory.mktemp("clean-rules")
    pictures = {name: photo(seed) for seed, name in enumerate(["bus", "page", "dog", "cat"])}

    vqa = root / "vqa"  # OK-VQA-like: several questions per picture
    (vqa / "images").mkdir(parents=True)
    (vqa / "images" / "bus.png").write_bytes(encoded(pictures["bus"]))
    (vqa / "images" / "bus.jpg").write_bytes(encoded(pictures["bus"], "JPEG"))  # re-encoded
    (vqa / "images" / "cat.png").write_bytes(encoded(pictures["cat"]))
    ask = "Answer the question about the image."
    write_jsonl(
        vqa / "train.jsonl",
        [
            row(
                "q0", image_side("images/bus.png", "What colour is the bus?", ask), text_side("red")
            ),
            row(
                "q1",
                image_side("images/bus.png", "How many wheels can you see?", ask),
                text_side("four"),
            ),
            row(
                "q2", image_side("images/bus.jpg", "What colour is the bus?", ask), text_side("red")
            ),
            row(
                "q3", image_side("images/cat.png", "What colour is the bus?", ask), text_side("red")
            ),
        ],
    )

    colpali = root / "colpali"  # vidore/colpali_train_set: queries about one page
    colpali.mkdir()
    page = encoded(pictures["page"])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "query": [
                "What is the revenue in 2020?",
                "Who signed the report?",
                "What is the revenue in 2020?",
            ],
            "image": pa.array([{"bytes": page, "path": "p1.png"}] * 3, type=image),
            "image_filename": ["p1.png"] * 3,
            "answer": ["12 million", "The board", "12 million"],
        }
    )
    pq.write_table(table, colpali / "colpali.parquet")

    coco = root / "coco"  # MSCOCO retrieval: five captions per picture
    (coco / "images").mkdir(parents=True)
    for name in ("dog", "cat"):
        (coco / "images" / f"{name}.png").write_bytes(encoded(pictures[name]))
    find = "Find an image that matches the given caption."
    captions = [
        "A dog runs across a field.",
        "A brown dog playing outside.",
        "The dog is chasing something in the grass.",
        "An animal running on a lawn.",
        "A happy dog in the park.",
    ]
    rows = [
        row(f"c{i}", text_side(c, find), image_side("images/dog.png"))
        for i, c in enumerate(captions)
    ]
    # A cat whose hard negative is the dog picture, another row's positive.
    rows.append(
        row(
            "c5",
            text_side("A cat sleeps on a sofa.", find),
            image_side("images/cat.png"),
            [image_side("images/dog.png")],
        )
    )
    write_jsonl(coco / "records.jsonl", rows)

    evalset = root / "eval" / "retrieval"  # a text-to-image evaluation set
    (evalset / "media").mkdir(parents=True)
    (evalset / "media" / "boat.png").write_bytes(encoded(photo(10)))
    (evalset / "media" / "tree.png").write_bytes(encoded(photo(11)))
    candidates = [
        {"cid": "boat", "dataset": "retrieval", "candidate": image_side("media/boat.png")},
        {"cid": "tree", "dataset": "retrieval", "candidate": image_side("media/tree.png")},
    ]
    queries = [
        {
            "qid": f"q-{cid}",
            "dataset": "retrieval",
            "category": "image_retrieval",
            "query": text_side(text, find),
            "candidate_ids": [],
            "relevant_ids": [cid],
        }
        for cid, text in [
            ("boat", "A small red boat drifting near the harbour."),
            ("tree", "A lone tree on a snowy hill."),
        ]
    ]
    write_eval_folder(evalset, queries, candidates, {"name": "retrieval"})

    copies = root / "copies"  # training rows that copy evaluation items, and one that does not
    (copies / "images").mkdir(parents=True)
    (copies / "images" / "boat.jpg").write_bytes(encoded(photo(10), "JPEG"))
    (copies / "images" / "fresh.png").write_bytes(encoded(photo(12)))
    (copies / "images" / "fresh2.png").write_bytes(encoded(photo(13)))
    write_jsonl(
        copies / "records.jsonl",
        [
            row("t0", text_side("A boat on the water.", find), image_side("images/boat.jpg")),
            row(
                "t1",
                text_side("  a SMALL red boat   drifting near the HARBOUR. ", find),
                image_side("images/fresh.png"),
            ),
            row(
                "t2",
                text_side("A green field under a blue sky.", find),
                image_side("images/fresh2.png"),
            ),
        ],
    )
    return root


def config(corpus: Path, storage: Path, dedup: str = "example") -> PipelineConfig:
    sources = [
        {"name": "vqa", "uri": "vqa", "task_group": "image_qa"},
        {
            "name": "colpali",
            "uri": "colpali",
            "format": "visdoc-parquet",
            "task_group": "visdoc_retrieval",
        },
        {"name": "coco", "uri": "coco", "task_group": "image_retrieval", "dedup": dedup},
        {"name": "copies", "uri": "copies", "task_group": "image_retrieval"},
    ]
    return config_from_dict(
        {
            "data_root": str(corpus),
            "model": {"name_or_path": "unused"},
            "storage": {"root": str(storage)},
            "sources": sources,
            "prep": {"phash_radius": RADIUS},
            "eval": {"sets": [str(corpus / "eval")]},
        }
    )


def cleaned(cfg: PipelineConfig, name: str) -> tuple[int, list[str], dict[str, tuple[str, str]]]:
    """Rows in, kept ids, and the rejects (id -> reason, detail) of one source's clean."""
    ingested = run_ingest(cfg, cfg.source(name), show_progress=False)
    version = run_clean(cfg, ingested, show_progress=False)
    kept = version.read_table(columns=["id"]).column("id").to_pylist()
    rejects = {r["id"]: (r["reason"], r["detail"]) for r in version.read_rejects().to_pylist()}
    assert ingested.rows == len(kept) + len(rejects) == version.manifest.stats["rows_in"]
    return ingested.rows, kept, rejects


@pytest.fixture(scope="module")
def example_cfg(ray_local, corpus, tmp_path_factory) -> PipelineConfig:
    return config(corpus, tmp_path_factory.mktemp("versions"))


def test_the_pictures_behave_like_photos(corpus):
    """The premises of the cases below: the JPEG copy is within the radius, the pictures
    are far apart."""
    bus_png = phash_of((corpus / "vqa/images/bus.png").read_bytes())
    bus_jpg = phash_of((corpus / "vqa/images/bus.jpg").read_bytes())
    cat = phash_of((corpus / "vqa/images/cat.png").read_bytes())
    assert (corpus / "vqa/images/bus.png").read_bytes() != (
        corpus / "vqa/images/bus.jpg"
    ).read_bytes()
    assert media_ops.hamming(bus_png, bus_jpg) <= RADIUS < media_ops.hamming(bus_png, cat)


def test_two_questions_on_one_picture_are_kept_and_a_repeated_example_is_not(example_cfg):
    rows, kept, rejects = cleaned(example_cfg, "vqa")
    assert rows == 4 and kept == ["q0", "q1", "q3"]
    assert rejects["q2"][0] == "duplicate_near"
    assert rejects["q2"][1] == "near shard 0 row 0"  # the first question, re-encoded


def test_queries_on_one_page_are_kept_and_the_repeated_one_is_exact(example_cfg):
    rows, kept, rejects = cleaned(example_cfg, "colpali")
    assert rows == 3 and len(kept) == 2
    ((reason, detail),) = rejects.values()
    assert reason == "duplicate_exact" and detail == "same content as shard 0 row 0"


def test_five_captions_of_one_picture_are_five_examples(example_cfg):
    rows, kept, rejects = cleaned(example_cfg, "coco")
    assert rows == 6 and kept == ["c0", "c1", "c2", "c3", "c4", "c5"] and not rejects


def test_the_image_policy_keeps_one_caption_per_picture(ray_local, corpus, tmp_path):
    cfg = config(corpus, tmp_path / "versions", dedup="image")
    rows, kept, rejects = cleaned(cfg, "coco")
    # The cat row's negative is the dog picture: negatives never make a duplicate.
    assert rows == 6 and kept == ["c0", "c5"]
    assert rejects == {f"c{i}": ("duplicate_near", "near shard 0 row 0") for i in range(1, 5)}


def test_rows_copied_from_the_evaluation_set_are_rejected_naming_the_item(example_cfg):
    rows, kept, rejects = cleaned(example_cfg, "copies")
    assert rows == 3 and kept == ["t2"]
    assert rejects["t0"][0] == rejects["t1"][0] == "eval_overlap"
    assert rejects["t0"][1].startswith("positive image within")
    assert rejects["t0"][1].endswith("of eval set retrieval / retrieval item boat")
    assert rejects["t1"][1] == "query text equals eval set retrieval / retrieval item q-boat"
    version = run_clean(
        example_cfg,
        run_ingest(example_cfg, example_cfg.source("copies"), show_progress=False),
        show_progress=False,
    )
    stats = version.manifest.stats
    assert stats["eval_overlap"] == {"retrieval/retrieval": 2}
    expected = Path(example_cfg.eval.sets[0], "retrieval").resolve()
    assert stats["decontaminated_against"]["sets"] == [str(expected)]


def test_the_evaluation_keys_are_built_once_per_content(example_cfg, corpus):
    from rzenembed.prep.decontaminate import ensure_eval_keys

    first = ensure_eval_keys(example_cfg, show_progress=False)
    stored = Path(first.uri)
    built = stored.stat().st_mtime_ns
    assert ensure_eval_keys(example_cfg, show_progress=False) == first
    assert stored.stat().st_mtime_ns == built  # reused, not rebuilt
    table = pq.read_table(stored)
    assert sorted(table.column("item").to_pylist()) == ["boat", "q-boat", "q-tree", "tree"]
    off = example_cfg.model_copy(
        update={"prep": example_cfg.prep.model_copy(update={"decontaminate": []})}
    )
    assert ensure_eval_keys(off, show_progress=False) is None


def test_a_missing_evaluation_set_stops_clean_with_a_hint(example_cfg, tmp_path):
    from rzenembed.evaluation.evalset import EvalSetError
    from rzenembed.prep.decontaminate import ensure_eval_keys

    missing = example_cfg.model_copy(
        update={"eval": example_cfg.eval.model_copy(update={"sets": [str(tmp_path / "nope")]})}
    )
    with pytest.raises(EvalSetError, match=r"nope.*set prep.decontaminate"):
        ensure_eval_keys(missing, show_progress=False)


def test_the_evaluation_image_index_finds_what_a_brute_force_search_finds():
    """5,000 evaluation hashes, 300 probes at 0-6 bits from a stored hash or random: the
    banded index answers within the radius exactly when the nearest hash is, at its
    distance."""
    from rzenembed.prep.decontaminate import KEY_SCHEMA, EvalKeys

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 5_000, dtype=np.int64).astype(np.uint64) * 2 + 1
    table = pa.table(
        {
            "set": ["s"] * 5_000,
            "dataset": ["d"] * 5_000,
            "item": [f"i{i}" for i in range(5_000)],
            "text": [None] * 5_000,
            "phash": hashes,
        },
        schema=KEY_SCHEMA,
    )
    keys = EvalKeys(table, RADIUS, 16)
    for probe in range(300):
        start = int(hashes[rng.integers(5_000)]) if probe % 2 else int(rng.integers(0, 2**63))
        flips = rng.choice(64, size=int(rng.integers(0, 7)), replace=False)
        value = start ^ sum(1 << int(b) for b in flips)
        distance = np.bitwise_count(hashes ^ np.uint64(value))
        found = keys.image_match(value)
        if distance.min() > RADIUS:
            assert found is None
        else:
            assert found is not None and found[1] == distance.min()
            assert distance[found[0]] == distance.min()


def test_evaluation_sets_on_the_storage_root_give_the_same_keys(
    ray_local, corpus, s3_endpoint, tmp_path
):
    """The cluster keeps its evaluation sets on S3: the keys are built from a staged copy,
    equal to those of the local folder; their identity comes from the listing (ETags)."""
    from rzenembed.data.storage import filesystem
    from rzenembed.prep.decontaminate import ensure_eval_keys

    fs, _ = filesystem("s3://rz-eval-sets", s3_endpoint)
    fs.mkdir("rz-eval-sets")
    fs.put(str(corpus / "eval"), "rz-eval-sets/eval", recursive=True)
    local = config(corpus, tmp_path / "local")
    remote = local.model_copy(
        update={
            "storage": local.storage.model_copy(update={"endpoint_url": s3_endpoint}),
            "prep": local.prep.model_copy(update={"decontaminate": ["s3://rz-eval-sets/eval"]}),
        }
    )
    mine, theirs = ensure_eval_keys(local, False), ensure_eval_keys(remote, False)
    assert theirs.sets == ["s3://rz-eval-sets/eval/retrieval"]
    assert ensure_eval_keys(remote, False) == theirs  # the same listing, the same keys file

    def rows(ref):
        table = pq.read_table(ref.uri, filesystem=filesystem(ref.uri, s3_endpoint)[0])
        return sorted(table.to_pylist(), key=lambda r: (r["item"], r["phash"] or 0))

    assert rows(theirs) == rows(mine)
