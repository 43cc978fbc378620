"""The MMEB-V2 benchmark as data: its 78 datasets, read from ``mmeb_v2.csv``.

The table is the one place that says, for each dataset, its modality and category, how its
annotations are parsed, whether queries rank their own candidate list (``local``) or the
whole dataset's pool (``global``), its main metric, the benchmark's query and target
instructions (verbatim, trailing spaces included; image datasets read theirs from each
row), where its annotations and media sit in the release, and how many queries the
reference scores have. Code never spells out a dataset name or an instruction.

``video_momentseeker`` has three query instructions (a video, an image or no visual input
in the query), in that order, separated by ``|``.

``media_path`` is where the reference loaders (VLM2Vec's ``src/data/eval_dataset/*.py``,
which define the release's layout) find a row's media under ``media``: a template over the
row's fields. ``{field}`` is the value as given; ``{field:stem}`` its file name without the
extension (``os.path.splitext(os.path.basename(...))[0]``); ``{field:flat}`` the path with
``/`` turned into ``_`` and cut at ``.mp4`` (MomentSeeker's clip folders);
``{field:visrag}`` VisRAG's page file name (the name's stem cut to 50 characters, ``_``, the
first 8 hex digits of the whole name's MD5, the extension). MomentSeeker has two templates,
``|``-separated: its clips and video queries, then its image queries.
"""

from __future__ import annotations

import csv
import hashlib
import posixpath
import string
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

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
    media_path: str  # where a row's media lie under ``media`` (a template, see above)
    text_field: str
    language: str
    queries: int  # rows the reference scores have (num_data)
    labels: int | None  # global label lists: the number of labels the benchmark ranks
    limit: int | None  # the first rows kept (SmthSmthV2 keeps 1000)

    @property
    def query_instructions(self) -> list[str]:
        return self.query_instruction.split("|")

    def media_of(self, row: Mapping[str, Any], rule: int = 0) -> str:
        """The media path of ``row`` under ``media``, as the reference loader builds it
        (``rule``: which of the ``|``-separated templates). A row lacking a field the
        template names raises ``KeyError`` naming it."""
        return _MEDIA_PATH.vformat(self.media_path.split("|")[rule], (), row)


def visrag_page(name: str) -> str:
    """VisRAG's page file for corpus id ``name``: long ids are cut, a hash keeps them apart."""
    stem, suffix = posixpath.splitext(name)
    return f"{stem[:50]}_{hashlib.md5(name.encode()).hexdigest()[:8]}{suffix}"


# The conversions the reference loaders apply to row fields (see the module's docstring).
_CONVERSIONS: dict[str, Callable[[str], str]] = {
    "": str,
    "stem": lambda v: posixpath.splitext(posixpath.basename(v))[0],
    "flat": lambda v: v.replace("/", "_").split(".mp4")[0],
    "visrag": visrag_page,
}


class _MediaPath(string.Formatter):
    """``str.format`` whose format spec names one of ``_CONVERSIONS``."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec not in _CONVERSIONS:
            raise ValueError(f"unknown media path conversion {format_spec!r}")
        return _CONVERSIONS[format_spec](str(value))


_MEDIA_PATH = _MediaPath()


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
        problems += [
            f"media_path conversion {spec!r}"
            for _, _, spec, _ in string.Formatter().parse(item.media_path)
            if spec is not None and spec not in _CONVERSIONS
        ]
        if item.modality == "video" and not item.media_path:
            problems.append("media_path: a video dataset names no frame folders")
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
