"""Compact embeddings: prefixes, quantised codes, calibration, and their scores.

Numbers are worked out by hand beside each assertion; the evaluation cases use a table
encoder whose vectors make each prefix and precision rank in a known way.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from rzenembed.compact import (
    Calibration,
    PrecisionError,
    calibrate,
    code_bytes,
    compact,
    comparable,
    grid,
    prefix,
    quantize,
)
from rzenembed.config import EvalConfig, ServeLimits
from rzenembed.evaluation import evaluate
from rzenembed.evaluation.leaderboard import leaderboard_scores
from rzenembed.evaluation.report import build_report, to_markdown, write_report
from rzenembed.evaluation.runner import Variants
from rzenembed.serving.protocol import (
    LocationReader,
    RequestError,
    check_precision,
    decode_vector,
    embeddings_response,
    parse_request,
)
from tests.test_evaluation import TextKeyEncoder, write_set


def test_a_prefix_is_renormalised_and_the_full_size_is_left_alone():
    vectors = np.array([[3.0, 4.0, 12.0]], dtype=np.float32) / 13.0
    assert np.allclose(prefix(vectors, 2), [[0.6, 0.8]])  # (3, 4) / 5
    assert prefix(vectors, 3) is vectors and prefix(vectors, None) is vectors
    with pytest.raises(ValueError, match="a prefix of 4 components"):
        prefix(vectors, 4)


@pytest.mark.parametrize(
    ("precision", "size"),
    [("float", 1024), ("int8", 256), ("uint8", 256), ("binary", 32), ("ubinary", 32)],
)
def test_bytes_a_vector_at_each_precision(precision, size):
    assert code_bytes(256, precision) == size
    assert code_bytes(10, "binary") == 2  # ten bits still take two bytes


def test_int8_and_uint8_map_the_calibrated_range_onto_256_levels():
    calibration = Calibration(
        {2: (np.array([-0.5, 0.0], np.float32), np.array([0.5, 1.0], np.float32))}
    )
    vectors = np.array([[-0.5, 1.0], [0.0, 0.5], [0.9, -0.2]], dtype=np.float32)
    # levels: (x - low) / (high - low) * 255, rounded, clipped to 0..255
    # row 0: 0 and 255; row 1: 127.5 -> 128 and 127.5 -> 128; row 2: clipped to 255 and 0
    assert quantize(vectors, "uint8", calibration).tolist() == [[0, 255], [128, 128], [255, 0]]
    assert quantize(vectors, "int8", calibration).tolist() == [[-128, 127], [0, 0], [127, -128]]
    with pytest.raises(PrecisionError, match=r"calibrated for dimensions \[2\]; 1 is not"):
        quantize(vectors[:, :1], "int8", calibration)
    with pytest.raises(PrecisionError, match="needs a calibration"):
        quantize(vectors, "int8", None)


def test_binary_packs_one_bit_per_positive_component_most_significant_first():
    vectors = np.array([[0.1, -0.2, 0.3, 0.0, 0.5, -0.1, -0.3, 0.2, 0.4, -0.5]])
    # bits 1 0 1 0 1 0 0 1 | 1 0 (padded with zeros): 0b10101001 = 169, 0b10000000 = 128
    assert quantize(vectors, "ubinary").tolist() == [[169, 128]]
    assert quantize(vectors, "binary").tolist() == [[41, 0]]  # the same bytes minus 128
    other = np.array([[0.1, 0.2, 0.3, 0.4, -0.5, -0.1, -0.3, 0.2, -0.4, -0.5]])
    # Hamming distance to the first: components 1, 3, 4, 8 differ -> 4; dot = 10 - 2 * 4
    for kind in ("binary", "ubinary"):
        a, b = (comparable(quantize(v, kind), kind, 10) for v in (vectors, other))
        assert (a @ b.T).item() == 10 - 2 * 4


def test_uint8_ranks_as_int8_once_its_offset_is_taken_off():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    calibration = calibrate(vectors, [4])
    for dim in (4, 8):
        signed, unsigned = (
            comparable(compact(vectors, dim, p, calibration), p, dim) for p in ("int8", "uint8")
        )
        assert np.array_equal(signed, unsigned)


def test_a_calibration_holds_each_prefix_and_survives_its_file():
    vectors = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]], dtype=np.float32)
    calibration = calibrate(vectors, [1, 2, 8], source={"rows": 3})
    assert calibration.dimensions == [1, 2, 3]  # the full size always, none past it
    low, high = calibration.ranges[2]
    # 2-prefixes renormalised: (0.6, 0.8), (0, 1), (1, 0)
    assert np.allclose(low, [0.0, 0.0]) and np.allclose(high, [1.0, 1.0])
    again = Calibration.loads(calibration.dumps())
    assert again.source == {"rows": 3} and again.dimensions == [1, 2, 3]
    assert all(np.array_equal(again.ranges[d][0], calibration.ranges[d][0]) for d in (1, 2, 3))
    broken = json.loads(calibration.dumps())
    broken["ranges"]["2"]["low"] = [0.0]
    with pytest.raises(ValueError, match="the ranges of 2 have another size"):
        Calibration.from_json(broken)


def test_the_grid_is_every_smaller_trained_size_and_the_full_one():
    expected = [(2, "float"), (2, "binary"), (8, "float"), (8, "binary")]
    assert grid([2, 8, 16], 8, ["float", "binary"]) == expected
    with pytest.raises(PrecisionError, match="precision must be one of"):
        grid([2], 8, ["fp4"])


# Four components: the first two are the same for every text, the last two decide. A
# 2-prefix therefore ties every candidate (tie-exact hit@1: 1/2 with two candidates).
TABLE = {"q1": [1, 0, 1, 0], "q2": [1, 0, -1, 0], "a": [1, 0, 1, 0], "b": [1, 0, -1, 0]}


PRECISIONS = ("float", "int8", "uint8", "binary")


def _variants_report(tmp_path, precisions=PRECISIONS):
    folder = write_set(tmp_path / "s", [("q1", [], ["a"]), ("q2", [], ["b"])], ["a", "b"])
    encoder = TextKeyEncoder(TABLE)
    unit = np.array([TABLE[k] for k in ("q1", "q2", "a", "b")], dtype=np.float32) / np.sqrt(2)
    variants = Variants([2], list(precisions), calibrate(unit, [2]))
    (score,) = evaluate(encoder, folder, variants=variants)
    return score


def test_every_prefix_and_precision_is_scored_from_one_embedding_pass(tmp_path):
    score = _variants_report(tmp_path)
    got = {k: v["score"] for k, v in score.variants.items()}
    # Full size: every precision keeps the deciding third component -> both queries hit.
    # The 2-prefix ties both candidates for every query -> 1/2 at every precision.
    assert got == {f"{d}/{p}": {2: 0.5, 4: 1.0}[d] for d in (2, 4) for p in PRECISIONS}
    assert score.variants["4/float"]["per_query"] == score.per_query == [1.0, 1.0]
    assert score.score == 1.0


def test_other_sizes_asked_later_are_ranked_from_the_cached_vectors(tmp_path):
    folder = write_set(tmp_path / "s", [("q1", [], ["a"]), ("q2", [], ["b"])], ["a", "b"])
    encoder, cache = TextKeyEncoder(TABLE), tmp_path / "cache"
    (plain,) = evaluate(encoder, folder, model_digest="m", cache_dir=cache)
    assert plain.variants == {} and sorted(encoder.encoded) == ["a", "b", "q1", "q2"]
    resumed = []
    (halves,) = evaluate(
        encoder,
        folder,
        model_digest="m",
        cache_dir=cache,
        variants=Variants([2], ["float"]),
        on_dataset=lambda score, was_stored: resumed.append(was_stored),
    )
    assert len(encoder.encoded) == 4 and resumed == [True]  # nothing embedded again
    assert {k: v["score"] for k, v in halves.variants.items()} == {"2/float": 0.5, "4/float": 1.0}
    (again,) = evaluate(
        encoder, folder, model_digest="m", cache_dir=cache, variants=Variants([2], ["float"])
    )
    assert again.variants == halves.variants  # stored beside the score this time
    assert len(list((cache / "compact-scores").glob("*.json"))) == 1


def test_int8_and_uint8_are_left_out_without_a_calibration(tmp_path):
    folder = write_set(tmp_path / "s", [("q1", [], ["a"])], ["a", "b"])
    variants = Variants([2], ["float", "int8", "uint8", "binary"], None)
    (score,) = evaluate(TextKeyEncoder(TABLE), folder, variants=variants)
    assert sorted(score.variants) == ["2/binary", "2/float", "4/binary", "4/float"]


def test_report_and_leaderboard_show_scores_per_dimension_and_precision(tmp_path):
    score = _variants_report(tmp_path)
    model = {"path": "m", "trained_dimensions": [2], "calibration": {"rows": 4, "uri": "x"}}
    report = build_report([score], model)
    section = report["compact"]
    assert section["dimensions"] == [2, 4] and section["trained_dimensions"] == [2]
    half = section["variants"]["2/int8"]
    assert half["scores"]["All"] == 0.5 and half["bytes"] == 2
    assert half["share_of_full"]["All"] == 0.5  # 0.5 of the full float score of 1.0
    low, high = half["intervals"]["All"]
    assert low <= 0.5 <= high  # the bootstrap of two tied queries: every draw is 0.5
    markdown = to_markdown(report)
    assert "Nested dimensions" not in markdown  # the section is added by write_report
    paths = write_report([score], tmp_path / "out", model)
    text = paths["markdown"].read_text()
    assert "## Nested dimensions and precisions" in text
    # One Image dataset: the Image and All columns, then the share of full kept.
    assert "| 2 † | 8 | 50.0 [50.0, 50.0] | 50.0 [50.0, 50.0] | 50% |" in text
    assert "| 4 | 16 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 100% |" in text
    assert "100.0 [100.0, 100.0] (1 B)" in text  # binary at 4 dimensions: 4 bits, 1 byte
    assert paths["dimensions"].stat().st_size > 0 and paths["dimensions"].name == "dimensions.png"
    board = json.loads(paths["leaderboard"].read_text())
    assert board["compact"] == {}  # "d" is not a benchmark dataset


def test_the_leaderboard_carries_benchmark_datasets_per_variant(tmp_path):
    score = _variants_report(tmp_path)
    score.name = "MSCOCO_t2i"
    report = build_report([score], {"path": "m"})
    board = leaderboard_scores(report, "m")
    assert board["compact"]["2/binary"]["datasets"] == {"MSCOCO_t2i": 0.5}
    assert board["compact"]["4/float"]["scores"]["All"] == 1.0


def test_eval_config_names_precisions_and_dimensions():
    cfg = EvalConfig(dimensions=[64, 8, 8])
    assert cfg.dimensions == [8, 64] and cfg.precisions == ["float", "int8", "binary"]
    with pytest.raises(ValueError, match=r"eval\.dimensions must be > 0"):
        EvalConfig(dimensions=[0])
    with pytest.raises(ValueError, match="precisions"):
        EvalConfig(precisions=["fp4"])


# --------------------------------------------------------------------------- endpoint


def _request(**fields):
    return parse_request({"input": ["x", "y"], **fields}, ServeLimits(), LocationReader([], None))


MODEL = {"name": "m", "version": "1", "digest": "d", "uri": "models:/m/1", "dimensions": 4}


def test_the_endpoint_answers_int8_and_binary_codes_with_their_sizes():
    vectors = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5]], dtype=np.float32)
    calibration = calibrate(vectors, [2])
    body = embeddings_response(vectors, [1, 1], _request(precision="int8"), MODEL, calibration)
    first = body["data"][0]["embedding"]
    assert len(first) == 4 and all(isinstance(v, int) and -128 <= v <= 127 for v in first)
    assert body["rzenembed"]["precision"] == "int8"
    packed = embeddings_response(
        vectors, [1, 1], _request(precision="binary", encoding_format="base64"), MODEL
    )
    raw = base64.b64decode(packed["data"][1]["embedding"])
    # + - + - then padding: 0b10100000 = 160; binary sends it as the int8 160 - 128 = 32
    assert len(raw) == 1 and raw[0] == 32
    assert decode_vector(packed["data"][1]["embedding"], "binary").tolist() == [32]
    unsigned = embeddings_response(vectors, [1, 1], _request(precision="ubinary"), MODEL)
    assert unsigned["data"][1]["embedding"] == [160]
    cut = embeddings_response(
        vectors, [1, 1], _request(precision="int8", dimensions=2), MODEL, calibration
    )
    assert len(cut["data"][0]["embedding"]) == 2
    with pytest.raises(RequestError, match=r"calibrated for dimensions \[2, 4\]; 3") as err:
        embeddings_response(
            vectors, [1, 1], _request(precision="int8", dimensions=3), MODEL, calibration
        )
    assert err.value.param == "dimensions"


def test_an_unknown_or_uncalibrated_precision_is_a_400_naming_the_field():
    with pytest.raises(RequestError, match="precision must be one of") as err:
        _request(precision="fp4")
    assert (err.value.param, err.value.status) == ("precision", 400)
    request = _request(precision="uint8")
    with pytest.raises(RequestError, match="needs a calibration") as err:
        check_precision(request, {**MODEL, "precisions": ["float", "binary", "ubinary"]})
    assert err.value.param == "precision"


# --------------------------------------------------------------------------- calibration


class HashedSides:
    """A side encoder whose vectors depend on the text only; counts what it embeds."""

    def __init__(self):
        self.embedded = 0

    def encode_sides(self, sides, media_root, max_frames, batch_size=16, progress=None):
        import torch

        self.embedded += len(sides)
        rows = [np.random.default_rng(abs(hash(s["text"])) % 2**32).normal(size=8) for s in sides]
        return torch.nn.functional.normalize(torch.tensor(np.array(rows), dtype=torch.float32))


def _training_manifest(tmp_path):
    from rzenembed.data.schema import RECORD_SCHEMA, records_table
    from rzenembed.data.version import VersionWriter
    from rzenembed.prep.mixture import StageDataset, StageManifest
    from tests.test_rows import text_rows

    writer = VersionWriter(str(tmp_path / "v"), RECORD_SCHEMA)
    for k in range(3):
        writer.write_shard(f"part-{k:05d}", records_table(text_rows(k)))
    version = writer.commit(
        dataset="lazy",
        step="test",
        config_digest="c",
        code_version="1",
        inputs=[],
        stats={"media_root": str(tmp_path / "media")},
    )
    dataset = StageDataset(
        "lazy", version.uri, version.content_digest, version.rows, "text_retrieval", 1.0
    )
    path = tmp_path / "stage-manifest.json"
    path.write_text(StageManifest("stage2", "m", [dataset]).to_json())
    return str(path)


def test_calibration_draws_training_rows_from_a_few_shards(tmp_path):
    from rzenembed.evaluation.calibration import calibration_sides

    manifest = _training_manifest(tmp_path)  # 3 shards of 150 rows
    ((_, sides),) = calibration_sides([manifest], rows=40, seed=0)
    queries, positives = sides[::2], sides[1::2]
    assert len(queries) == 40 and len({q["text"] for q in queries}) == 40  # no row twice
    # Each positive is its own row's ("query 1.7 xxx..." -> "answer 1.7").
    pairs = zip(queries, positives, strict=True)
    assert all(p["text"] == "answer " + q["text"].split()[1] for q, p in pairs)
    shards = {q["text"].split()[1].split(".")[0] for q in queries}
    assert len(shards) == 2  # ceil(40 / 32) shards read, never one per row
    assert calibration_sides([manifest], rows=40, seed=0) == [(_, sides)]  # seeded
    assert calibration_sides([manifest], rows=40, seed=1) != [(_, sides)]


def test_a_model_is_calibrated_once_on_its_own_training_data(tmp_path):
    from rzenembed.config import config_from_dict
    from rzenembed.evaluation.calibration import calibrate_model, training_manifests

    manifest = _training_manifest(tmp_path)
    kept = [{"kept": True, "stage_manifest": manifest}, {"kept": False, "stage_manifest": "x"}]
    extra = {"soup": {"adapters": kept}}
    assert training_manifests(extra) == [manifest]  # the adapters the soup kept
    cfg = config_from_dict({"model": {"name_or_path": "x"}, "eval": {"calibration_rows": 40}})
    model = tmp_path / "model"
    model.mkdir()
    encoder = HashedSides()
    first = calibrate_model(cfg, encoder, str(model), "digest", extra, [2, 4])
    assert encoder.embedded == 80 and first.dimensions == [2, 4, 8]
    stored = Calibration.loads((model / "quantization.json").read_text())
    assert stored.source == first.source and stored.source["stage_manifests"] == [manifest]
    again = calibrate_model(cfg, encoder, str(model), "digest", extra, [2])
    assert encoder.embedded == 80 and again.dimensions == [2, 4, 8]  # read, not embedded
    other = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"calibration_rows": 20})})
    calibrate_model(other, encoder, str(model), "digest", extra, [2])
    assert encoder.embedded == 120  # another sample: made again
    off = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"calibration_rows": 0})})
    assert calibrate_model(off, encoder, str(model), "digest", extra, [2]) is None
    assert calibrate_model(cfg, encoder, str(model), "digest", {}, [2]) is None  # no data named
