"""The suite's own shared services are shared: under xdist both workers report to the one
Prefect server the controller started (tests/prefect_server.py)."""

from __future__ import annotations

import json
import os
import urllib.request

from .prefect_server import SHARED_API_ENV


def test_the_session_prefect_api_is_the_controllers_under_xdist(prefect_api):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert prefect_api == os.environ[SHARED_API_ENV]
    else:
        assert SHARED_API_ENV not in os.environ
    with urllib.request.urlopen(f"{prefect_api}/health", timeout=10) as answer:
        assert json.loads(answer.read()) is True
