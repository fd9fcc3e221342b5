"""A scripted task worker for queue tests: an HTTP server on 127.0.0.1 that records each POST it receives
and answers with the next of its statuses (the last one repeats)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

DEADLINE_SECONDS = 15.0


@dataclass
class Delivery:
    at: float
    method: str
    path: str
    headers: dict[str, str]  # names lowercased: HTTP header names are case-insensitive
    body: Any


@dataclass
class Worker:
    """What the server received, and the statuses it answers with."""

    url: str
    statuses: list[int] = field(default_factory=lambda: [200])
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, delivery: Delivery) -> int:
        with self.lock:
            self.deliveries.append(delivery)
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def received(self, name: str) -> list[Delivery]:
        """The deliveries of the task of that name (X-CloudTasks-TaskName)."""
        with self.lock:
            return [d for d in self.deliveries if d.headers.get("x-cloudtasks-taskname") == name]

    def wait_for(self, count: int) -> list[Delivery]:
        """Waits until `count` deliveries arrived; returns them."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.deliveries) >= count:
                    return list(self.deliveries)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.deliveries)} deliveries after {DEADLINE_SECONDS} s, expected {count}")


@pytest.fixture
def worker() -> Iterator[Worker]:
    holder: dict[str, Worker] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server API)
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status = holder["worker"].answer(Delivery(time.monotonic(), "POST", self.path, headers, json.loads(raw)))
            body = json.dumps({"status": status}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder["worker"] = Worker(f"http://127.0.0.1:{server.server_address[1]}/tasks/batch-worker")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield holder["worker"]
    server.shutdown()
    server.server_close()
