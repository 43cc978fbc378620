"""A driver that reaches the cluster through Ray Client says where to look when the head
keeps failing to start its server process.

That a driver connects again after one failed start is shown on the simulated cluster
(test_cluster.py: its head lets the first Ray Client server die and serving connects
again); here, without a head, the message after the last failed attempt.
"""

from __future__ import annotations

import pytest


def test_the_last_failed_attempt_names_the_address_and_the_logs(monkeypatch):
    import ray

    from rzenembed.compute import connect as engine

    calls = []

    def refuse(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionAbortedError("Initialization failure from server:\nTraceback ...")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(ConnectionAbortedError) as raised:
        engine.connect_client("ray://head:10001", attempts=2, pause_s=0.0)
    assert calls == ["ray://head:10001"] * 2
    message = str(raised.value)
    assert message.startswith("Ray Client at ray://head:10001: the head could not start")
    assert "in 2 attempts" in message and "ray_client_server*.err" in message
    assert "Initialization failure from server" in message
