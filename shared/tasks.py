"""Task queues: named HTTP tasks delivered at least once to a worker URL, deduplicated by name.

The embedded queue delivers over local HTTP with the headers Cloud Tasks sends, exponential
backoff and a bounded number of attempts, so the local path exercises the same HTTP worker as
production. A Cloud Tasks queue fills the same Protocol (HTTP target, OIDC token, the same names).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from shared.clock import now_iso
from shared.sqlite import SqliteDatabase

log = logging.getLogger(__name__)

TASK_NAME = re.compile(r"^[A-Za-z0-9_-]{1,500}$")  # Cloud Tasks' rule for task ids


@dataclass(frozen=True)
class Task:
    """An HTTP POST of a JSON payload to a URL, under a name unique in its queue."""

    name: str
    url: str
    payload: dict[str, Any]


class TaskQueue(Protocol):
    def enqueue(self, task: Task) -> bool:
        """Adds the task; returns False (adding nothing) if a task of that name was ever enqueued."""
        ...

    def enqueue_many(self, tasks: Sequence[Task]) -> int:
        """Adds the tasks whose names were never enqueued (a name repeated in `tasks` counts once);
        returns how many it added. Raises ValueError, adding nothing, if a name is not a valid task id."""
        ...


_TASKS_DDL = """
CREATE TABLE IF NOT EXISTS local_tasks (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    last_status TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS local_tasks_due ON local_tasks (state, next_attempt_at)
"""


class LocalTaskQueue:
    """A queue in the embedded database, delivered by background threads of the process that enqueues.

    Task states: pending (waiting for its next attempt), done (answered 2xx), failed (attempts used up).
    Delivery threads start on enqueue and stop once nothing is pending; tasks left pending by a
    stopped process are delivered by the next process that enqueues into the same database.
    """

    def __init__(
        self,
        db: SqliteDatabase,
        queue_name: str = "skills-batch",
        max_attempts: int = 3,
        min_backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        concurrency: int = 2,
        request_timeout_seconds: float = 600.0,
    ) -> None:
        self.db = db
        self.queue_name = queue_name
        self.max_attempts = max_attempts
        self.min_backoff = min_backoff_seconds
        self.max_backoff = max_backoff_seconds
        self.concurrency = concurrency
        self.request_timeout = request_timeout_seconds
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        db.ensure_schema("local_tasks", _TASKS_DDL)

    def enqueue(self, task: Task) -> bool:
        return self.enqueue_many([task]) == 1

    def enqueue_many(self, tasks: Sequence[Task]) -> int:
        for task in tasks:
            if not TASK_NAME.fullmatch(task.name):
                raise ValueError(f"Task name {task.name!r} is not a valid Cloud Tasks id.")
        created = 0
        if tasks:
            now, created_at = time.time(), now_iso()
            # One transaction for the whole batch: a run's tasks are all recorded, or none are.
            with self.db.transaction() as conn:
                cursor = conn.executemany(
                    "INSERT OR IGNORE INTO local_tasks (name, url, payload, state, next_attempt_at, created_at) "
                    "VALUES (?, ?, ?, 'pending', ?, ?)",
                    [(task.name, task.url, json.dumps(task.payload), now, created_at) for task in tasks],
                )
                created = cursor.rowcount  # executemany sums the rows each INSERT added; an ignored one adds none
        self.start_delivery()
        return created

    def counts(self) -> dict[str, int]:
        """Returns how many tasks are in each state."""
        rows = self.db.query("SELECT state, COUNT(*) AS n FROM local_tasks GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def task(self, name: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM local_tasks WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None

    # -- delivery ----------------------------------------------------------------------------------

    def start_delivery(self) -> None:
        """Makes sure delivery threads run in this process."""
        with self._threads_lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.concurrency:
                thread = threading.Thread(target=self._deliver_loop, name="local-task-delivery", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _deliver_loop(self) -> None:
        idle_since: float | None = None
        while True:
            claimed = self._claim()
            if claimed is None:
                if not self._has_pending():
                    if idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > 2.0:
                        return
                time.sleep(0.05)
                continue
            idle_since = None
            self._deliver(*claimed)

    def _has_pending(self) -> bool:
        return bool(self.db.query("SELECT 1 FROM local_tasks WHERE state = 'pending' LIMIT 1"))

    def _claim(self) -> tuple[str, str, bytes, int] | None:
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT name, url, payload, attempts FROM local_tasks "
                "WHERE state = 'pending' AND next_attempt_at <= ? AND lease_until <= ? ORDER BY next_attempt_at LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            # The lease keeps other delivery threads (here or in other processes) off this task while it runs.
            conn.execute(
                "UPDATE local_tasks SET lease_until = ? WHERE name = ?", (now + self.request_timeout + 5, row["name"])
            )
        return row["name"], row["url"], row["payload"].encode(), int(row["attempts"])

    def _deliver(self, name: str, url: str, body: bytes, attempts: int) -> None:
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "Google-Cloud-Tasks",
                "X-CloudTasks-QueueName": self.queue_name,
                "X-CloudTasks-TaskName": name,
                "X-CloudTasks-TaskRetryCount": str(attempts),
                "X-CloudTasks-TaskExecutionCount": str(attempts),
                "X-CloudTasks-TaskETA": f"{time.time():.6f}",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            status = 0
            log.warning("task delivery failed", extra={"task": name, "reason": str(exc)})
        attempts += 1
        if 200 <= status < 300:
            state, next_at = "done", 0.0
        elif attempts >= self.max_attempts:
            state, next_at = "failed", 0.0
            log.error("task failed after its last attempt", extra={"task": name, "attempts": attempts, "status": status})
        else:
            state = "pending"
            next_at = time.time() + min(self.max_backoff, self.min_backoff * 2 ** (attempts - 1))
            log.warning("task will be retried", extra={"task": name, "attempts": attempts, "status": status})
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE local_tasks SET state = ?, attempts = ?, next_attempt_at = ?, lease_until = 0, last_status = ? "
                "WHERE name = ?",
                (state, attempts, next_at, str(status), name),
            )
