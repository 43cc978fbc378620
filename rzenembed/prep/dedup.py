"""Deduplication of training examples: the rule, and the distributed group-by that applies
it without the rows ever meeting in one process.

The rule (``decide`` below is the single-process reference)
    Walk the rows in dataset order (shard, then row). A row is compared with the earlier
    rows that were *kept*; negatives never take part (a row whose negative is another row's
    positive is a different example). Under the source's ``dedup`` policy:

    - ``example`` (the default): an *exact* duplicate has the same content as an earlier
      kept row (query and positive texts after ``normalise_text``, and their media bytes);
      a *near* duplicate has the same normalised texts (and the same non-image media), the
      same number of images on each side, and every query and positive image within
      ``radius`` bits (64-bit pHash) of the matching image of an earlier kept row. Two
      questions about one picture, five captions of one photo or several queries of one
      page are different examples and are all kept.
    - ``image`` (web caption crawls): exact as above; near when *any* query or positive
      image is within ``radius`` bits of any query or positive image of an earlier kept
      row, whatever the texts (one picture with two alt texts is one example too many).
    - ``off``: nothing is a duplicate.

    The detail names the earliest earlier kept row that makes the row a duplicate.

Distributed, in three moves (``rzenembed.prep.clean`` runs them on Ray)
    1. **Keys** (per shard, where the facts are computed): each good row emits its content
       hash, and band keys: the pHash cut into ``radius + 1`` bands (two hashes within the
       radius agree exactly on at least one band). Under ``example`` only the first image's
       bands are emitted, prefixed with the row's text hash (a near duplicate must match
       on every image, so on the first, and on the texts); under ``image`` every image's
       bands, bare. Keys are hash-partitioned into ``P`` partition files.
    2. **Groups** (per partition): rows sharing a content key form an exact group; rows
       sharing a band key are compared with an exact Hamming check (numpy popcount over
       all of a row's images under ``example``), and each pair within the radius is an edge
       ``later -> earlier``. Each later row keeps only its ``limit`` earliest edges (and a
       flag when there were more), so a cluster of m near-identical images sends at most
       ``limit * m`` edges to the driver, as two compact int64 arrays, not m^2/2 tuples.
    3. **Resolve** (driver, small): only rows in an exact group or with an edge can be
       rejected; they are walked in order. A row's earliest earlier member or edge that was
       not rejected decides. A row whose listed edges were all rejected but which had more
       is undecided: its complete edge list is fetched from the partitions (a second round,
       for those rows only) and the walk repeats. The result equals ``decide``.
"""

from __future__ import annotations

import hashlib
import itertools
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Policy = Literal["example", "image", "off"]
POLICIES: tuple[str, ...] = ("example", "image", "off")
ROW_BITS = 32  # order = shard index << 32 | row position
EDGE_LIMIT = 8  # earliest edges a later row sends to the driver per partition
EXACT, TEXT_BAND, IMAGE_BAND = 0, 1, 2  # key kinds
KEY_SCHEMA = pa.schema(
    [
        ("kind", pa.int8()),
        ("key", pa.string()),  # content hash, "<text hash>|<band>:<value>" or "<band>:<value>"
        ("order", pa.int64()),
        ("phashes", pa.list_(pa.uint64())),  # what the Hamming check compares
    ]
)


@dataclass
class RowFacts:
    """What deduplication needs to know about one row (computed where the row is read).

    ``phashes``: the query's image hashes, then the positive's. ``text_hash``: the
    normalised texts, the bytes of any non-image media of the query and positive, and the
    number of images on each side (rows that can be near duplicates under ``example``
    share it)."""

    position: int
    reason: str | None
    detail: str
    content_hash: str
    phashes: list[int]
    text_hash: str = ""


