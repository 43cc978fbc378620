"""Deduplication as a distributed group-by: the same decisions as the sequential rule,
without the rows ever meeting in one process.

The rule (``clean.decide``, the single-process reference): walk the rows in dataset order
(shard, then row); a row is an *exact* duplicate when an earlier kept row has the same
content hash, a *near* duplicate when one of its image pHashes is within ``radius`` bits of
an image pHash of an earlier kept row; otherwise it is kept. The detail names the earlier
row: the first kept row with that content, or the first match in the order the sequential
scan meets it (the row's pHashes in order, their bands in order, then earlier kept rows in
order).

Distributed, in three moves:

1. **Keys** (per shard, where the facts are computed): each good row emits its content hash
   as a key, and each of its pHashes emits ``radius + 1`` band keys (the pHash cut into
   ``radius + 1`` bands: two hashes within the radius agree exactly on at least one band).
   Keys are hash-partitioned into ``P`` partition files.
2. **Groups** (per partition): rows sharing a content key form an exact group; rows sharing
   a band key are compared pairwise with an exact Hamming check (numpy popcount), and each
   pair within the radius becomes an edge ``later -> earlier`` carrying where the scan would
   meet it. Only groups of two or more rows produce anything.
3. **Resolve** (driver, small): only rows in an exact group or on an edge can be rejected;
   they are walked in order, and a row is rejected when an earlier *kept* row is in its exact
   group, or else on one of its edges (the first the sequential scan would meet).

A cluster of m near-identical images costs m^2/2 Hamming checks in its partition, as it
would in the sequential scan.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_BITS = 32  # order = shard index << 32 | row position
KEY_SCHEMA = pa.schema(
    [
        ("kind", pa.int8()),  # 0: content, 1: band
        ("key", pa.string()),  # content hash, or "<band index>:<band value>"
        ("order", pa.int64()),
        ("image", pa.int16()),  # the pHash's index within its row (band keys)
        ("band", pa.int16()),
        ("phash", pa.uint64()),
    ]
)


def order_of(shard: int, position: int) -> int:
    return (shard << ROW_BITS) | position


def where(order: int) -> str:
    """How a detail names a row: ``shard S row R``."""
    return f"shard {order >> ROW_BITS} row {order & ((1 << ROW_BITS) - 1)}"


def bands(value: int, count: int) -> list[tuple[int, int]]:
    """(band index, band value) of a 64-bit hash cut into ``count`` nearly equal bands."""
    edges = [round(64 * i / count) for i in range(count + 1)]
    return [
        (i, (value >> lo) & ((1 << (hi - lo)) - 1))
        for i, (lo, hi) in enumerate(itertools.pairwise(edges))
    ]


def partition_of(key: str, partitions: int) -> int:
    """A stable partition of a key (not Python's per-process ``hash``)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % partitions


def row_keys(order: int, content_hash: str, phashes: list[int], radius: int) -> list[tuple]:
    """The keys one good row emits (rows of ``KEY_SCHEMA``)."""
    keys = [(0, content_hash, order, -1, -1, 0)]
    for image, phash in enumerate(phashes):
        for band, value in bands(phash, radius + 1):
            keys.append((1, f"{band}:{value}", order, image, band, phash))
    return keys


def partition_keys(rows: list[tuple], partitions: int) -> list[pa.Table]:
    """Split key rows into ``partitions`` tables by their key."""
    parts: list[list[tuple]] = [[] for _ in range(partitions)]
    for row in rows:
        parts[partition_of(row[1], partitions)].append(row)
    names = KEY_SCHEMA.names
    return [
        pa.table({n: [r[i] for r in part] for i, n in enumerate(names)}, schema=KEY_SCHEMA)
        for part in parts
    ]


@dataclass
class Groups:
    """What one partition found: exact groups (orders, ascending) and near edges, each edge
    ``(later, image, band, earlier, earlier_image)``."""

    exact: list[list[int]] = field(default_factory=list)
    near: list[tuple[int, int, int, int, int]] = field(default_factory=list)


def find_groups(table: pa.Table, radius: int) -> Groups:
    """Exact groups and near edges among the keys of one partition. Arrow finds the keys
    held by two or more rows first; only those rows reach Python."""
    out = Groups()
    if table.num_rows == 0:
        return out
    counts = table.group_by(["kind", "key"]).aggregate([("order", "count")])
    shared = counts.filter(pc.greater(counts["order_count"], 1)).select(["kind", "key"])
    if shared.num_rows == 0:
        return out
    table = table.join(shared, keys=["kind", "key"], join_type="inner")
    kind = table.column("kind").to_numpy()
    keys = table.column("key").to_pylist()
    order = table.column("order").to_numpy()
    image = table.column("image").to_numpy()
    band = table.column("band").to_numpy()
    phash = table.column("phash").to_numpy()
    by_key: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (k, key) in enumerate(zip(kind.tolist(), keys, strict=True)):
        by_key[(k, key)].append(i)
    for (k, _), members in sorted(by_key.items()):
        if k == 0:
            rows = sorted(set(order[members].tolist()))
            if len(rows) > 1:
                out.exact.append(rows)
        else:
            out.near.extend(_near_edges(np.asarray(members), order, image, band, phash, radius))
    return out


def _near_edges(members, order, image, band, phash, radius) -> list[tuple[int, ...]]:
    """Pairs of one band bucket within ``radius`` bits, as edges from later to earlier."""
    members = members[np.lexsort((image[members], order[members]))]
    hashes = phash[members]
    edges = []
    for start in range(0, len(members), 1024):  # bound the distance matrix's memory
        block = members[start : start + 1024]
        distance = np.bitwise_count(hashes[start : start + 1024, None] ^ hashes[None, :])
        for bi, mi in zip(*np.nonzero(distance <= radius), strict=True):
            later, earlier = block[bi], members[mi]
            if order[earlier] < order[later]:
                edges.append(
                    (
                        int(order[later]),
                        int(image[later]),
                        int(band[later]),
                        int(order[earlier]),
                        int(image[earlier]),
                    )
                )
    return edges


def resolve(groups: list[Groups]) -> dict[int, tuple[str, int]]:
    """{order: (reason, earlier order)} for every duplicate, by the sequential rule."""
    exact: dict[int, list[int]] = {}
    for part in groups:
        for rows in part.exact:
            for row in rows:
                exact[row] = rows
    near: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for part in groups:
        for later, img, band, earlier, earlier_img in part.near:
            near[later].append((img, band, earlier, earlier_img))
    rejected: dict[int, tuple[str, int]] = {}
    for row in sorted(set(exact) | set(near)):
        first_kept = next((r for r in exact.get(row, ()) if r < row and r not in rejected), None)
        if first_kept is not None:
            rejected[row] = ("duplicate_exact", first_kept)
            continue
        matches = sorted(m for m in near.get(row, ()) if m[2] not in rejected)
        if matches:
            rejected[row] = ("duplicate_near", matches[0][2])
    return rejected


def planted_facts(rows: int, radius: int, seed: int = 0, shard_rows: int = 1000) -> list[list]:
    """Generated dedup inputs with known structure, for the equality test and the benchmark:
    clusters of 8 pHashes 0..radius+3 bits from a random centre (about half of them near
    duplicates), one row in 25 repeating an earlier row's content, one in 10 with a second
    image; shuffled, then cut into shards of ``shard_rows`` ``RowFacts``."""
    import random

    from rzenembed.prep.clean import RowFacts

    rng = random.Random(seed)
    specs = []
    for _ in range(rows // 8):
        centre = rng.getrandbits(64)
        for _ in range(8):
            flips = rng.sample(range(64), rng.randint(0, radius + 3))
            specs.append([centre ^ sum(1 << b for b in flips)])
    rng.shuffle(specs)
    contents: list[str] = []
    facts = []
    for n, hashes in enumerate(specs):
        if rng.random() < 0.1:
            hashes = [*hashes, rng.getrandbits(64)]
        content = rng.choice(contents) if contents and rng.random() < 0.04 else f"c{n}"
        contents.append(content)
        facts.append((content, hashes))
    return [
        [RowFacts(i, None, "", c, h) for i, (c, h) in enumerate(facts[s : s + shard_rows])]
        for s in range(0, len(facts), shard_rows)
    ]
