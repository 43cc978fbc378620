"""A TCP proxy in front of a local S3 server (moto, loopback) that counts what goes over the
wire: every byte the server sends back (headers included) and the client sends, and every
request the client sends, by method and by path; with ``latency_s``, it holds each request
that long before forwarding it, as an object store's time to first byte would. The tests
count requests with it; the benchmarks (``benchmarks/s3_read_bench.py``,
``benchmarks/prep_rehearsal.py``) add the latency."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/\S*) HTTP/1\.[01]\r\n")


class CountingProxy:
    """Forwards loopback TCP connections to ``upstream``; counts the bytes coming back and
    the requests going out by method (a request line split across reads is counted once)."""

    def __init__(self, upstream: tuple[str, int], latency_s: float = 0.0):
        self.upstream = upstream
        self.latency_s = latency_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.reset()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.fetched = 0
            self.sent = 0
            self.requests: Counter[str] = Counter()
            # (method, path without the query string), e.g. ("GET", "/bucket/media/a.png")
            self.paths: Counter[tuple[str, str]] = Counter()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        outgoing = threading.Thread(target=self._pump, args=(client, server, self._requests()))
        outgoing.start()
        self._pump(server, client, self._fetched)
        outgoing.join()
        client.close()
        server.close()

    def _requests(self):
        carry = b""

        def count(data: bytes) -> None:
            nonlocal carry
            text = carry + data
            found = [
                (m.group(1).decode(), unquote(m.group(2).decode().split("?", 1)[0]))
                for m in REQUEST_LINE.finditer(text)
                if m.end() > len(carry)
            ]
            carry = text[-2048:]
            with self._lock:
                self.sent += len(data)
                self.requests.update(method for method, _ in found)
                self.paths.update(found)
            if found and self.latency_s:  # an object store's time to first byte
                time.sleep(self.latency_s * len(found))

        return count

    def snapshot(self) -> dict[str, Any]:
        """Bytes fetched and sent, and requests by method, so far."""
        with self._lock:
            return {"fetched": self.fetched, "sent": self.sent, "requests": dict(self.requests)}

    def requests_to(self, prefix: str) -> Counter[tuple[str, str]]:
        """The (method, path) counts of requests for paths under ``prefix``."""
        with self._lock:
            return Counter({k: n for k, n in self.paths.items() if k[1].startswith(prefix)})

    def _fetched(self, data: bytes) -> None:
        with self._lock:
            self.fetched += len(data)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, count) -> None:
        try:
            while data := source.recv(2**16):
                count(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def s3_server() -> Iterator[tuple[str, int]]:
    """A local S3 server (moto in server mode) on loopback in a process of its own, for the
    benchmarks: in theirs it would share the GIL with the proxy and the driver (at 100k rows
    the server, not the pipeline, was the limit). Yields its (host, port); moto takes any
    credentials, so dummy ones are set when none are."""
    for name, value in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]:
        os.environ.setdefault(name, value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the local S3 server did not start") from None
                time.sleep(0.2)
        yield "127.0.0.1", port
    finally:
        server.terminate()
        server.wait()
