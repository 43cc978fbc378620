"""``prepare_all`` runs its sources side by side: a source that fails does not stop the
others, which are committed (found again by the rerun) before the failure is raised."""

from __future__ import annotations

import pytest

from rzenembed.config import config_from_dict
from rzenembed.data.importers import SourceError
from rzenembed.prep.prepare import prepare_all


def test_a_failed_source_leaves_the_others_committed(ray_local, sample_corpus, tmp_path):
    missing = tmp_path / "no-such-source"
    cfg = config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "storage": {"root": str(tmp_path / "versions")},
            "sources": [
                # listed first: one source after another, the next would never start
                {
                    "name": "broken",
                    "uri": str(missing),
                    "task_group": "text_retrieval",
                    "stage": "stage1",
                },
                {
                    "name": "sample-text-pairs",
                    "uri": str(sample_corpus.root / "sample-text-pairs"),
                    "task_group": "text_retrieval",
                    "stage": "stage1",
                },
            ],
            "prep": {"shard_rows": 16, "decontaminate": []},
        }
    )
    with pytest.raises((SourceError, FileNotFoundError)):
        prepare_all(cfg, show_progress=False)
    committed = sorted((tmp_path / "versions").glob("sample-text-pairs/*/*/manifest.json"))
    steps = {path.parent.parent.name for path in committed}
    assert steps == {"ingest", "clean", "cap"}, committed
