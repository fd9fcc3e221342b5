"""Steady HTTP traffic for integration tests: a client thread that records every answer while a server changes under it."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

CLIENT_BUDGET_SECONDS = 20.0  # a client's loop never runs longer than this
RUN_OF_NEW = 20  # consecutive responses that must all show a version before both workers count as switched


class Client(threading.Thread):
    """Sends infer requests one after another until stopped or out of budget; records every answer."""

    def __init__(self, url: str, body: dict[str, Any], budget_seconds: float = CLIENT_BUDGET_SECONDS) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = body
        self.budget_seconds = budget_seconds
        self.answers: list[tuple[int, str | None]] = []  # (status, model_version); status 0 = no answer
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        deadline = time.monotonic() + self.budget_seconds
        with requests.Session() as session:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    response = session.post(self.url, json=self.body, timeout=10)
                    answer = (response.status_code, response.json().get("model_version"))
                except (requests.RequestException, ValueError):
                    answer = (0, None)
                with self.lock:
                    self.answers.append(answer)

    def snapshot(self) -> list[tuple[int, str | None]]:
        with self.lock:
            return list(self.answers)

    def wait_for_run(self, version: str, since: int) -> bool:
        """Waits (bounded by the client's budget) until the last RUN_OF_NEW answers after `since` all show version."""
        while self.is_alive():
            answers = self.snapshot()[since:]
            if len(answers) >= RUN_OF_NEW and all(v == version for _, v in answers[-RUN_OF_NEW:]):
                return True
            time.sleep(0.02)
        answers = self.snapshot()[since:]
        return len(answers) >= RUN_OF_NEW and all(v == version for _, v in answers[-RUN_OF_NEW:])