def normalise_text(text: str) -> str:
    """The form texts are compared in: Unicode NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


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
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def row_keys(order: int, facts: RowFacts, policy: Policy, radius: int) -> list[tuple]:
    """The keys one good row emits under ``policy`` (rows of ``KEY_SCHEMA``)."""
    if policy == "off":
        return []
    keys: list[tuple] = [(EXACT, facts.content_hash, order, [])]
    if not facts.phashes:
        return keys
    if policy == "example":
        for band, value in bands(facts.phashes[0], radius + 1):
            keys.append((TEXT_BAND, f"{facts.text_hash}|{band}:{value}", order, facts.phashes))
        return keys
    for phash in facts.phashes:
        for band, value in bands(phash, radius + 1):
            keys.append((IMAGE_BAND, f"{band}:{value}", order, [phash]))
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


# --------------------------------------------------------------------------- groups


def _no_edges() -> np.ndarray:
    return np.empty((0, 2), dtype=np.int64)


@dataclass
class Groups:
    """What one partition found: exact groups (orders, ascending), near edges as an
    ``(n, 2)`` int64 array of ``(later, earlier)`` pairs, and the later rows that had more
    edges than were sent."""

    exact: list[np.ndarray] = field(default_factory=list)
    near: np.ndarray = field(default_factory=_no_edges)
    truncated: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def find_groups(
    table: pa.Table, radius: int, limit: int | None = EDGE_LIMIT, only: Iterable[int] | None = None
) -> Groups:
    """Exact groups and near edges among the keys of one partition. Arrow finds the keys
    held by two or more rows first; only those rows reach Python. ``only``: compute the
    complete edge lists (no ``limit``) of these later rows, and nothing else."""
    if table.num_rows == 0:
        return Groups()
    # Keys of different kinds never collide (a content hash has no ":", band keys do).
    counts = table.group_by("key").aggregate([("order", "count")])
    shared = counts.filter(pc.greater(counts["order_count"], 1)).column("key")
    if len(shared) == 0:
        return Groups()
    table = table.filter(pc.is_in(table["key"], value_set=shared))
    table = table.sort_by([("key", "ascending"), ("order", "ascending")])
    kind = table.column("kind").to_numpy()
    order = table.column("order").to_numpy()
    keys = table.column("key").to_pylist()
    phashes = table.column("phashes").to_pylist()
    wanted = None if only is None else np.asarray(sorted(set(only)), dtype=np.int64)
    out, edges = Groups(), []
    starts = [0] + [
        i for i in range(1, len(keys)) if keys[i] != keys[i - 1] or kind[i] != kind[i - 1]
    ]
    for start, end in itertools.pairwise([*starts, len(keys)]):
        members = order[start:end]
        if kind[start] == EXACT:
            if wanted is None:
                out.exact.append(np.unique(members))
            continue
        hashes = np.asarray(phashes[start:end], dtype=np.uint64)
        edges.append(
            _near_pairs(members, hashes, radius, limit if wanted is None else None, wanted)
        )
    pairs = np.concatenate(edges) if edges else _no_edges()
    out.near, out.truncated = earliest_edges(pairs, None if wanted is not None else limit)
    return out


def _near_pairs(
    members: np.ndarray,
    hashes: np.ndarray,
    radius: int,
    limit: int | None,
    wanted: np.ndarray | None,
) -> np.ndarray:
    """``(later, earlier)`` pairs of one band bucket whose every image is within ``radius``
    bits, each later row's ``limit + 1`` earliest at most (one more than is sent, so the
    caller can tell that there were more). ``members`` are ascending orders; a row may
    appear twice (two of its images in one bucket)."""
    found = []
    distinct, firsts = np.unique(members, return_index=True)  # a row's columns side by side
    rows = np.arange(len(members))
    if wanted is not None:
        rows = rows[np.isin(members, wanted)]
    for start in range(0, len(rows), 1024):  # bound the distance matrix's memory
        block = rows[start : start + 1024]
        distance = np.zeros((len(block), len(members)), dtype=np.uint8)
        for image in range(hashes.shape[1]):
            bits = np.bitwise_count(hashes[block, None, image] ^ hashes[None, :, image])
            np.maximum(distance, bits, out=distance)
        match = np.logical_or.reduceat(distance <= radius, firsts, axis=1)  # per distinct row
        match &= distinct[None, :] < members[block, None]
        if limit is not None:  # the columns are in order: the first matches are the earliest
            match &= np.cumsum(match, axis=1) <= limit + 1
        later, earlier = np.nonzero(match)
        found.append(np.stack([members[block][later], distinct[earlier]], axis=1))
    return np.concatenate(found) if found else _no_edges()


def earliest_edges(pairs: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Unique ``(later, earlier)`` pairs, each later row's ``limit`` earliest kept, and the
    later rows that had more."""
    if len(pairs) == 0:
        return _no_edges(), np.empty(0, dtype=np.int64)
    pairs = np.unique(pairs, axis=0)  # sorted by later, then earlier
    if limit is None:
        return pairs, np.empty(0, dtype=np.int64)
    later = pairs[:, 0]
    firsts = np.flatnonzero(np.r_[True, later[1:] != later[:-1]])
    sizes = np.diff(np.r_[firsts, len(later)])
    rank = np.arange(len(later)) - np.repeat(firsts, sizes)
    return pairs[rank < limit], later[firsts][sizes > limit]


