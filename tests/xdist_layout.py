"""How `make test` shares the suite between two pytest-xdist workers.

The unit of work is a module, so a module's fixtures stay in one process, with two kinds of
exception, each a group that one worker runs whole:

* the whole-pipeline modules (the simulated cluster, the demo, the pipeline's executions)
  run one after another: each keeps both cores busy most of its time, and two side by side
  slowed each other 1.5-2.5x (docs/PERFORMANCE.md, "The test suite");
* modules that share an expensive session fixture (the prepared sample corpus, the adaptive
  stage-1 run) run on one worker, so that fixture is built once, not once per worker.

Units start longest first (figures measured on the 2-core VM, for ordering only), so the
last unit to finish is a short one. Every worker sees the same order: xdist checks that
the collections agree, and the scheduler hands out units in that order.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

GROUPS = {
    "whole-pipelines": ("test_cluster.py", "test_demo_learning.py", "test_pipeline_flow.py"),
    # prepared_for_training and adaptive_stage1 (tests/conftest.py)
    "trained-sample": (
        "test_training_resume.py",
        "test_training.py",
        "test_mining.py",
        "test_families.py",
        "test_serving_apart.py",
        "test_feasibility.py",
    ),
}
# Seconds per module measured alone on the 2-core VM (2026-12-07); modules not named take a
# few seconds each and keep their collection order after these.
MODULE_SECONDS = {
    "test_cluster.py": 220,
    "test_demo_learning.py": 213,
    "test_pipeline_flow.py": 121,
    "test_serving.py": 96,
    "test_service_stack.py": 96,
    "test_gpu_check.py": 82,
    "test_jobs.py": 44,
    "test_training_resume.py": 42,
    "test_reproducible_training.py": 37,
    "test_recaption.py": 32,
    "test_serving_apart.py": 29,
    "test_families.py": 27,
    "test_mining.py": 27,
    "test_negative_padding.py": 21,
    "test_embedder.py": 17,
    "test_eval_throughput.py": 16,
    "test_training.py": 13,
    "test_paper_data.py": 11,
    "test_feasibility.py": 9,
}
GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}


def module_of(nodeid: str) -> str:
    """``tests/test_x.py::test_y[a::b]`` -> ``test_x.py`` (parameters may hold ``::``)."""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def unit_of(nodeid: str) -> str:
    """The work unit a test belongs to: its group's name, else its module's path."""
    module = module_of(nodeid)
    return GROUP_OF.get(module, nodeid.split("::", 1)[0])


def ordered(items: list) -> list:
    """``items`` unit by unit, the longest unit first; within a unit, the group's module
    order, then each module's own test order. Stable: ties keep collection order."""
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(unit_of(item.nodeid), []).append(item)

    def cost(unit: str) -> float:
        return sum(MODULE_SECONDS.get(m, 0.0) for m in {module_of(i.nodeid) for i in units[unit]})

    out = []
    for unit in sorted(units, key=lambda u: -cost(u)):
        members = units[unit]
        if unit in GROUPS:
            rank = {m: n for n, m in enumerate(GROUPS[unit])}
            members = sorted(members, key=lambda i: rank[module_of(i.nodeid)])
        out.extend(members)
    return out


class UnitScheduling(LoadScopeScheduling):
    """xdist's module-scope scheduling with this file's units, in collection order (which
    ``ordered`` has made longest first)."""

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)
