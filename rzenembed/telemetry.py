"""Telemetry off by default in every process and service the project starts.

Prefect's server analytics, Ray's usage stats, MLflow's client and UI telemetry and the
Hugging Face hub's are each on unless told otherwise. The project sets each switch off
where it starts something (the demo, the CLI, the local stack, the image, the manifests)
*unless the environment already sets it*: a user who wants to send telemetry exports the
variable with the value that turns it on (docs/operations.md, "Telemetry").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TELEMETRY_OFF: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Read by MLflow (and other tools) as a general opt-out; "true", as MLflow compares.
    "DO_NOT_TRACK": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def telemetry_off(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set every switch of ``TELEMETRY_OFF`` in ``environ`` (``os.environ`` by default)
    that the environment does not set already; returns ``environ``."""
    environ = os.environ if environ is None else environ
    for name, value in TELEMETRY_OFF.items():
        environ.setdefault(name, value)
    return environ
