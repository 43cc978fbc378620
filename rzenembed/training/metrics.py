"""Where per-step training metrics go: a JSONL file always, MLflow when configured.

Only rank 0 logs. The interface is tiny on purpose so that the loop does not know which
backends are attached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlLogger:
    """One JSON object per step, appended (a resumed run continues the same file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MlflowLogger:
    """Numeric metrics to an MLflow run (nested names flattened with '/')."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None):
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        if run_id is None:
            mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        self._mlflow.log_metrics(numeric, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


class MultiLogger:
    def __init__(self, loggers: list[MetricsLogger]):
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