# --------------------------------------------------------------------------- resolve

KEPT, REJECTED, UNDECIDED = 0, 1, 2


@dataclass
class _Candidates:
    """Every row that may be a duplicate, with its exact group and its known edges."""

    group_of: dict[int, int] = field(default_factory=dict)
    near: dict[int, np.ndarray] = field(default_factory=dict)  # later -> earlier, ascending
    complete: set[int] = field(default_factory=set)  # rows whose edge list is whole

    @classmethod
    def gather(cls, groups: list[Groups], limit: int) -> _Candidates:
        out = cls()
        exact = (members for part in groups for members in part.exact)
        for gid, members in enumerate(exact):  # a content key lives in one partition
            out.group_of.update(dict.fromkeys(members.tolist(), gid))
        pairs = [p.near for p in groups if len(p.near)]
        edges, truncated = earliest_edges(np.concatenate(pairs) if pairs else _no_edges(), limit)
        truncated = {*truncated.tolist(), *(r for p in groups for r in p.truncated.tolist())}
        out.add_edges(edges, complete=False)
        out.complete = set(out.near) - truncated
        return out

    def add_edges(self, edges: np.ndarray, complete: bool) -> None:
        if len(edges) == 0:
            return
        later = edges[:, 0]
        firsts = np.flatnonzero(np.r_[True, later[1:] != later[:-1]])
        for start, end in itertools.pairwise([*firsts.tolist(), len(later)]):
            row = int(later[start])
            self.near[row] = edges[start:end, 1]
            if complete:
                self.complete.add(row)


def resolve(
    groups: list[Groups],
    fetch_complete: Callable[[set[int]], list[Groups]] | None = None,
    limit: int = EDGE_LIMIT,
) -> dict[int, tuple[str, int]]:
    """{order: (reason, earlier order)} for every duplicate, by the sequential rule.

    ``fetch_complete(rows)`` returns the partitions' complete edges of ``rows``; it is
    called only when a row's listed edges were all rejected and it had more."""
    candidates = _Candidates.gather(groups, limit)
    while True:
        rejected, undecided = _walk(candidates)
        if not undecided:
            return rejected
        if fetch_complete is None:
            raise RuntimeError(f"{len(undecided)} rows need their complete edge lists")
        pairs = [part.near for part in fetch_complete(undecided)]
        edges = earliest_edges(np.concatenate(pairs) if pairs else _no_edges(), None)[0]
        candidates.add_edges(edges, complete=True)
        candidates.complete |= undecided


def _walk(candidates: _Candidates) -> tuple[dict[int, tuple[str, int]], set[int]]:
    """One pass in order. A row's exact group decides first (the earliest earlier member
    that was not rejected: kept -> duplicate, undecided -> undecided), then its edges the
    same way; a row whose listed edges all were rejected is undecided when the list was cut
    short, else kept. Rows decided by an undecided row are undecided too; only the ones cut
    short need their complete lists (returned)."""
    state: dict[int, tuple[int, int]] = {}
    head: dict[int, int] = {}  # exact group -> its first member that was not rejected
    need: set[int] = set()
    for row in sorted(set(candidates.group_of) | set(candidates.near)):
        gid = candidates.group_of.get(row)
        first = head.get(gid) if gid is not None else None
        if first is not None:
            status = state.get(first, (KEPT, -1))[0]
            state[row] = (REJECTED, first) if status == KEPT else (UNDECIDED, first)
            continue
        state[row] = _near_state(row, candidates, state, need)
        if gid is not None and state[row][0] != REJECTED:
            head[gid] = row
    rejected = {}
    for row, (status, earlier) in state.items():
        if status == REJECTED:
            exact = candidates.group_of.get(row) == candidates.group_of.get(earlier, -1)
            rejected[row] = ("duplicate_exact" if exact else "duplicate_near", earlier)
    undecided = {r for r, (status, _) in state.items() if status == UNDECIDED}
    return rejected, need if undecided else set()


