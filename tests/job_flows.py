"""A one-task Prefect flow whose task runs as a Ray Job, for the cancellation test: a
separate driver process runs it against a Prefect API the test also reaches."""

from __future__ import annotations

import json
import time

from prefect import flow, task

from rzenembed.config import config_from_dict
from tasks.common import run_in_job


@task(name="sleepy", cache_key_fn=lambda _ctx, p: f"rzenembed-sleepy-{p['key']}")
def sleepy(config: str, seconds: float, key: str) -> str | None:
    cfg = config_from_dict(json.loads(config))
    return run_in_job(cfg, "sleepy", time.sleep, seconds).job


@flow(name="sleepy-flow")
def sleepy_flow(config: str, seconds: float, key: str) -> str | None:
    return sleepy(config, seconds, key)
