"""Task queues: named HTTP tasks delivered at least once to a worker URL, deduplicated by name.

The embedded queue delivers over local HTTP with the headers Cloud Tasks sends, exponential
backoff, a bounded number of attempts and a dispatch deadline per attempt, so the local path
exercises the same HTTP worker as production. A Cloud Tasks queue fills the same Protocol (HTTP
target, OIDC token, dispatch deadline, the same names).
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

# A lease outlives the HTTP timeout of its attempt by this much, so that a deliverer that is alive
# records its answer (or its timeout) before another process may take the task over.
LEASE_GRACE_SECONDS = 2.0
# How often a server process looks for tasks to deliver while it delivers none: one indexed SQLite
# read of about 13 us, off every request's path (0.01 % of a core). It is also how long the other
# processes of a server may take to join the delivery of a run one of them enqueued: a warm run of
# 1,000 students takes well under a second.
WATCH_SECONDS = 0.1
# Delivery threads stop after this long without anything to deliver (the watcher restarts them).
IDLE_SECONDS = 2.0


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
    """A queue in the embedded database, delivered over local HTTP by whichever process is alive to deliver it.

    Task states: pending (waiting for its next attempt, or under way), done (answered 2xx), failed
    (attempts used up). An attempt counts when it starts and holds a lease on its task for the
    dispatch deadline (`request_timeout_seconds`, also its HTTP timeout) plus LEASE_GRACE_SECONDS.
    A deliverer that dies with its attempt leaves the lease to run out; then any process takes the
    task again, as Cloud Tasks retries an attempt that outlived its dispatch deadline.

    Delivery threads start on enqueue and stop once nothing unleased is pending. A server process
    also calls `keep_delivering`: a watcher thread that looks for due tasks every WATCH_SECONDS and
    starts delivery threads when it finds one, so a run goes on whichever of its processes dies.
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
        self._watcher: threading.Thread | None = None
        self._threads_lock = threading.Lock()
        self._stopping = threading.Event()
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
        """Makes sure delivery threads run in this process (unless it stopped delivering)."""
        with self._threads_lock:
            if self._stopping.is_set():
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.concurrency:
                thread = threading.Thread(target=self._deliver_loop, name="local-task-delivery", daemon=True)
                thread.start()
                self._threads.append(thread)

    def keep_delivering(self, watch_seconds: float = WATCH_SECONDS) -> None:
        """Makes this process deliver the queue's tasks, whoever enqueued them, for as long as it lives.

        A daemon thread checks every `watch_seconds` for a task that is due (or whose lease ran out)
        and starts delivery threads when one is. Threads do not survive a fork: a server calls this
        in each worker process, once that process is up.
        """
        with self._threads_lock:
            self._stopping.clear()
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._watcher = threading.Thread(
                target=self._watch, args=(watch_seconds,), name="local-task-watch", daemon=True
            )
            self._watcher.start()

    def stop_delivery(self) -> None:
        """Stops this process from starting attempts (a server shutting down). An attempt under way
        finishes, or, if the process exits first, is made again elsewhere once its lease has run out."""
        self._stopping.set()

    def _watch(self, watch_seconds: float) -> None:
        while not self._stopping.is_set():
            try:
                if self._has_due():
                    self.start_delivery()
            except Exception:  # a locked or unreadable database: look again at the next check
                log.warning("could not check the task queue", exc_info=True)
            self._stopping.wait(watch_seconds)

    def _deliver_loop(self) -> None:
        idle_since: float | None = None
        while not self._stopping.is_set():
            try:
                claimed = self._claim()
                if claimed is None:
                    # Tasks leased by a live attempt elsewhere are not waited for here: if that
                    # attempt's process dies, the watcher finds the task once its lease has run out.
                    if self._has_unleased():
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > IDLE_SECONDS:
                        return
                    time.sleep(0.05)
                    continue
            except Exception:  # the database is locked or unreadable: the watcher starts delivery again
                log.warning("task delivery stopped", exc_info=True)
                return
            idle_since = None
            self._deliver(*claimed)

    def _has_due(self) -> bool:
        now = time.time()
        return bool(
            self.db.query(
                "SELECT 1 FROM local_tasks WHERE state = 'pending' AND next_attempt_at <= ? AND lease_until <= ? LIMIT 1",
                (now, now),
            )
        )

    def _has_unleased(self) -> bool:
        return bool(
            self.db.query("SELECT 1 FROM local_tasks WHERE state = 'pending' AND lease_until <= ? LIMIT 1", (time.time(),))
        )

    def _claim(self) -> tuple[str, str, bytes, int, float] | None:
        """Starts an attempt at the next due task: returns its name, URL, body, earlier attempts and lease."""
        now = time.time()
        with self.db.transaction() as conn:
            while True:
                row = conn.execute(
                    "SELECT name, url, payload, attempts, lease_until FROM local_tasks "
                    "WHERE state = 'pending' AND next_attempt_at <= ? AND lease_until <= ? ORDER BY next_attempt_at LIMIT 1",
                    (now, now),
                ).fetchone()
                if row is None:
                    return None
                name, attempts = row["name"], int(row["attempts"])
                if row["lease_until"] > 0:
                    # The lease of an earlier attempt ran out unanswered: its deliverer died with it.
                    log.warning("task attempt lost", extra={"task": name, "attempts": attempts})
                    if attempts >= self.max_attempts:
                        conn.execute(
                            "UPDATE local_tasks SET state = 'failed', lease_until = 0, last_status = '0' WHERE name = ?",
                            (name,),
                        )
                        log.error("task failed after its last attempt", extra={"task": name, "attempts": attempts, "status": 0})
                        continue
                # The lease keeps other delivery threads (here or in other processes) off this task while it runs.
                lease = now + self.request_timeout + LEASE_GRACE_SECONDS
                conn.execute(
                    "UPDATE local_tasks SET attempts = attempts + 1, lease_until = ? WHERE name = ?", (lease, name)
                )
                return name, row["url"], row["payload"].encode(), attempts, lease

    def _deliver(self, name: str, url: str, body: bytes, attempts: int, lease: float) -> None:
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
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:  # nosec B310 # WORKER_URL: Settings admits http(s) only
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:  # refused, reset, or no answer within the dispatch deadline
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
            # Only while the lease is this attempt's: one that outlived it was taken over, and the newer attempt decides.
            updated = conn.execute(
                "UPDATE local_tasks SET state = ?, next_attempt_at = ?, lease_until = 0, last_status = ? "
                "WHERE name = ? AND lease_until = ?",
                (state, next_at, str(status), name, lease),
            ).rowcount
        if not updated:
            log.warning("task attempt outlived its lease", extra={"task": name, "status": status})
