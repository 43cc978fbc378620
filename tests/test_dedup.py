"""Deduplication as a distributed group-by equals the sequential rule and brute force, under
both policies, on 10k planted rows with known near-duplicate clusters, shared and differing
texts, exact duplicates and multi-image rows; and the edges that reach the driver stay
bounded for a cluster of near-identical images."""

from __future__ import annotations

import numpy as np
import pytest

from rzenembed.prep.dedup import (
    RowFacts,
    decide,
    find_groups,
    order_of,
    partition_keys,
    planted_facts,
    resolve,
    row_keys,
    where,
)

RADIUS = 4
SHARDS, PER_SHARD = 10, 1000


def distributed(
    shards: list[list[RowFacts]], partitions: int, policy: str, limit: int = 8
) -> tuple[dict[int, tuple[str, int]], int, list[set[int]]]:
    """The three moves of the distributed rule, run in this process: the decisions, the
    edges sent to the driver in the first round, and the rows each later round asked for."""
    keys = []
    for s, rows in enumerate(shards):
        for r in rows:
            keys += row_keys(order_of(s, r.position), r, policy, RADIUS)
    tables = partition_keys(keys, partitions)
    groups = [find_groups(t, RADIUS, limit) for t in tables]
    asked: list[set[int]] = []

    def complete(rows: set[int]):
        asked.append(set(rows))
        return [find_groups(t, RADIUS, only=rows) for t in tables]

    found = resolve(groups, complete, limit)
    return found, sum(len(g.near) for g in groups), asked


def as_orders(decisions: list[dict[int, tuple[str, str]]]) -> dict[int, tuple[str, str]]:
    return {order_of(s, pos): d for s, shard in enumerate(decisions) for pos, d in shard.items()}


def brute_force(shards: list[list[RowFacts]], policy: str) -> dict[int, tuple[str, int]]:
    """Every row against every earlier kept row, all pairs, vectorised; the earliest match.
    Kept rows' hashes are held per shape: under ``example`` by (texts, image count), one
    row per kept row; under ``image`` one row per kept image."""
    kept: dict[object, _Kept] = {}
    content: dict[str, int] = {}
    out = {}
    for s, rows in enumerate(shards):
        for r in rows:
            order = order_of(s, r.position)
            if r.content_hash in content:
                out[order] = ("duplicate_exact", content[r.content_hash])
                continue
            match = _earliest_kept(r, kept, policy)
            if match is not None:
                out[order] = ("duplicate_near", match)
                continue
            content[r.content_hash] = order
            for shape, hashes in _shapes(r, policy):
                kept.setdefault(shape, _Kept(len(hashes))).add(order, hashes)
    return out


class _Kept:
    """Kept rows' orders and hashes of one shape, in arrays that grow by doubling."""

    def __init__(self, width: int):
        self.count = 0
        self.orders = np.empty(16, dtype=np.int64)
        self.hashes = np.empty((16, width), dtype=np.uint64)

    def add(self, order: int, hashes: list[int]) -> None:
        if self.count == len(self.orders):
            self.orders = np.resize(self.orders, 2 * self.count)
            self.hashes = np.resize(self.hashes, (2 * self.count, self.hashes.shape[1]))
        self.orders[self.count] = order
        self.hashes[self.count] = hashes
        self.count += 1


def _shapes(row: RowFacts, policy: str) -> list[tuple[object, list[int]]]:
    if not row.phashes:
        return []
    if policy == "image":
        return [("image", [h]) for h in row.phashes]
    return [((row.text_hash, len(row.phashes)), row.phashes)]


def _earliest_kept(row: RowFacts, kept: dict, policy: str) -> int | None:
    found = []
    for shape, hashes in _shapes(row, policy):
        if shape not in kept:
            continue
        table = kept[shape]
        mine = np.asarray(hashes, dtype=np.uint64)[None, :]
        distance = np.bitwise_count(table.hashes[: table.count] ^ mine)
        near = (distance <= RADIUS).all(axis=1)
        if near.any():
            found.append(int(table.orders[: table.count][near].min()))
    return min(found) if found else None


@pytest.fixture(scope="module")
def rows():
    return planted_facts(SHARDS * PER_SHARD, RADIUS, seed=0, shard_rows=PER_SHARD)


@pytest.fixture(scope="module")
def references(rows):
    return {policy: brute_force(rows, policy) for policy in ("example", "image")}


def test_the_planted_set_has_what_it_claims(rows, references):
    assert sum(len(s) for s in rows) == 10_000
    for policy, reference in references.items():
        reasons = [reason for reason, _ in reference.values()]
        assert reasons.count("duplicate_near") > 1_000, policy
        assert reasons.count("duplicate_exact") > 50, policy
    # Shared images with other texts are kept under ``example``, removed under ``image``.
    assert len(references["image"]) > len(references["example"]) + 1_000


@pytest.mark.parametrize(("policy", "partitions"), [("example", 1), ("example", 7), ("image", 64)])
def test_the_distributed_rule_equals_the_sequential_one_and_brute_force(
    rows, references, policy, partitions
):
    found, _, _ = distributed(rows, partitions, policy)
    reference = as_orders(decide(rows, RADIUS, policy))
    text = {"duplicate_near": "near", "duplicate_exact": "same content as"}
    assert {o: (r, f"{text[r]} {where(e)}") for o, (r, e) in found.items()} == reference
    assert found == references[policy]


def test_cut_edge_lists_are_completed_when_every_listed_edge_was_rejected(rows, references):
    """With one edge per row, some rows' only listed match was itself a duplicate: the
    second round fetches their whole lists, and the decisions still equal brute force."""
    found, _, asked = distributed(rows, 7, "image", limit=1)
    assert asked and all(asked)
    assert found == references["image"]


def test_the_policy_off_rejects_only_bad_rows():
    shard = [RowFacts(0, None, "", "same", [1]), RowFacts(1, "image_blurry", "x", "same", [1])]
    shard.append(RowFacts(2, None, "", "same", [1]))
    assert decide([shard], RADIUS, "off") == [{1: ("image_blurry", "x")}]
    keys = [k for r in shard for k in row_keys(r.position, r, "off", RADIUS)]
    assert keys == []


def test_a_cluster_of_near_identical_images_sends_bounded_edges_to_the_driver():
    """2,000 rows of one picture with tiny changes (every pair within the radius): m^2/2 =
    2M pairs, but at most 8 edges per row and partition reach the driver, and all but the
    first row are near duplicates of the first."""
    rng = np.random.default_rng(0)
    centre = int(rng.integers(0, 2**63))
    shard = []
    for i in range(2_000):
        flips = rng.choice(64, size=2, replace=False)
        phash = centre ^ int(sum(1 << int(b) for b in flips))
        shard.append(RowFacts(i, None, "", f"c{i}", [phash], "same text"))
    found, edges, asked = distributed([shard], 4, "example")
    assert edges <= 8 * 4 * 2_000 < 2_000 * 1_999 // 2 // 10
    assert not asked
    assert found == {order_of(0, i): ("duplicate_near", 0) for i in range(1, 2_000)}
