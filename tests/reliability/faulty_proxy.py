"""A fault-injecting HTTP proxy on 127.0.0.1, put between s3fs and the moto server in tests.

Real object stores fail in three ways a client must survive: a 5xx answer (500 InternalError,
503 SlowDown), a connection closed before any answer, and nothing listening at all. This proxy
forwards every request to the real server except those its schedule picks, which it answers
with one of those faults, so the client code under test runs unchanged against real HTTP.

It is bounded: every socket has a timeout and the server shuts itself down after ``lifetime_s``,
so a test that forgets to stop it cannot hang the suite.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# A schedule maps (request number from 1, method, path) to a fault kind or None (forward).
Schedule = Callable[[int, str, str], str | None]
FAULTS = ("500", "503", "drop", "reset")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
_BODIES = {
    "500": b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
    "503": b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>",
}


def every(n: int, kinds: tuple[str, ...] = FAULTS, limit: int | None = None) -> Schedule:
    """Fail every ``n``-th request, cycling through ``kinds``, at most ``limit`` times."""
    injected = 0
    lock = threading.Lock()

    def schedule(number: int, method: str, path: str) -> str | None:
        nonlocal injected
        with lock:
            if number % n or (limit is not None and injected >= limit):
                return None
            kind = kinds[injected % len(kinds)]
            injected += 1
            return kind

    return schedule


def always(kind: str) -> Schedule:
    """Fail every request with ``kind``: the store is down."""
    return lambda number, method, path: kind


def after(n: int, kind: str) -> Schedule:
    """Forward the first ``n`` requests, then fail every later one: the store dies mid-run."""
    return lambda number, method, path: kind if number > n else None


class FaultyProxy:
    """Forward HTTP to ``upstream`` (``http://host:port``), injecting the faults ``schedule`` picks."""

    def __init__(self, upstream: str, schedule: Schedule | None = None, lifetime_s: float = 300):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.schedule = schedule or (lambda number, method, path: None)
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    number = proxy.requests
                kind = proxy.schedule(number, self.command, self.path)
                if kind is not None:
                    with proxy._lock:
                        proxy.faults[kind] += 1
                    self._fault(kind)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _fault(self, kind: str) -> None:
                if kind in _BODIES:
                    body = _BODIES[kind]
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                if kind == "reset":  # RST instead of FIN: "connection reset by peer"
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def start(self) -> FaultyProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
