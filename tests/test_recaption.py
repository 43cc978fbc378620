"""Recaption: policies, guards, determinism and resume, with the tiny model as captioner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from rzenembed.config import RecaptionConfig, config_from_dict
from rzenembed.data.storage import join
from rzenembed.prep.clean import run_clean
from rzenembed.prep.ingest import run_ingest
from rzenembed.prep.recaption import (
    STEP,
    SUFFIX,
    apply_policy,
    caption_slot,
    check_caption,
    repeat_ratio,
    run_recaption,
)

pytestmark = pytest.mark.slow
SOURCE = "sample-captions"


def captioner(tiny_model_dir: Path, out: Path, **generation) -> Path:
    """The tiny model with generation settings in its generation_config.json."""
    shutil.copytree(tiny_model_dir, out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, **generation}))
    return out


def readable(tiny_model_dir: Path, out: Path) -> Path:
    """A captioner that writes non-empty, non-repeating text: the random model's favourite
    tokens are blank, so those are suppressed, and no word 3-gram may repeat."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    return captioner(tiny_model_dir, out, suppress_tokens=blank, no_repeat_ngram_size=3)


def degenerate(tiny_model_dir: Path, out: Path) -> Path:
    """A captioner forced to repeat one word: a huge bias on the token " a"-like word."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    word = next(
        i for i in range(len(tokenizer))
        if tokenizer.decode([i]).startswith(" ") and tokenizer.decode([i]).strip().isalpha()
    )  # fmt: skip
    return captioner(tiny_model_dir, out, sequence_bias=[[[word], 100.0]])


def config(corpus, root: Path, model: Path, **recaption):
    sources = yaml.safe_load(corpus.sources_yaml.read_text())
    source = next(s for s in sources if s["name"] == SOURCE)
    return config_from_dict({
        "storage": {"root": str(root)},
        "sources": [{**source, "uri": str(corpus.root / source["uri"]), "recaption": True}],
        "prep": {"shard_rows": 10, "recaption": {"model": str(model), "max_new_tokens": 12,
                                                 "max_visual_tokens": 16, **recaption}},
        "model": {"name_or_path": "unused"},
    })  # fmt: skip


@pytest.fixture(scope="module")
def captioners(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"readable": readable(tiny_model_dir, root / "readable"),
            "degenerate": degenerate(tiny_model_dir, root / "degenerate")}  # fmt: skip


@pytest.fixture(scope="module")
def cleaned(ray_local, sample_corpus, captioners, tmp_path_factory):
    root = tmp_path_factory.mktemp("recaption-input")
    cfg = config(sample_corpus, root, captioners["readable"])
    version = run_clean(cfg, run_ingest(cfg, cfg.sources[0], show_progress=False), False)
    return version


def recaptioned(sample_corpus, cleaned, model, root, **settings):
    cfg = config(sample_corpus, root, model, **settings)
    return cfg, run_recaption(cfg, cleaned, show_progress=False)


@pytest.fixture(scope="module")
def by_policy(sample_corpus, cleaned, captioners, tmp_path_factory):
    """``by_policy(policy)``: the readable captioner's run with that policy, each run once
    for the module (the policy test checks each, the determinism test compares their
    captions, the resume test compares a resumed run with the ``replace`` one)."""
    runs = {}

    def get(policy: str):
        if policy not in runs:
            root = tmp_path_factory.mktemp(f"recaption-{policy}")
            runs[policy] = recaptioned(
                sample_corpus, cleaned, captioners["readable"], root, policy=policy
            )[1]
        return runs[policy]

    return get


def rows_by_id(version):
    return {r["id"]: r for t in version.iter_tables() for r in t.to_pylist()}


# --------------------------------------------------------------------------- unit


def test_repeat_ratio_and_guards():
    settings = RecaptionConfig(max_chars=40, max_repeat_ratio=0.5)
    assert repeat_ratio("a red circle on a blue square") == 0.0
    assert repeat_ratio("a a a a a a") == pytest.approx(1 - 1 / 4)
    assert check_caption("   ", settings)[0] == "caption_empty"
    assert check_caption("x" * 41, settings)[0] == "caption_too_long"
    assert check_caption("the cat the cat the cat the cat", settings)[0] == "caption_repetitive"
    assert check_caption("a red circle at the top left", settings) is None


def _row(rid, query, positive, group=None):
    return {"id": rid, "query": query, "positive": positive, "group_id": group}


IMAGE = {"instruction": "", "text": "", "media": [{"kind": "image", "uri": "a.png"}]}
CAPTION = {"instruction": "Find an image.", "text": "a red circle", "media": []}


def test_captionable_rows_have_one_caption_and_one_image():
    assert caption_slot(_row("a", CAPTION, IMAGE)).text_side == "query"
    assert caption_slot(_row("b", IMAGE, CAPTION)).text_side == "positive"
    assert caption_slot(_row("c", CAPTION, CAPTION)) is None
    two = {**IMAGE, "media": IMAGE["media"] * 2}
    assert caption_slot(_row("d", CAPTION, two)) is None


@pytest.mark.parametrize("policy", ["add", "replace", "both-in-one"])
def test_policies_on_hand_made_rows(policy):
    rows = [_row("a", CAPTION, IMAGE), _row("b", CAPTION, CAPTION), _row("c", CAPTION, IMAGE)]
    captions = {0: "a large red circle near the top", 2: "   "}
    kept, rejected, stats = apply_policy(rows, captions, RecaptionConfig(policy=policy), "s")
    assert [r["reason"] for r in rejected] == ["caption_empty"]
    assert len(kept) + len(rejected) == len(rows) + stats["rows_added"]
    by_id = {r["id"]: r for r in kept}
    assert by_id["b"] == rows[1] and by_id["c"] == rows[2]  # not captionable / rejected
    if policy == "add":
        assert by_id["a"]["query"]["text"] == "a red circle"
        assert by_id[f"a{SUFFIX}"]["query"]["text"] == "a large red circle near the top"
        assert by_id["a"]["group_id"] == by_id[f"a{SUFFIX}"]["group_id"] == "recaption:a"
    elif policy == "replace":
        assert by_id["a"]["query"]["text"] == "a large red circle near the top"
    else:
        assert by_id["a"]["query"]["text"] == "a red circle a large red circle near the top"
    assert by_id.get(f"a{SUFFIX}") is None or policy == "add"


# --------------------------------------------------------------------------- the step


@pytest.mark.parametrize("policy", ["add", "replace", "both-in-one"])
def test_every_policy_on_the_sample_captions(cleaned, by_policy, policy):
    version = by_policy(policy)
    manifest = version.manifest
    stats = manifest.stats
    before, after = rows_by_id(cleaned), rows_by_id(version)
    assert stats["captionable"] == len(before) and stats["captioned"] == len(before)
    assert stats["rows_in"] + stats["rows_added"] == manifest.rows + manifest.rejected
    assert stats["captioner"]["digest"] and stats["policy"] == policy
    for rid, row in before.items():
        original = row["query"]["text"]
        if policy == "add":
            new = after[f"{rid}{SUFFIX}"]
            assert after[rid]["query"]["text"] == original and new["query"]["text"] != original
            assert after[rid]["group_id"] == new["group_id"]
            assert new["positive"] == row["positive"]
        elif policy == "replace":
            assert after[rid]["query"]["text"] not in ("", original)
        else:
            assert after[rid]["query"]["text"].startswith(original + " ")
    assert len(after) == len(before) * (2 if policy == "add" else 1)


def test_greedy_decoding_gives_the_same_captions_in_every_run(cleaned, by_policy):
    """The three policy runs (each in a storage root of its own) caption every row alike:
    the captioner decodes greedily. The resume test below compares two whole versions of
    the same settings by digest."""
    add, replace, both = (by_policy(p) for p in ("add", "replace", "both-in-one"))
    assert len({add.uri, replace.uri, both.uri}) == 3
    added, replaced, joined = rows_by_id(add), rows_by_id(replace), rows_by_id(both)
    for rid, row in rows_by_id(cleaned).items():
        caption = replaced[rid]["query"]["text"]
        assert added[f"{rid}{SUFFIX}"]["query"]["text"] == caption
        assert joined[rid]["query"]["text"] == f"{row['query']['text']} {caption}"


def test_a_degenerate_caption_is_rejected_and_the_original_kept(
    sample_corpus, cleaned, captioners, tmp_path
):
    _, version = recaptioned(sample_corpus, cleaned, captioners["degenerate"], tmp_path,
                             policy="replace")  # fmt: skip
    before, after = rows_by_id(cleaned), rows_by_id(version)
    assert after == before  # every original kept as it was
    assert version.manifest.reject_counts == {"caption_repetitive": len(before)}
    shards = version.manifest.reject_shards
    rejects = [r for s in shards for r in version.read_shard(s).to_pylist()]
    assert {r["id"] for r in rejects} == set(before)
    assert all("repeat" in r["detail"] for r in rejects)


def test_an_interrupted_run_redoes_only_the_missing_shards(
    sample_corpus, cleaned, captioners, by_policy, tmp_path
):
    cfg = config(sample_corpus, tmp_path, captioners["readable"], policy="replace")
    shards = len(cleaned.manifest.shards)
    assert shards >= 3
    assert run_recaption(cfg, cleaned, show_progress=False, stop_after=1) is None
    work = Path(join(cfg.storage.root, "_work", STEP))
    assert len(list(work.rglob("*.done.json"))) == 1
    version = run_recaption(cfg, cleaned, show_progress=False)
    assert version.manifest.stats["shards_resumed"] == 1
    assert version.manifest.stats["shards_captioned"] == shards - 1
    assert not list(work.rglob("*.done.json"))  # the work area is gone after the commit
    fresh = by_policy("replace")  # the same settings, run in one go elsewhere
    assert fresh.uri != version.uri
    assert version.content_digest == fresh.content_digest


def test_a_missing_captioner_is_a_clear_error(sample_corpus, cleaned, tmp_path):
    cfg = config(sample_corpus, tmp_path, Path("unused"))
    cfg = cfg.model_copy(update={"prep": cfg.prep.model_copy(update={
        "recaption": cfg.prep.recaption.model_copy(update={"model": None})})})  # fmt: skip
    with pytest.raises(ValueError, match=r"prep\.recaption\.model is not set"):
        run_recaption(cfg, cleaned, show_progress=False)
