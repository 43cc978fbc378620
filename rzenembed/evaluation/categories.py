"""Where an evaluation category sits in the MMEB-V2 table, and which metric scores it.

Image and video datasets are scored by Hit@1, visual-document datasets by NDCG@5 (linear
gain). A category's score is the mean over its datasets, a meta score (Image, Video,
VisDoc) the mean over all datasets under it, and ``All`` the mean over every dataset: task
averages, as the MMEB tables report them.
"""

from __future__ import annotations

from typing import NamedTuple


class Category(NamedTuple):
    meta: str  # Image | Video | VisDoc
    column: str  # the sub-score column of the MMEB table
    metric: str  # the main metric of its datasets ("ndcg" means ndcg@<eval.ndcg_k>)


CATEGORIES: dict[str, Category] = {
    "image_classification": Category("Image", "CLS", "hit@1"),
    "image_qa": Category("Image", "QA", "hit@1"),
    "image_retrieval": Category("Image", "RET", "hit@1"),
    "visual_grounding": Category("Image", "GD", "hit@1"),
    "video_classification": Category("Video", "CLS", "hit@1"),
    "video_qa": Category("Video", "QA", "hit@1"),
    "video_retrieval": Category("Video", "RET", "hit@1"),
    "video_moment_retrieval": Category("Video", "MRET", "hit@1"),
    "visdoc_vidore_v1": Category("VisDoc", "ViDoRe-V1", "ndcg"),
    "visdoc_vidore_v2": Category("VisDoc", "ViDoRe-V2", "ndcg"),
    "visdoc_visrag": Category("VisDoc", "VisRAG", "ndcg"),
    "visdoc_ood": Category("VisDoc", "OOD", "ndcg"),
}
META_ORDER = ("Image", "Video", "VisDoc")
COLUMNS: dict[str, tuple[str, ...]] = {
    meta: tuple(c.column for c in CATEGORIES.values() if c.meta == meta) for meta in META_ORDER
}


def category_of(name: str) -> Category:
    try:
        return CATEGORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown evaluation category {name!r}; expected one of {sorted(CATEGORIES)}"
        ) from None


def main_metric(name: str, ndcg_k: int = 5) -> str:
    metric = category_of(name).metric
    return f"ndcg@{ndcg_k}" if metric == "ndcg" else metric
