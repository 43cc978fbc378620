"""Pure pieces of the prep steps, checked against brute force and hand references."""

from __future__ import annotations

import random

import pytest

from rzenembed.data.media import hamming
from rzenembed.prep.cap import rank
from rzenembed.prep.dedup import RowFacts, decide
from rzenembed.prep.dedup import bands as _bands
from rzenembed.prep.merge import common_root, normalise_label
from rzenembed.prep.video import _neighbours, clip_windows


def test_bands_cover_all_64_bits_exactly_once():
    for count in (1, 3, 5, 7):
        value = (1 << 64) - 1
        bands = _bands(value, count)
        assert len(bands) == count
        assert sum(bin(v).count("1") for _, v in bands) == 64


def facts(hashes: list[int], content: list[str] | None = None) -> list[RowFacts]:
    content = content or [f"c{i}" for i in range(len(hashes))]
    return [
        RowFacts(i, None, "", c, [h]) for i, (h, c) in enumerate(zip(hashes, content, strict=True))
    ]


@pytest.mark.parametrize("radius", [0, 2, 4, 8])
def test_near_duplicates_match_a_brute_force_search(radius):
    rng = random.Random(radius)
    base = [rng.getrandbits(64) for _ in range(40)]
    hashes = []
    for h in base:  # originals plus variants at random distances
        hashes.append(h)
        flips = rng.sample(range(64), rng.randint(0, 2 * radius + 2))
        hashes.append(h ^ sum(1 << b for b in flips))
    rng.shuffle(hashes)
    decisions = decide([facts(hashes)], radius)[0]
    kept: list[int] = []
    expected = {}
    for i, h in enumerate(hashes):
        if any(hamming(h, k) <= radius for k in kept):
            expected[i] = "duplicate_near"
        else:
            kept.append(h)
    assert {i: reason for i, (reason, _) in decisions.items()} == expected


def test_exact_duplicates_and_earlier_rejects_across_shards():
    shard_a = [RowFacts(0, None, "", "same", []), RowFacts(1, "image_blurry", "x", "z", [])]
    shard_b = [RowFacts(0, None, "", "same", []), RowFacts(1, None, "", "other", [])]
    decisions = decide([shard_a, shard_b], radius=4)
    assert decisions[0] == {1: ("image_blurry", "x")}
    assert decisions[1][0][0] == "duplicate_exact"
    assert 1 not in decisions[1]


def test_cap_rank_is_seeded_and_stable():
    assert rank(0, "a") == rank(0, "a")
    assert rank(0, "a") != rank(1, "a")
    assert 0 <= rank(3, "row-17") < 2**64


def test_label_normalisation_and_common_root():
    assert normalise_label("  Circle ") == normalise_label("circle") == "circle"
    assert normalise_label("Ｃｉｒｃｌｅ") == "circle"  # full-width folds under NFKC
    assert normalise_label("red  Car") == "red car"
    assert common_root(["/x/corpus/a", "/x/corpus/b"]) == "/x/corpus"
    assert common_root(["s3://b/corpus/a", "s3://b/corpus/b/c"]) == "s3://b/corpus"
    with pytest.raises(ValueError, match="different stores"):
        common_root(["/x/a", "s3://b/a"])


def test_clip_windows_along_segments_and_fixed_length():
    segments = [
        {"start_s": 4.0, "end_s": 8.0, "text": "b"},
        {"start_s": 0.0, "end_s": 4.0, "text": "a"},
        {"start_s": 8.0, "end_s": 8.5, "text": "too short"},
    ]
    assert clip_windows(9.0, segments, 10.0, 1.0) == [(0.0, 4.0, "a"), (4.0, 8.0, "b")]
    assert clip_windows(25.0, None, 10.0, 1.0) == [
        (0.0, 10.0, None),
        (10.0, 20.0, None),
        (20.0, 25.0, None),
    ]
    assert clip_windows(20.5, None, 10.0, 1.0) == [(0.0, 10.0, None), (10.0, 20.0, None)]
    assert clip_windows(0.6, None, 10.0, 1.0) == [(0.0, 0.6, None)]  # a short video: one clip


def test_sibling_negatives_are_nearest_in_time():
    assert _neighbours(0, 4, 2) == [1, 2]
    assert _neighbours(2, 4, 2) == [1, 3]
    assert _neighbours(1, 2, 5) == [0]


def test_merged_classification_renames_references_with_the_ids():
    from rzenembed.prep.merge import _rebase

    negative = {"instruction": "", "text": "", "media": [], "ref": "v#clip1"}
    assert _rebase(negative, "", "shapes")["ref"] == "shapes/v#clip1"
    assert _rebase({**negative, "ref": None}, "", "shapes")["ref"] is None


def test_dedup_partitions_follow_the_cluster_slots_within_the_shards():
    from rzenembed.prep.clean import partition_count

    assert partition_count(100_000, 25, slots=48) == 25  # an MMEB dataset on 48 slots
    assert partition_count(100_000, 25, slots=1) == 1  # one slot: one group-by task
    assert partition_count(100_000, 25, slots=8) == 8
    assert partition_count(20_000_000, 400, slots=2) == 64  # rows decide, capped at 64
    assert partition_count(1_000_000, 40, slots=2) == 5  # about 200k rows' keys each
    assert partition_count(0, 1, slots=48) == 1
