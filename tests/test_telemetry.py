"""Telemetry is off by default wherever the project starts something, and a user's own
setting wins (rzenembed.telemetry)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rzenembed.telemetry import TELEMETRY_OFF, telemetry_off

ROOT = Path(__file__).resolve().parents[1]


def test_every_switch_is_set_unless_the_environment_sets_it():
    env = telemetry_off({"MLFLOW_DISABLE_TELEMETRY": "false", "PATH": "/bin"})
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "false"  # the user's choice stands
    assert env["PATH"] == "/bin"
    assert {k: env[k] for k in TELEMETRY_OFF if k != "MLFLOW_DISABLE_TELEMETRY"} == {
        k: v for k, v in TELEMETRY_OFF.items() if k != "MLFLOW_DISABLE_TELEMETRY"
    }


def test_the_makefile_and_the_image_switch_every_one_off():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, value in TELEMETRY_OFF.items():
        assert f"export {name} ?= {value}\n" in makefile, name
        assert f"    {name}={value} \\\n" in dockerfile, name


def test_the_local_stack_starts_its_services_with_telemetry_off(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("local_stack", ROOT / "infra/local/stack.py")
    stack_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack_module)
    for name in TELEMETRY_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "false")
    env = stack_module.Stack(tmp_path).base_env({})
    assert env["DO_NOT_TRACK"] == "false"
    assert all(env[k] == v for k, v in TELEMETRY_OFF.items() if k != "DO_NOT_TRACK")
