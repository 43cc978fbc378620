"""The Ray Data engine of data preparation: order, bounded concurrency, retries of transient
errors, real failures raised as themselves."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from rzenembed.data.engine import run_shards


def square(x: int) -> int:
    return x * x


def test_results_come_back_in_input_order(ray_local):
    assert run_shards(square, list(range(12)), max_in_flight=3, show_progress=False) == [
        x * x for x in range(12)
    ]


def fail_once(item: tuple[str, int]) -> int:
    """Raises an OSError the first time it sees an item (a flaky store), then succeeds."""
    folder, x = item
    marker = Path(folder) / f"seen-{x}"
    if not marker.exists():
        marker.touch()
        raise OSError("connection reset by the store")
    return x


def test_transient_io_errors_are_retried(ray_local, tmp_path):
    items = [(str(tmp_path), x) for x in range(3)]
    assert run_shards(fail_once, items, retries=2, show_progress=False) == [0, 1, 2]


def bad_input(x: int) -> int:
    raise ValueError(f"bug on {x}")


def test_other_errors_are_raised_not_retried(ray_local):
    with pytest.raises(ValueError, match="bug on 1"):
        run_shards(bad_input, [1], retries=3, show_progress=False)


def record_window(item: tuple[str, int]) -> int:
    """Writes its start/end time so the test can count tasks running at once."""
    folder, x = item
    start = time.time()
    time.sleep(0.3)
    Path(folder, f"{x}.txt").write_text(f"{start} {time.time()} {os.getpid()}")
    return x


def test_at_most_max_in_flight_tasks_run_at_once(ray_local, tmp_path):
    items = [(str(tmp_path), x) for x in range(6)]
    run_shards(record_window, items, max_in_flight=1, show_progress=False)
    windows = sorted(tuple(map(float, p.read_text().split()[:2])) for p in tmp_path.glob("*.txt"))
    assert len(windows) == 6
    assert all(a_end <= b_start + 1e-3 for (_, a_end), (b_start, _) in itertools.pairwise(windows))


def test_bad_concurrency_is_refused():
    with pytest.raises(ValueError, match="max_in_flight"):
        run_shards(square, [1], max_in_flight=0)


def test_ray_data_info_lines_stay_off_the_terminal_unless_verbose(ray_local, capfd, monkeypatch):
    """A map's start/plan/end lines go to Ray Data's log file, not the terminal (a demo
    printed hundreds): its console handler is held at WARNING, its file handler is left
    alone; with RZENEMBED_VERBOSE the console keeps INFO."""
    import logging

    def levels() -> dict[str, int]:
        ray_data = logging.getLogger("ray.data").handlers
        return {type(h).__name__: h.level for h in ray_data if "Capture" not in type(h).__name__}

    def reset() -> None:  # as a fresh process has them
        for handler in logging.getLogger("ray.data").handlers:
            handler.setLevel(
                logging.NOTSET if type(handler).__name__ == "SessionFileHandler" else logging.INFO
            )

    monkeypatch.delenv("RZENEMBED_VERBOSE", raising=False)
    reset()
    assert run_shards(abs, [-1, -2], show_progress=False) == [1, 2]
    quiet = capfd.readouterr()
    assert "Execution plan" not in quiet.out + quiet.err
    assert levels() == {"SessionFileHandler": logging.NOTSET, "PlainRayHandler": logging.WARNING}
    monkeypatch.setenv("RZENEMBED_VERBOSE", "1")
    reset()
    assert run_shards(abs, [-3], show_progress=False) == [3]
    assert levels() == {"SessionFileHandler": logging.NOTSET, "PlainRayHandler": logging.INFO}
