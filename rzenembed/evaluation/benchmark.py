"""The MMEB-V2 benchmark as data: its 78 datasets, read from ``mmeb_v2.csv``.

The table is the one place that says, for each dataset, its modality and category, how its
annotations are parsed, whether queries rank their own candidate list (``local``) or the
whole dataset's pool (``global``), its main metric, the benchmark's query and target
instructions (verbatim, trailing spaces included; image datasets read theirs from each
row), where its annotations and media sit in the release, and how many queries the
reference scores have. Code never spells out a dataset name or an instruction.

``video_momentseeker`` has three query instructions (a video, an image or no visual input
in the query), in that order, separated by ``|``.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rzenembed.evaluation.categories import category_of

TABLE = Path(__file__).with_name("mmeb_v2.csv")
MODALITIES = ("image", "video", "visdoc")
METRICS = ("hit@1", "ndcg_linear@5")
PARSERS = (
    "image_cls",
    "image_qa",
    "image_i2t",
    "image_t2i",
    "image_i2i_vg",
    "video_cls",
    "video_ssv2",
    "video_mvbench",
    "video_videomme",
    "video_nextqa",
    "video_egoschema",
    "video_activitynetqa",
    "video_ret",
    "video_mret",
    "video_momentseeker",
    "visdoc_vidore",
    "visdoc_visrag",
)


@dataclass(frozen=True)
class BenchmarkDataset:
    """One MMEB-V2 dataset, as the table describes it."""

    dataset: str  # the key the benchmark's score files use
    modality: str
    category: str  # an evaluation category (rzenembed.evaluation.categories)
    parser: str
    candidates: str  # local | global
    metric: str
    query_instruction: str
    target_instruction: str
    annotations: str  # the annotation repository, a folder under <release>/annotations/
    config: str
    split: str
    media: str  # the media folder under the release root
    video_field: str
    text_field: str
    language: str
    queries: int  # rows the reference scores have (num_data)
    labels: int | None  # global label lists: the number of labels the benchmark ranks
    limit: int | None  # the first rows kept (SmthSmthV2 keeps 1000)

    @property
    def query_instructions(self) -> list[str]:
        return self.query_instruction.split("|")


def _int_or_none(value: str) -> int | None:
    return int(value) if value.strip() else None


@cache
def mmeb_v2() -> tuple[BenchmarkDataset, ...]:
    """Every dataset of the table, checked: known modality, category, parser and metric."""
    with TABLE.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for number, row in enumerate(rows, 2):
        item = BenchmarkDataset(
            **{
                **row,
                "queries": int(row["queries"]),
                "labels": _int_or_none(row["labels"]),
                "limit": _int_or_none(row["limit"]),
            }
        )
        problems = [
            f"{field} {value!r}"
            for field, value, allowed in (
                ("modality", item.modality, MODALITIES),
                ("parser", item.parser, PARSERS),
                ("metric", item.metric, METRICS),
                ("candidates", item.candidates, ("local", "global")),
            )
            if value not in allowed
        ]
        category_of(item.category)
        if problems:
            raise ValueError(f"{TABLE.name}:{number} ({item.dataset}): unknown {problems}")
        out.append(item)
    names = Counter(d.dataset for d in out)
    repeated = sorted(n for n, c in names.items() if c > 1)
    if repeated:
        raise ValueError(f"{TABLE.name} repeats datasets {repeated}")
    return tuple(out)


def benchmark_dataset(name: str) -> BenchmarkDataset:
    for item in mmeb_v2():
        if item.dataset == name:
            return item
    raise KeyError(f"{name!r} is not an MMEB-V2 dataset (see {TABLE.name})")


def is_benchmark_dataset(name: str) -> bool:
    return any(item.dataset == name for item in mmeb_v2())
