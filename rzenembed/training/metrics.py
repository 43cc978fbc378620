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
    """One JSON object per step, appended (a resumed run continues the same file).

    With ``publish_uri`` (a remote run folder) the lines go to a local file and ``sync``
    copies it whole to the URI (at every checkpoint and at the end), so the file on the
    storage root is what any node reads; a resumed run, possibly on another node, starts
    from the published lines.
    """

    def __init__(
        self, path: str | Path, publish_uri: str | None = None, endpoint_url: str | None = None
    ):
        from rzenembed.data.folders import exists, read_text

        self.path = Path(path)
        self.publish_uri, self.endpoint_url = publish_uri, endpoint_url
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if publish_uri and exists(publish_uri, endpoint_url) and not self.path.exists():
            self.path.write_text(read_text(publish_uri, endpoint_url), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self.publish_uri:
            from rzenembed.data.folders import write_text

            write_text(self.publish_uri, self.path.read_text(encoding="utf-8"), self.endpoint_url)

    def close(self) -> None:
        self._file.close()
        self.sync()


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

    def sync(self) -> None:
        for logger in self.loggers:
            if hasattr(logger, "sync"):
                logger.sync()

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


# Masking that removes most would-be negatives for many steps in a row is the symptom of
# collapsed or anisotropic embeddings (every candidate scores like the positive), not of
# hard data: the loss then has almost nothing to push against.
MASKING_ALERT_FRACTION = 0.5
MASKING_ALERT_STEPS = 50


class MaskingWatch:
    """Counts consecutive steps whose ``masked_fraction`` exceeds ``fraction``; returns a
    warning text on the step the streak reaches ``steps`` (and again every ``steps`` steps
    while it lasts), None otherwise."""

    def __init__(self, fraction: float = MASKING_ALERT_FRACTION, steps: int = MASKING_ALERT_STEPS):
        self.fraction, self.steps, self.streak = fraction, steps, 0

    def observe(self, step: int, masked_fraction: float) -> str | None:
        self.streak = self.streak + 1 if masked_fraction > self.fraction else 0
        if self.streak and self.streak % self.steps == 0:
            return (
                f"step {step}: masking removed more than {self.fraction:.0%} of the would-be "
                f"negatives for {self.streak} consecutive steps (now {masked_fraction:.0%}); "
                "embeddings may be collapsed or anisotropic (false_negative_delta too lenient "
                "for this model?)"
            )
        return None
