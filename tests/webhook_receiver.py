"""A webhook receiver for tests: a local HTTP server that records every POST and answers queued
statuses (then 200). Used by tests/test_webhooks.py and the dashboard's browser test."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A local webhook receiver: records every request; answers the queued statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def handle(self, handler: BaseHTTPRequestHandler) -> int:
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)  # holds the request open: a second one would overlap (never decides)
            with self.lock:
                status = self.statuses.pop(0) if self.statuses else 200
                self.requests.append(
                    {"headers": dict(handler.headers), "body": body, "path": handler.path, "status": status}
                )
            return status
        finally:
            with self.lock:
                self.in_flight -= 1

    def delivered(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests if r["status"] == 200]


@contextmanager
def receiver_server(receiver: Receiver) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            status = receiver.handle(self)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/srcompress?team=1"
    finally:
        server.shutdown()
        server.server_close()
