"""Hit@1 ranking over local candidate lists and global corpora, against hand-made sets."""

from __future__ import annotations

import json

import torch

from rzenembed.evaluation.retrieval import hit_at_1


class TextKeyEncoder:
    """Embeds an input by looking its text up in a table: the ranking logic under test
    then has a known answer."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def encode(self, items, batch_size=16):
        rows = [torch.tensor(self.table[item.text], dtype=torch.float32) for item in items]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def write_set(folder, queries, candidates):
    folder.mkdir(parents=True)
    side = lambda text: {"instruction": "", "text": text, "media": []}  # noqa: E731
    (folder / "queries.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "qid": q,
                    "dataset": "d",
                    "category": "c",
                    "query": side(q),
                    "candidate_ids": cands,
                    "relevant_ids": rel,
                }
            )
            + "\n"
            for q, cands, rel in queries
        )
    )
    (folder / "candidates.jsonl").write_text(
        "".join(
            json.dumps({"cid": c, "dataset": "d", "candidate": side(c)}) + "\n" for c in candidates
        )
    )


def test_local_lists_restrict_the_ranking(tmp_path):
    table = {"q1": [1, 0], "q2": [0, 1], "a": [1, 0.1], "b": [0.1, 1], "c": [0, 1]}
    write_set(
        tmp_path / "s",
        [
            ("q1", ["a", "b"], ["a"]),  # hit
            ("q2", ["a", "b"], ["a"]),
        ],  # miss: b is closer
        ["a", "b", "c"],
    )
    score = hit_at_1(TextKeyEncoder(table), tmp_path / "s")
    assert (score.queries, score.hit_at_1) == (2, 0.5)


def test_empty_candidate_lists_rank_against_the_whole_dataset(tmp_path):
    table = {"q1": [1, 0], "q2": [0, 1], "a": [1, 0.1], "b": [0.1, 1], "c": [0, 1]}
    write_set(tmp_path / "s", [("q1", [], ["a"]), ("q2", [], ["b"])], ["a", "b", "c"])
    # q2's nearest over the whole corpus is c, not the relevant b
    assert hit_at_1(TextKeyEncoder(table), tmp_path / "s").hit_at_1 == 0.5
