"""Deduplication as a distributed group-by equals the sequential rule and brute force, on
20k planted rows with known near-duplicate clusters, exact duplicates and multi-image rows."""

from __future__ import annotations

import numpy as np
import pytest

from rzenembed.prep.clean import RowFacts, decide
from rzenembed.prep.dedup import (
    find_groups,
    order_of,
    partition_keys,
    planted_facts,
    resolve,
    row_keys,
    where,
)

RADIUS = 4
SHARDS, PER_SHARD = 20, 1000


def distributed(shards: list[list[RowFacts]], partitions: int) -> dict[int, tuple[str, str]]:
    """The three moves of the distributed rule, run in this process."""
    keys = []
    for s, rows in enumerate(shards):
        for r in rows:
            keys += row_keys(order_of(s, r.position), r.content_hash, r.phashes, RADIUS)
    groups = [find_groups(t, RADIUS) for t in partition_keys(keys, partitions)]
    return resolve(groups)


def as_orders(decisions: list[dict[int, tuple[str, str]]]) -> dict[int, tuple[str, str]]:
    return {order_of(s, pos): d for s, shard in enumerate(decisions) for pos, d in shard.items()}


def brute_force(shards: list[list[RowFacts]]) -> dict[int, str]:
    """Every row against every earlier kept row, all pairs, vectorised."""
    kept_hashes = np.empty(0, dtype=np.uint64)
    kept_content: set[str] = set()
    out = {}
    for s, rows in enumerate(shards):
        for r in rows:
            order = order_of(s, r.position)
            if r.content_hash in kept_content:
                out[order] = "duplicate_exact"
                continue
            mine = np.asarray(r.phashes, dtype=np.uint64)
            distance = np.bitwise_count(mine[:, None] ^ kept_hashes[None, :])
            if distance.size and (distance <= RADIUS).any():
                out[order] = "duplicate_near"
                continue
            kept_content.add(r.content_hash)
            kept_hashes = np.concatenate([kept_hashes, mine])
    return out


@pytest.fixture(scope="module")
def rows():
    return planted_facts(SHARDS * PER_SHARD, RADIUS, seed=0, shard_rows=PER_SHARD)


def test_the_planted_set_has_what_it_claims(rows):
    assert sum(len(s) for s in rows) == 20_000
    reasons = list(brute_force(rows).values())
    assert reasons.count("duplicate_near") > 5_000 and reasons.count("duplicate_exact") > 100


@pytest.mark.parametrize("partitions", [1, 7, 64])
def test_the_distributed_rule_equals_the_sequential_one_and_brute_force(rows, partitions):
    found = distributed(rows, partitions)
    reference = as_orders(decide(rows, RADIUS))
    assert {
        o: (r, f"near {where(e)}" if r == "duplicate_near" else f"same content as {where(e)}")
        for o, (r, e) in found.items()
    } == reference
    assert {o: r for o, (r, _) in found.items()} == brute_force(rows)


def test_a_cluster_chain_keeps_what_the_scan_keeps():
    """a ~ b ~ c with a and c too far apart: a kept, b rejected, c kept (b is not kept)."""
    a = 0
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ (0b1111 << 8)  # 4 bits from b, 8 from a
    shard = [RowFacts(i, None, "", f"c{i}", [h]) for i, h in enumerate([a, b, c])]
    assert distributed([shard], 3) == {order_of(0, 1): ("duplicate_near", order_of(0, 0))}
