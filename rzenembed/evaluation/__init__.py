"""MMEB-style evaluation: evaluation sets, tie-exact ranking metrics, scoring, reports.

Its names load on first use (``rzenembed.lazy``): a data step that reads an evaluation set
(``evalset``) does not import torch through the scoring code.
"""

from typing import TYPE_CHECKING

from rzenembed.lazy import lazy_exports

if TYPE_CHECKING:
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
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DatasetScore": "runner",
        "EvalSetError": "evalset",
        "discover": "evalset",
        "evaluate": "runner",
        "import_mmeb_eval": "evalset",
        "write_report": "report",
    },
)
