"""Hard-negative mining: the rules on hand-made vectors, planted false negatives through the
whole step, mined references across shards, and the tiny model on the sample corpus."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from rzenembed.config import MiningConfig, PipelineConfig
from rzenembed.data.folders import read_text
from rzenembed.data.schema import (
    RECORD_SCHEMA,
    media,
    mined_reference,
    record,
    records_table,
    side,
)
from rzenembed.data.storage import join
from rzenembed.data.version import VersionWriter
from rzenembed.mining.mine import mine_version
from rzenembed.mining.report import one_line
from rzenembed.mining.rules import RULES, select_negatives
from rzenembed.mining.search import top_k
from rzenembed.prep.mixture import profile_negatives
from rzenembed.training.rows import DatasetRows, UnresolvedReference

# --------------------------------------------------------------------------- the rules


def _unit(*values):
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_each_rule_removes_what_it_names_and_the_window_draws_the_rest():
    """Query 0 (positive: pool 0) against a pool built so that each candidate falls to one
    rule; scores and the expected fate of every candidate are computed by hand."""
    positive = _unit(1, 0, 0, 0)
    pool = np.stack(
        [
            positive,  # 0: the query's own positive
            positive,  # 1: another row with the same item (same content key)
            _unit(0.9, 0.436, 0, 0),  # 2: a row of the query's group
            _unit(0.999, 0.045, 0, 0),  # 3: a near duplicate (cosine 0.999 to the positive)
            _unit(0.97, 0, 0.243, 0),  # 4: scores 0.97 x ... above 0.95 x the positive's
            _unit(0.8, 0, 0, 0.6),  # 5: survivor 1 (skipped: skip_first 1)
            _unit(0.7, 0, 0.714, 0),  # 6: survivor 2
            _unit(0.6, 0.8, 0, 0),  # 7: survivor 3
            _unit(0.5, 0, 0, 0.866),  # 8: survivor 4 (outside the window [0, 2))
        ]
    )
    query = _unit(1, 0.0, 0.0, 0.0)[None, :]
    scores, candidates, kind = top_k(query, pool, k=9, exact_limit=100)
    assert kind == "exact" and candidates[0, 0] in (0, 1)
    cfg = MiningConfig(negatives=2, skip_first=1, window=(0, 2), percpos=0.95)
    items = ["x", "x", "c", "d", "e", "f", "g", "h", "i"]
    groups = [None, None, "g", None, None, None, None, None, None]
    chosen = select_negatives(
        query, pool, candidates, scores, [0], ["q0"], items, groups, ["g"], cfg
    )
    assert chosen.chosen == [[6, 7]]
    assert dict(chosen.removed) == {
        "own_positive": 1,
        "same_item": 1,
        "same_group": 1,
        "near_duplicate": 1,
        "above_percpos": 1,
        "skipped_rank": 1,
        "outside_window": 1,
        "not_drawn": 0,
    }
    assert chosen.scores[0] == pytest.approx([0.7 / np.linalg.norm([0.7, 0.714]), 0.6])
    # Without the percpos rule candidate 4 survives and is the best: skipped instead.
    loose = MiningConfig(negatives=2, skip_first=1, window=(0, 2), percpos=None)
    kept = select_negatives(
        query, pool, candidates, scores, [0], ["q0"], items, groups, ["g"], loose
    )
    assert kept.chosen == [[5, 6]] and kept.removed["above_percpos"] == 0


def test_the_draw_is_seeded_per_query():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(40, 8)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool + 0.05 * rng.normal(size=pool.shape).astype(np.float32)
    scores, candidates, _ = top_k(queries, pool, k=20, exact_limit=100)
    cfg = MiningConfig(negatives=3, window=(0, 15), percpos=None, near_duplicate=1.0)
    args = (queries, pool, candidates, scores, range(40), [f"r{i}" for i in range(40)])
    keys = ([str(i) for i in range(40)], [None] * 40, [None] * 40)
    first = select_negatives(*args, *keys, cfg, seed=0)
    again = select_negatives(*args, *keys, cfg, seed=0)
    other = select_negatives(*args, *keys, cfg, seed=1)
    assert first.chosen == again.chosen and first.chosen != other.chosen
    assert all(len(c) == 3 and i not in c for i, c in enumerate(first.chosen))
    assert sum(first.removed.values()) == 40 * 20 - 40 * 3
    with pytest.raises(ValueError, match=r"fewer ranks than mining\.negatives"):
        MiningConfig(negatives=5, window=(0, 3))


# --------------------------------------------------------------------------- planted negatives

PALETTE = {
    "red": (220, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (235, 225, 40),
    "green": (40, 170, 60),
    "teal": (30, 160, 150),
    "blue": (40, 70, 220),
    "purple": (130, 50, 190),
    "pink": (240, 120, 180),
    "brown": (120, 80, 40),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}
NAMES = list(PALETTE)


class PaletteEncoder:
    """A stand-in model: a picture is its closeness to each palette colour (so a
    re-encoded copy lands on the original and near colours are near), a text the one-hot
    of the colour it names."""

    def encode(self, items, batch_size=16):
        rows = []
        for item in items:
            if item.images:
                mean = np.asarray(item.images[0].convert("RGB"), dtype=np.float64).mean((0, 1))
                d2 = np.array([np.sum((mean - np.array(c)) ** 2) for c in PALETTE.values()])
                vector = np.exp(-d2 / 2000.0)
            else:
                vector = np.array([1.0 if n in item.text.split() else 0.0 for n in NAMES])
                vector += 0.01
            rows.append(torch.tensor(vector / np.linalg.norm(vector), dtype=torch.float32))
        return torch.stack(rows)


def _png(path, colour, quality=None):
    image = Image.new("RGB", (32, 32), PALETTE[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality is None:
        image.save(path)
    else:  # the same picture re-encoded: another file, bytes and URI
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        path.write_bytes(buffer.getvalue())


def planted_version(root):
    """Twelve rows, one colour each, and planted false negatives among their positives:
    rows 10 and 11 show a re-encoded copy of rows 0's and 1's pictures; rows 2 and 3 list
    the same picture; rows 4, 5 and 6 are one group (siblings)."""
    media_root = root / "media"
    rows = []
    for colour in NAMES[:10]:
        _png(media_root / f"{colour}.png", colour)
    _png(media_root / "copy-red.jpg", "red", quality=70)
    _png(media_root / "copy-orange.jpg", "orange", quality=60)
    pictures = [f"{c}.png" for c in NAMES[:10]] + ["copy-red.jpg", "copy-orange.jpg"]
    colours = [*NAMES[:10], "red", "orange"]
    pictures[3], colours[3] = pictures[2], colours[2]  # rows 2 and 3: one item, listed twice
    for i, (picture, colour) in enumerate(zip(pictures, colours, strict=True)):
        rows.append(
            record(
                f"row-{i:02d}",
                "planted",
                "image_retrieval",
                side(f"find the {colour} picture"),
                side(media_items=[media("image", picture)]),
                group_id="siblings" if i in (4, 5, 6) else None,
            )
        )
    writer = VersionWriter(str(root / "input"), RECORD_SCHEMA)
    writer.write_shard("part-00000", records_table(rows[:7]))
    writer.write_shard("part-00001", records_table(rows[7:]))
    stats = {"media_root": str(media_root), "group_semantics": "same-item"}
    return writer.commit(
        dataset="planted", step="cap", config_digest="c", code_version="1", inputs=[], stats=stats
    )


PLANTED = {  # row -> rows that must never be its negatives, and the rule that removes them
    0: {10: "near_duplicate"},
    10: {0: "near_duplicate"},
    1: {11: "near_duplicate"},
    11: {1: "near_duplicate"},
    2: {3: "same_item"},
    3: {2: "same_item"},
    4: {5: "same_group", 6: "same_group"},
    5: {4: "same_group", 6: "same_group"},
    6: {4: "same_group", 5: "same_group"},
}


def mining_config(root, **mining):
    return PipelineConfig.model_validate(
        {
            "model": {"name_or_path": "palette"},
            "storage": {"root": str(root / "store")},
            "mining": {"top_k": 50, "negatives": 3, "window": [0, 6], **mining},
        }
    )


def test_planted_false_negatives_are_never_chosen_and_each_is_counted_under_its_rule(tmp_path):
    version = planted_version(tmp_path)
    cfg = mining_config(tmp_path)
    model = {"uri": "palette", "digest": "p" * 64}
    mined = mine_version(cfg, version, PaletteEncoder, model, show_progress=False)
    report = mined.report
    assert not mined.reused and report["queries"] == 12
    rows = DatasetRows(mined.version, "image_retrieval", max_negatives=8, negatives="mined")
    ids = [f"row-{i:02d}" for i in range(12)]
    positives = {r["id"]: r["positive"] for r in DatasetRows(version, "x", 8).fetch(range(12))}
    for i, row in enumerate(rows.fetch(range(12))):
        assert row["id"] == ids[i]
        chosen = [p for p in row["negatives"]]
        assert len(chosen) == 3, row["id"]
        for banned in PLANTED.get(i, {}):
            assert positives[ids[banned]] not in chosen, (ids[i], ids[banned])
        assert positives[ids[i]] not in chosen
    # Every query saw the whole pool (top_k >= 12), so each planted pair is counted once.
    expected = {rule: 0 for rule in ("near_duplicate", "same_item", "same_group")}
    for banned in PLANTED.values():
        for rule in banned.values():
            expected[rule] += 1
    for rule, count in expected.items():
        assert report["removed"][rule] == count, (rule, report["removed"])
    assert report["removed"]["own_positive"] == 12
    assert set(report["removed"]) == set(RULES)
    # The report beside the rows, and the manifest's figures.
    folder = join(mined.version.uri, "report")
    on_disk = json.loads(read_text(join(folder, "mining.json")))
    assert on_disk["removed"] == report["removed"]
    assert "| near_duplicate | 4 |" in read_text(join(folder, "mining.md"))
    assert mined.version.manifest.stats["mined_by"] == model
    assert "near_duplicate 4" in one_line(report)
    # Mined again with the same model and rules: found, nothing embedded.
    again = mine_version(cfg, version, lambda: pytest.fail("embedded again"), model)
    assert again.reused and again.version.uri == mined.version.uri


# --------------------------------------------------------------------------- references


class RecordingPool(ThreadPoolExecutor):
    """A thread pool that records what each ``map`` call was given."""

    def __init__(self, workers):
        super().__init__(workers)
        self.calls = []

    def map(self, fn, *iterables, **kw):
        items = list(iterables[0])
        self.calls.append(items)
        return super().map(fn, items, **kw)


def commit(writer, dataset):
    return writer.commit(
        dataset=dataset,
        step="mine",
        config_digest="c",
        code_version="1",
        inputs=[],
        stats={"media_root": ""},
    )


def test_a_mined_reference_resolves_in_another_shard_and_a_missing_row_names_both(tmp_path):
    def row(i, negatives=()):
        return record(f"r{i}", "refs", "text", side(f"q{i}"), side(f"p{i}"), list(negatives))

    writer = VersionWriter(str(tmp_path / "v"), RECORD_SCHEMA)
    given = side("a shipped negative")
    writer.write_shard(
        "part-00000", records_table([row(0, [given, mined_reference("r3")]), row(1)])
    )
    writer.write_shard(
        "part-00001", records_table([row(2), row(3), row(4, [mined_reference("r9")])])
    )
    version = commit(writer, "refs")
    both = DatasetRows(version, "text", 2).fetch([0])[0]["negatives"]
    assert sorted(n["text"] for n in both) == ["a shipped negative", "p3"]  # r3: shard 1
    profile = profile_negatives(version, in_process=True)
    assert (profile.given, profile.mined, profile.both, profile.unresolved) == (1, 1, 2, 0)
    assert [
        n["text"] for n in DatasetRows(version, "text", 2, negatives="given")[0]["negatives"]
    ] == ["a shipped negative"]
    assert [
        n["text"] for n in DatasetRows(version, "text", 2, negatives="mined")[0]["negatives"]
    ] == ["p3"]
    # The target's row group (shard 1, group 0) is read through the caller's pool, with the
    # batch's other reads, not afterwards one by one.
    pool = RecordingPool(2)
    fresh = DatasetRows(version, "text", 2, negatives="mined")
    assert [n["text"] for n in fresh.fetch([0], pool)[0]["negatives"]] == ["p3"]
    assert [(1, 0)] in pool.calls, pool.calls
    pool.shutdown()
    with pytest.raises(UnresolvedReference, match=r"row 'r4' has a mined negative naming row 'r9'"):
        DatasetRows(version, "text", 2)[4]
    with pytest.raises(ValueError, match="negatives must be one of"):
        DatasetRows(version, "text", 2, negatives="some")


# --------------------------------------------------------------------------- the tiny model


def test_on_the_sample_corpus_mined_negatives_score_above_random_in_batch_ones(
    adaptive_stage1, tmp_path
):
    """Mined with the merged stage-1 model (the session's adaptive stage 1), as the
    pipeline mines between the stages; the report gives both distributions."""
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.training.stages import merge_stage1

    cfg, data, result = adaptive_stage1
    merged = merge_stage1(cfg, result.adapter_uri)
    cfg = cfg.model_copy(
        update={
            "storage": cfg.storage.model_copy(update={"root": str(tmp_path / "store")}),
            "mining": MiningConfig(negatives=2, window=(0, 4), top_k=20, percpos=None),
        }
    )
    version = data.final["sample-image-qa"]
    model = {"uri": merged, "digest": "s" * 64}
    mined = mine_version(
        cfg,
        version,
        lambda: RzenEmbedder.from_pretrained(merged, config=cfg.model),
        model,
        show_progress=False,
    )
    scores = mined.report["scores"]
    print(one_line(mined.report))
    assert scores["mined"]["count"] >= version.rows  # about two per query
    assert scores["mined"]["mean"] > scores["random"]["mean"]
    rows = DatasetRows(mined.version, "x", 8, negatives="mined").fetch(range(version.rows))
    assert all(len(r["negatives"]) == 2 for r in rows)


class CountingEncoder(PaletteEncoder):
    """The palette encoder that counts what it embeds and can fail on one colour."""

    def __init__(self, fail_on: str | None = None):
        self.seen = 0
        self.fail_on = fail_on

    def encode(self, items, batch_size=16):
        if self.fail_on and any(self.fail_on in (item.text or "") for item in items):
            raise RuntimeError("the node went away")
        self.seen += len(items)
        return super().encode(items, batch_size)


def test_an_interrupted_embedding_pass_resumes_at_the_next_shard(tmp_path):
    version = planted_version(tmp_path)  # shards of 7 and 5 rows
    cfg = mining_config(tmp_path)
    model = {"uri": "palette", "digest": "r" * 64}
    failing = CountingEncoder(fail_on="gray")  # row 9: in the second shard
    with pytest.raises(RuntimeError, match="went away"):
        mine_version(cfg, version, lambda: failing, model, show_progress=False)
    assert failing.seen == 2 * 7  # the first shard's queries and positives, stored
    resumed = CountingEncoder()
    mined = mine_version(cfg, version, lambda: resumed, model, show_progress=False)
    assert resumed.seen == 2 * 5 and mined.report["queries"] == 12


def test_the_mine_command_mines_a_version_with_a_model_folder(tmp_path, tiny_model_dir, capsys):
    import yaml

    from rzenembed.cli import main

    version = planted_version(tmp_path)
    config = tmp_path / "mine.yaml"
    settings = {"model": {"name_or_path": "unused"}, "storage": {"root": str(tmp_path / "s")}}
    config.write_text(yaml.safe_dump(settings))
    command = ["mine", version.uri, "--model", str(tiny_model_dir), "--config", str(config)]
    assert main([*command, "--set", "mining.negatives=2"]) == 0
    out = capsys.readouterr().out
    assert "mine/planted: 12 queries" in out and "mined version: " in out
    assert main([*command, "--set", "mining.negatives=2"]) == 0
    assert "(found already mined)" in capsys.readouterr().out


def test_both_interleaves_given_and_mined_so_a_small_k_holds_both_kinds(tmp_path):
    rows = [
        record(
            f"r{i}",
            "mix",
            "text",
            side(f"q{i}"),
            side(f"p{i}"),
            [side(f"given {i}.{j}") for j in range(2)]
            + [mined_reference(f"r{(i + j) % 40}") for j in (1, 2)],
        )
        for i in range(40)
    ]
    writer = VersionWriter(str(tmp_path / "v"), RECORD_SCHEMA)
    writer.write_shard("part-00000", records_table(rows))
    version = commit(writer, "mix")
    fetched = DatasetRows(version, "text", 4).fetch(range(40))
    kinds = [["given" in n["text"] for n in r["negatives"]] for r in fetched]
    assert all(k in ([True, False, True, False], [False, True, False, True]) for k in kinds)
    firsts = [k[0] for k in kinds]  # K = 1 takes the first: both kinds across the rows
    assert 10 < sum(firsts) < 30


def test_the_relevance_judge_drops_what_it_accepts_and_counts_it(tmp_path, tiny_model_dir):
    """The judge's plumbing with the tiny model (random weights: its verdicts mean nothing,
    so the thresholds decide): at 0 it accepts every drawn negative, above 1 none."""
    from rzenembed.mining.judge import RelevanceJudge
    from rzenembed.mining.mine import local_judge

    version = planted_version(tmp_path)
    model = {"uri": "palette", "digest": "j" * 64}
    judged = {}
    for threshold in (0.0, 1.0):
        judge = {"enabled": True, "model": str(tiny_model_dir), "threshold": threshold}
        cfg = mining_config(tmp_path / f"t{threshold}", judge=judge)
        mined = mine_version(cfg, version, PaletteEncoder, model, False, local_judge(cfg))
        judged[threshold] = mined.report
    assert judged[0.0]["negatives"] == 0 and judged[0.0]["removed"]["judged_relevant"] == 36
    assert judged[1.0]["negatives"] == 36 and judged[1.0]["removed"]["judged_relevant"] == 0
    with pytest.raises(ValueError, match="no judge given"):
        cfg = mining_config(tmp_path / "none", judge={"enabled": True})
        mine_version(cfg, version, PaletteEncoder, model, False)
    cfg = mining_config(tmp_path, judge={"model": str(tiny_model_dir)})
    judge = RelevanceJudge(str(tiny_model_dir), cfg.mining.judge)
    from rzenembed.modeling.embedder import EmbedInput

    red = Image.new("RGB", (32, 32), PALETTE["red"])
    pairs = [
        (EmbedInput(text="find the red picture"), EmbedInput(images=[red])),
        (EmbedInput(text="a question"), EmbedInput(text="an answer")),
    ]
    first, again = judge.relevance(pairs), judge.relevance(pairs)
    assert first == again and all(0.0 <= p <= 1.0 for p in first)
