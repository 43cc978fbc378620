"""MMEB-style evaluation: evaluation sets, tie-exact ranking metrics, scoring, reports."""

from rzenembed.evaluation.evalset import EvalSetError, discover, import_mmeb_eval
from rzenembed.evaluation.report import write_report
from rzenembed.evaluation.runner import DatasetScore, evaluate

__all__ = [
    "DatasetScore",
    "EvalSetError",
    "discover",
    "evaluate",
    "import_mmeb_eval",
    "write_report",
]
