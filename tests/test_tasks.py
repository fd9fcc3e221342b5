"""The local task queue against a real HTTP worker on 127.0.0.1: headers, retries with backoff, dedup by name."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from shared.local_stack import free_port
from shared.sqlite import SqliteDatabase
from shared.tasks import LocalTaskQueue, Task
from tests.task_worker import DEADLINE_SECONDS, Worker, worker  # noqa: F401 (worker is a fixture)

QUEUE = "test-queue"


def make_queue(tmp_path: Path, **options: Any) -> LocalTaskQueue:
    defaults = {"queue_name": QUEUE, "max_attempts": 3, "min_backoff_seconds": 0.05, "request_timeout_seconds": 5.0}
    options = {**defaults, **options}
    return LocalTaskQueue(SqliteDatabase(tmp_path / "tasks.sqlite3"), **options)


def wait_until_settled(queue: LocalTaskQueue) -> dict[str, int]:
    """Polls until no task is pending; returns the counts per state."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        counts = queue.counts()
        if not counts.get("pending"):
            return counts
        time.sleep(0.02)
    raise AssertionError(f"tasks still pending after {DEADLINE_SECONDS} s: {queue.counts()}")


def test_delivers_a_post_with_the_json_payload_and_cloud_tasks_headers(tmp_path: Path, worker: Worker) -> None:
    queue = make_queue(tmp_path)
    payload = {"run_id": "r1", "chunk": 0, "student_ids": ["a", "b"]}

    assert queue.enqueue(Task("r1-chunk-000000", worker.url, payload)) is True
    assert wait_until_settled(queue) == {"done": 1}

    [delivery] = worker.received("r1-chunk-000000")
    assert (delivery.method, delivery.path, delivery.body) == ("POST", "/tasks/batch-worker", payload)
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-cloudtasks-queuename"] == QUEUE
    assert delivery.headers["x-cloudtasks-taskretrycount"] == "0"
    task = queue.task("r1-chunk-000000")
    assert task is not None
    assert (task["state"], task["attempts"], task["last_status"]) == ("done", 1, "200")


def test_a_503_is_retried_once_then_done(tmp_path: Path, worker: Worker) -> None:
    worker.statuses = [503, 200]
    queue = make_queue(tmp_path)

    queue.enqueue(Task("retry-me", worker.url, {"n": 1}))

    assert wait_until_settled(queue) == {"done": 1}
    deliveries = worker.received("retry-me")
    assert [d.headers["x-cloudtasks-taskretrycount"] for d in deliveries] == ["0", "1"]
    assert [d.body for d in deliveries] == [{"n": 1}, {"n": 1}]
    task = queue.task("retry-me")
    assert task is not None
    assert (task["state"], task["attempts"], task["last_status"]) == ("done", 2, "200")


def test_a_task_that_always_fails_is_delivered_max_attempts_times_with_growing_backoff(
    tmp_path: Path, worker: Worker
) -> None:
    worker.statuses = [500]
    queue = make_queue(tmp_path, max_attempts=3, min_backoff_seconds=0.1)

    queue.enqueue(Task("always-fails", worker.url, {}))

    assert wait_until_settled(queue) == {"failed": 1}
    deliveries = worker.received("always-fails")
    assert [d.headers["x-cloudtasks-taskretrycount"] for d in deliveries] == ["0", "1", "2"]
    first_gap, second_gap = (b.at - a.at for a, b in zip(deliveries, deliveries[1:]))
    assert 0 < first_gap < second_gap  # an ordering check: 0.1 s then 0.2 s of backoff
    task = queue.task("always-fails")
    assert task is not None
    assert (task["state"], task["attempts"], task["last_status"]) == ("failed", 3, "500")
    time.sleep(0.2)
    assert len(worker.received("always-fails")) == 3  # nothing more after the last attempt


def test_an_unreachable_worker_uses_up_the_attempts(tmp_path: Path) -> None:
    queue = make_queue(tmp_path, max_attempts=2, request_timeout_seconds=2.0)

    queue.enqueue(Task("nobody-home", f"http://127.0.0.1:{free_port()}/tasks/batch-worker", {}))

    assert wait_until_settled(queue) == {"failed": 1}
    task = queue.task("nobody-home")
    assert task is not None
    assert (task["attempts"], task["last_status"]) == (2, "0")


def test_enqueueing_an_existing_name_returns_false_and_sends_nothing_new(tmp_path: Path, worker: Worker) -> None:
    queue = make_queue(tmp_path)
    assert queue.enqueue(Task("once", worker.url, {"v": 1})) is True
    wait_until_settled(queue)

    assert queue.enqueue(Task("once", worker.url, {"v": 2})) is False

    time.sleep(0.3)  # time enough for a (wrong) second delivery to arrive
    assert [d.body for d in worker.received("once")] == [{"v": 1}]
    assert queue.counts() == {"done": 1}


def test_many_tasks_are_each_delivered_once(tmp_path: Path, worker: Worker) -> None:
    queue = make_queue(tmp_path, concurrency=2)
    names = [f"run-chunk-{i:06d}" for i in range(12)]

    assert all(queue.enqueue(Task(name, worker.url, {"name": name})) for name in names)

    assert wait_until_settled(queue) == {"done": 12}
    assert sorted(d.headers["x-cloudtasks-taskname"] for d in worker.deliveries) == names


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "dot.name", "x" * 501])
def test_an_invalid_task_name_raises_value_error(tmp_path: Path, name: str) -> None:
    queue = make_queue(tmp_path)
    with pytest.raises(ValueError):
        queue.enqueue(Task(name, "http://127.0.0.1:9/none", {}))
    assert queue.counts() == {}