def _near_state(
    row: int, candidates: _Candidates, state: dict[int, tuple[int, int]], need: set[int]
) -> tuple[int, int]:
    for earlier in candidates.near.get(row, np.empty(0, dtype=np.int64)).tolist():
        status = state.get(earlier, (KEPT, -1))[0]
        if status == KEPT:
            return REJECTED, earlier
        if status == UNDECIDED:
            return UNDECIDED, earlier
    if row in candidates.near and row not in candidates.complete:
        need.add(row)
        return UNDECIDED, -1
    return KEPT, -1


# --------------------------------------------------------------------------- the reference


def decide(
    facts: list[list[RowFacts]], radius: int, policy: Policy = "example"
) -> list[dict[int, tuple[str, str]]]:
    """Per shard, {row position: (reason, detail)} for every row to reject: bad rows with
    their own reason, duplicates by the rule (the sequential reference of the group-by)."""
    decisions: list[dict[int, tuple[str, str]]] = [{} for _ in facts]
    seen_content: dict[str, int] = {}
    index: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
    for shard, rows in enumerate(facts):
        for row in rows:
            order = order_of(shard, row.position)
            if row.reason is not None:
                decisions[shard][row.position] = (row.reason, row.detail)
                continue
            if policy == "off":
                continue
            if row.content_hash in seen_content:
                earlier = seen_content[row.content_hash]
                decisions[shard][row.position] = (
                    "duplicate_exact",
                    f"same content as {where(earlier)}",
                )
                continue
            keys = [(k[1], k[3]) for k in row_keys(order, row, policy, radius)[1:]]
            match = _earliest_match(keys, index, radius)
            if match is not None:
                decisions[shard][row.position] = ("duplicate_near", f"near {where(match)}")
                continue
            seen_content[row.content_hash] = order
            for key, hashes in keys:
                index[key].append((order, hashes))
    return decisions


def _earliest_match(keys: list[tuple[str, list[int]]], index: dict, radius: int) -> int | None:
    matches = [
        earlier
        for key, hashes in keys
        for earlier, others in index.get(key, ())
        if len(others) == len(hashes)
        and all((a ^ b).bit_count() <= radius for a, b in zip(hashes, others, strict=True))
    ]
    return min(matches) if matches else None


def planted_facts(
    rows: int, radius: int, seed: int = 0, shard_rows: int = 1000, texts_per_cluster: int = 2
) -> list[list[RowFacts]]:
    """Generated dedup inputs with known structure, for the equality test and the benchmark:
    clusters of 8 rows whose first pHash lies 0..radius+3 bits from a random centre (about
    half of them near duplicates) and whose texts are one of ``texts_per_cluster`` per
    cluster; one cluster in 10 with a second image per row; one row in 25 repeating an
    earlier row's content. Shuffled, then cut into shards of ``shard_rows`` ``RowFacts``."""
    import random

    rng = random.Random(seed)
    specs = []
    for cluster in range(rows // 8):
        centre, second = rng.getrandbits(64), rng.random() < 0.1
        for _ in range(8):
            flips = rng.sample(range(64), rng.randint(0, radius + 3))
            hashes = [centre ^ sum(1 << b for b in flips)]
            if second:
                hashes.append(centre ^ (1 << rng.randrange(64)))
            text = f"t{cluster}.{rng.randrange(texts_per_cluster)}/{len(hashes)}"
            specs.append((text, hashes))
    rng.shuffle(specs)
    facts: list[tuple[str, str, list[int]]] = []
    for n, (text, hashes) in enumerate(specs):
        if facts and rng.random() < 0.04:
            facts.append(rng.choice(facts))
        else:
            facts.append((f"c{n}", text, hashes))
    return [
        [RowFacts(i, None, "", c, h, t) for i, (c, t, h) in enumerate(facts[s : s + shard_rows])]
        for s in range(0, len(facts), shard_rows)
    ]
