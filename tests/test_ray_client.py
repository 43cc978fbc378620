"""A driver that reaches the cluster through Ray Client says where to look when the head
keeps failing to start its server process.

That a driver connects again after one failed start is shown on the simulated cluster
(test_cluster.py: its head lets the first Ray Client server die and serving connects
again); here, without a head, the message after the last failed attempt, and a failed
attempt's clean-up against a log stream held open as the head's proxy holds it.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from types import SimpleNamespace

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


def test_a_failed_attempt_does_not_wait_for_the_streams_the_proxy_holds():
    """Ray's own clean-up of a failed attempt joins its data and log stream threads; the
    head's proxy holds the data stream for the reconnect grace period (30 s) and the log
    stream while it retries the dead server (40 s to 160 s). Inside ``abandoned_streams``
    each join waits at most ``wait_s`` (Ray's close still runs), closing the channel (Ray's
    next clean-up step) ends both threads, and outside the block Ray's own close methods
    are back."""
    import grpc
    from ray.core.generated import ray_client_pb2_grpc
    from ray.util.client.dataclient import DataClient
    from ray.util.client.logsclient import LogstreamClient

    from rzenembed.compute.connect import abandoned_streams

    released = threading.Event()

    class HeldData(ray_client_pb2_grpc.RayletDataStreamerServicer):
        def Datapath(self, request_iterator, context):
            released.wait(60)
            yield from ()

    class HeldLogs(ray_client_pb2_grpc.RayletLogStreamerServicer):
        def Logstream(self, request_iterator, context):
            released.wait(60)
            yield from ()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ray_client_pb2_grpc.add_RayletDataStreamerServicer_to_server(HeldData(), server)
    ray_client_pb2_grpc.add_RayletLogStreamerServicer_to_server(HeldLogs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    worker = SimpleNamespace(_in_shutdown=False, channel=channel, _can_reconnect=lambda e: False)
    ray_closes = (DataClient.close, LogstreamClient.close)
    try:
        with abandoned_streams(wait_s=0.5):
            data = DataClient(worker, client_id="c1", metadata=[])
            logs = LogstreamClient(worker, metadata=[])
            time.sleep(0.5)  # both calls are open and held
            started = time.monotonic()
            worker._in_shutdown = True
            data.close()
            logs.close()
            waited = time.monotonic() - started
        threads = (data.data_thread, logs.log_thread)
        assert all(t.is_alive() for t in threads)  # not joined: still inside the held calls
        assert waited < 5, waited
        assert data._in_shutdown  # Ray's close ran (the thread, still held, did not set it)
        channel.close()  # what Ray's clean-up does next
        for thread in threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in threads)
        assert (DataClient.close, LogstreamClient.close) == ray_closes
    finally:
        released.set()
        server.stop(grace=None)
