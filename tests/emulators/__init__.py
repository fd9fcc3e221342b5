"""Local servers that stand in for Google Cloud in tests and benchmarks.

The official emulators where they exist (Firestore from the Google Cloud CLI, the Cloud Storage and
Cloud Tasks emulators from PyPI), and for Cloud Monitoring, which has none, a small gRPC server that
implements the MetricService methods the service calls and records what it receives. Each runs on a
free port of 127.0.0.1 and is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import NoReturn

import pytest


def emulator_missing(what: str, how_to_install: str) -> NoReturn:
    """Fails the test run in CI (CI=true), where every emulator must be present; skips it elsewhere."""
    message = f"{what} is not available here; {how_to_install}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Waits until something accepts TCP connections at host:port; raises TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")
