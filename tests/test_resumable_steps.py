"""A preparation step resumes shard by shard: a shard whose task raises does not throw away
the others, a rerun of the step redoes only that shard, and within ``prep.shard_error_budget``
its rows become ``shard_failed`` rejects instead of failing the step.

The step is ``rzenembed.prep.base.execute`` (what ingest, clean, the video steps and the
merge run on) with a step function that has a bug on one shard until the test "fixes" it
(a marker file), and that notes every call, so the test counts which shards ran.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from rzenembed.config import config_from_dict
from rzenembed.data.schema import RECORD_SCHEMA, record, records_table, side
from rzenembed.data.version import DatasetVersion, VersionWriter
from rzenembed.prep.base import ShardsFailed, execute, per_shard_jobs, plan_step

SHARDS, ROWS_PER_SHARD, BAD = 4, 5, "part-00002"


def buggy_step(rows: list[dict], shard: str, *, folder: str) -> tuple[list, list, dict]:
    """Upper-cases the query text; raises on shard ``BAD`` until ``fixed`` exists."""
    Path(folder, "calls", f"{shard}-{uuid.uuid4().hex[:6]}").touch()
    if shard == BAD and not Path(folder, "fixed").exists():
        raise KeyError("'label' (a bug that only this shard's rows reach)")
    out = [{**r, "query": {**r["query"], "text": r["query"]["text"].upper()}} for r in rows]
    return out, [], {}


def calls(folder: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[0] for p in (folder / "calls").iterdir())


@pytest.fixture()
def source(tmp_path) -> DatasetVersion:
    writer = VersionWriter(str(tmp_path / "input"), RECORD_SCHEMA)
    for k in range(SHARDS):
        rows = [
            record(
                f"pair-{k}-{i}",
                "pairs",
                "text_retrieval",
                side(f"what is item {k}.{i}?", "Find the passage that answers:"),
                side(f"item {k}.{i} is a thing"),
            )
            for i in range(ROWS_PER_SHARD)
        ]
        writer.write_shard(f"part-{k:05d}", records_table(rows))
    return writer.commit(
        dataset="pairs",
        step="ingest",
        config_digest="test",
        code_version="1",
        inputs=[],
        stats={"media_root": str(tmp_path)},
    )


def run_step(source: DatasetVersion, root: Path, budget: float = 0.0) -> DatasetVersion:
    cfg = config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "storage": {"root": str(root / "versions")},
            "prep": {"shard_error_budget": budget},
        }
    )
    plan = plan_step(cfg, "upper", "pairs", "1", "digest", [source.ref()])

    def jobs(staging: str):
        params = {"folder": str(root)}
        return per_shard_jobs(source, staging, "upper", buggy_step, params, None)

    return execute(plan, cfg, jobs, show_progress=False)


def test_a_rerun_redoes_only_the_shard_that_failed(ray_local, source, tmp_path):
    (tmp_path / "calls").mkdir()
    with pytest.raises(ShardsFailed, match=rf"1 of 4 shard tasks raised \({BAD}\)") as failed:
        run_step(source, tmp_path)
    assert "3 finished shards are kept" in str(failed.value)
    assert isinstance(failed.value.__cause__, KeyError)
    assert calls(tmp_path) == [f"part-{k:05d}" for k in range(SHARDS)]

    (tmp_path / "fixed").touch()
    for call in (tmp_path / "calls").iterdir():
        call.unlink()
    version = run_step(source, tmp_path)
    assert calls(tmp_path) == [BAD]  # the three finished shards were not run again
    assert version.manifest.stats["shards_reused"] == 3
    assert version.rows == SHARDS * ROWS_PER_SHARD and version.manifest.rejected == 0
    texts = version.read_table(columns=["query"]).column("query").to_pylist()
    assert all(q["text"].startswith("WHAT IS ITEM") for q in texts)
    assert [s.path for s in version.manifest.shards] == [
        f"data/part-{k:05d}.parquet" for k in range(SHARDS)
    ]
    assert not list(Path(version.uri).glob("_staging*"))


def test_within_the_error_budget_the_failed_shards_rows_are_rejects(ray_local, source, tmp_path):
    (tmp_path / "calls").mkdir()
    version = run_step(source, tmp_path, budget=0.25)  # one shard of four: 25% of the rows
    assert version.rows == (SHARDS - 1) * ROWS_PER_SHARD
    assert version.manifest.reject_counts == {"shard_failed": ROWS_PER_SHARD}
    assert version.manifest.stats["shards_failed"] == 1
    assert version.manifest.stats["rows_in"] == version.rows + version.manifest.rejected
    rejects = version.read_rejects().to_pylist()
    assert {r["id"] for r in rejects} == {f"pair-2-{i}" for i in range(ROWS_PER_SHARD)}
    assert all("KeyError" in r["detail"] and "'label'" in r["detail"] for r in rejects)


def test_past_the_error_budget_the_step_fails_naming_it(ray_local, source, tmp_path):
    (tmp_path / "calls").mkdir()
    with pytest.raises(ShardsFailed, match=r"5 rows are 25.0% of 20, over prep.shard_error"):
        run_step(source, tmp_path, budget=0.2)
