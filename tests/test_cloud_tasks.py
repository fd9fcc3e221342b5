"""The Cloud Tasks queue against the real Cloud Tasks emulator, and the TaskQueue contract of enqueue_many on both queues.

What the emulator leaves out (task-name de-duplication, and a server that never answers) is checked
against CreateTaskStandIn, a gRPC server answering CreateTask as the Cloud Tasks API documents it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from shared.errors import ServiceError, StoreUnavailable
from shared.gcp.tasks import CALL_TIMEOUT_SECONDS, MAX_TASK_BYTES, CloudTasksQueue
from shared.local_stack import free_port
from shared.sqlite import SqliteDatabase
from shared.tasks import LocalTaskQueue, Task, TaskQueue
from tests.emulators.cloud_tasks import (  # noqa: F401 (cloud_tasks_emulator is a fixture)
    CloudTasksEmulator,
    CreateTaskStandIn,
    cloud_tasks_emulator,
    new_queue_path,
)
from tests.task_worker import DEADLINE_SECONDS, Worker, worker  # noqa: F401 (worker is a fixture)

pytestmark = pytest.mark.integration

SERVICE_ACCOUNT = "tasks-invoker@skills-test.iam.gserviceaccount.com"
AUDIENCE = "https://batch-worker.example.run.app"


# -- a worker the emulator delivers to --------------------------------------------------------------


def chunk_task(run_id: str, chunk: int, url: str = "http://127.0.0.1:9/tasks/batch-worker", students: int = 3) -> Task:
    ids = [f"student-{chunk:06d}-{i:04d}" for i in range(students)]
    return Task(f"{run_id}-chunk-{chunk:06d}", url, {"run_id": run_id, "chunk": chunk, "student_ids": ids})


def emulator_queue(emulator: CloudTasksEmulator, path: str, **options: Any) -> CloudTasksQueue:
    return CloudTasksQueue(path, emulator_host=emulator.host, **options)


# -- on the emulator -----------------------------------------------------------------------------------


def test_a_task_is_delivered_by_the_emulator_as_a_post_with_the_json_body_and_cloud_tasks_headers(
    cloud_tasks_emulator: CloudTasksEmulator, worker: Worker
) -> None:
    path = cloud_tasks_emulator.create_queue(new_queue_path("deliver"))
    queue = emulator_queue(cloud_tasks_emulator, path, service_account=SERVICE_ACCOUNT, audience=AUDIENCE)
    task = chunk_task("r1", 0, worker.url)

    assert queue.enqueue(task) is True

    [delivery] = worker.wait_for(1)
    assert (delivery.method, delivery.path, delivery.body) == ("POST", "/tasks/batch-worker", task.payload)
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-cloudtasks-taskname"] == "r1-chunk-000000"
    assert delivery.headers["x-cloudtasks-queuename"] == path
    assert delivery.headers["x-cloudtasks-taskretrycount"] == "0"
    queue.close()


def test_the_emulator_makes_three_attempts_at_a_failing_task_as_task_max_attempts_does(
    cloud_tasks_emulator: CloudTasksEmulator, worker: Worker
) -> None:
    """The fixture's `-r 2` matches TASK_MAX_ATTEMPTS=3 (the emulator retries at once, without backoff)."""
    worker.statuses = [503]
    path = cloud_tasks_emulator.create_queue(new_queue_path("retry"))
    queue = emulator_queue(cloud_tasks_emulator, path)

    queue.enqueue(chunk_task("r2", 0, worker.url))

    deliveries = worker.wait_for(3)
    time.sleep(0.5)  # time enough for a (wrong) fourth attempt
    assert [d.headers["x-cloudtasks-taskretrycount"] for d in worker.deliveries] == ["0", "1", "2"]
    assert all(d.body == deliveries[0].body for d in deliveries)
    queue.close()


def test_tasks_carry_the_deterministic_name_and_the_oidc_token(cloud_tasks_emulator: CloudTasksEmulator) -> None:
    """Read back with ListTasks on a paused queue, so nothing is delivered first (the emulator has no GetTask)."""
    path = cloud_tasks_emulator.create_queue(new_queue_path("oidc"), paused=True)
    queue = emulator_queue(cloud_tasks_emulator, path, service_account=SERVICE_ACCOUNT, audience=AUDIENCE)
    tasks = [chunk_task("nightly-20240612", i, "https://worker.example/tasks/batch-worker") for i in range(3)]

    assert queue.enqueue_many(tasks) == 3

    stored = {t.name: t for t in cloud_tasks_emulator.list_tasks(path)}
    assert sorted(stored) == [f"{path}/tasks/nightly-20240612-chunk-{i:06d}" for i in range(3)]
    for task in tasks:
        request = stored[f"{path}/tasks/{task.name}"].http_request
        assert request.url == "https://worker.example/tasks/batch-worker"
        assert request.http_method.name == "POST"
        assert request.headers["Content-Type"] == "application/json"
        assert json.loads(request.body) == task.payload
        assert request.oidc_token.service_account_email == SERVICE_ACCOUNT
        assert request.oidc_token.audience == AUDIENCE
    queue.close()


def test_without_a_service_account_a_task_has_no_token_and_the_audience_defaults_to_its_url(
    cloud_tasks_emulator: CloudTasksEmulator,
) -> None:
    path = cloud_tasks_emulator.create_queue(new_queue_path("no-oidc"), paused=True)
    plain = emulator_queue(cloud_tasks_emulator, path)
    no_audience = emulator_queue(cloud_tasks_emulator, path, service_account=SERVICE_ACCOUNT)

    plain.enqueue(Task("plain", "https://worker.example/a", {}))
    no_audience.enqueue(Task("url-audience", "https://worker.example/b", {}))

    stored = {t.name.rsplit("/", 1)[-1]: t.http_request for t in cloud_tasks_emulator.list_tasks(path)}
    assert "oidc_token" not in stored["plain"]
    assert stored["url-audience"].oidc_token.audience == "https://worker.example/b"
    plain.close()
    no_audience.close()


def test_enqueue_many_creates_a_thousand_tasks_in_parallel(cloud_tasks_emulator: CloudTasksEmulator) -> None:
    path = cloud_tasks_emulator.create_queue(new_queue_path("many"), paused=True)
    queue = emulator_queue(cloud_tasks_emulator, path)
    tasks = [chunk_task("big-run", i, students=20) for i in range(1000)]

    assert queue.enqueue_many(tasks) == 1000

    names = sorted(t.name.rsplit("/", 1)[-1] for t in cloud_tasks_emulator.list_tasks(path))
    assert names == [t.name for t in tasks]
    queue.close()


def test_a_task_over_the_size_limit_is_refused_before_any_call_naming_batch_chunk_size(
    cloud_tasks_emulator: CloudTasksEmulator,
) -> None:
    path = cloud_tasks_emulator.create_queue(new_queue_path("big"), paused=True)
    queue = emulator_queue(cloud_tasks_emulator, path)
    fits = chunk_task("r3", 0, students=10)
    too_big = chunk_task("r3", 1, students=MAX_TASK_BYTES // 20)  # ~25 bytes per id: well over the limit

    with pytest.raises(ServiceError) as raised:
        queue.enqueue_many([fits, too_big])

    assert "BATCH_CHUNK_SIZE" in raised.value.message
    assert raised.value.details["task"] == "r3-chunk-000001"
    assert raised.value.details["bytes"] > MAX_TASK_BYTES
    assert cloud_tasks_emulator.list_tasks(path) == []  # not even the task that fits was sent
    queue.close()


# -- what the emulator leaves out: de-duplication, unreachable or silent servers -----------------------


def test_already_exists_is_taken_as_already_enqueued() -> None:
    """The API answers ALREADY_EXISTS to a CreateTask naming an existing or recently executed task (the
    CreateTaskRequest reference: "Task De-duplication"). The emulator appends every task whatever its
    name, so this runs against CreateTaskStandIn, which answers as the API documents."""
    with CreateTaskStandIn() as api:
        queue = CloudTasksQueue(new_queue_path("dedup"), emulator_host=api.host)
        first = [chunk_task("r4", i) for i in range(5)]

        assert queue.enqueue(first[0]) is True
        assert queue.enqueue(first[0]) is False
        assert queue.enqueue_many(first + [chunk_task("r4", 5)]) == 5  # chunks 1-5 new, chunk 0 known
        assert queue.enqueue_many(first) == 0
        assert len(api.tasks) == 6
        queue.close()


def test_a_name_repeated_within_one_batch_is_sent_once() -> None:
    with CreateTaskStandIn() as api:
        queue = CloudTasksQueue(new_queue_path("repeat"), emulator_host=api.host)
        task = chunk_task("r5", 0)

        assert queue.enqueue_many([task, task, chunk_task("r5", 1), task]) == 2
        assert api.calls == 2
        queue.close()


def test_enqueue_many_keeps_enqueue_width_calls_in_flight() -> None:
    with CreateTaskStandIn(latency_seconds=0.05) as api:
        queue = CloudTasksQueue(new_queue_path("width"), emulator_host=api.host, enqueue_width=8)
        tasks = [chunk_task("r6", i) for i in range(64)]

        assert queue.enqueue_many(tasks) == 64

        # Each call takes 50 ms on the server, so calls overlap only if they are sent in parallel.
        assert api.max_in_flight == 8 and api.calls == 64
        queue.close()


def test_a_transient_unavailable_is_retried() -> None:
    with CreateTaskStandIn(unavailable_first=2) as api:
        queue = CloudTasksQueue(new_queue_path("blip"), emulator_host=api.host)

        assert queue.enqueue(chunk_task("r7", 0)) is True
        assert api.calls == 3
        queue.close()


def test_an_unreachable_queue_raises_store_unavailable_within_the_retry_window() -> None:
    """Connection refused is UNAVAILABLE, retried for RETRY_SECONDS, then StoreUnavailable (the dispatcher
    answers 503 and Cloud Scheduler retries)."""
    queue = CloudTasksQueue(new_queue_path("nobody"), emulator_host=f"127.0.0.1:{free_port()}")

    with pytest.raises(StoreUnavailable) as raised:
        queue.enqueue_many([chunk_task("r8", i) for i in range(200)])

    assert "Cloud Tasks" in raised.value.message, raised.value.message
    queue.close()


def test_a_server_that_never_answers_raises_store_unavailable_at_the_call_deadline() -> None:
    """Each CreateTask has a deadline (CALL_TIMEOUT_SECONDS, 10 s in production; 0.5 s here)."""
    assert CALL_TIMEOUT_SECONDS <= 10
    with CreateTaskStandIn(hang=True) as api:
        queue = CloudTasksQueue(new_queue_path("silent"), emulator_host=api.host, timeout_seconds=0.5)

        with pytest.raises(StoreUnavailable) as raised:
            queue.enqueue(chunk_task("r9", 0))

        # The deadline travels with the call (gRPC sends it): the server saw at most 0.5 s left.
        assert api.deadlines and all(d is not None and 0 < d <= 0.5 for d in api.deadlines), api.deadlines
        assert "Deadline" in raised.value.message or "DEADLINE" in raised.value.message, raised.value.message
        queue.close()


def test_an_invalid_task_name_raises_value_error_before_any_call() -> None:
    with CreateTaskStandIn() as api:
        queue = CloudTasksQueue(new_queue_path("names"), emulator_host=api.host)

        with pytest.raises(ValueError):
            queue.enqueue_many([chunk_task("r10", 0), Task("slash/name", "http://127.0.0.1:9/", {})])
        assert api.calls == 0
        queue.close()


def test_one_client_per_queue_built_once_under_concurrent_first_use() -> None:
    with CreateTaskStandIn() as api:
        queue = CloudTasksQueue(new_queue_path("lazy"), emulator_host=api.host)
        assert queue._client is None  # nothing is built or connected before the first call
        barrier = threading.Barrier(8)
        clients: list[Any] = []

        def first_use() -> None:
            barrier.wait()
            clients.append(queue._get_client())

        threads = [threading.Thread(target=first_use) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len({id(c) for c in clients}) == 1
        queue.close()


# -- the enqueue_many contract, on the embedded queue and on Cloud Tasks (the stand-in) ----------------


@pytest.fixture(params=["local", "cloudtasks"])
def any_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TaskQueue, Callable[[], int]]]:
    """A queue of each implementation, with a function counting the tasks it holds."""
    if request.param == "local":
        # Nobody listens at the tasks' URL and one attempt is all they get: delivery marks them failed, which still counts.
        local = LocalTaskQueue(SqliteDatabase(tmp_path / "tasks.sqlite3"), max_attempts=1, request_timeout_seconds=1.0)
        yield local, lambda: sum(local.counts().values())
        return
    with CreateTaskStandIn() as api:
        cloud = CloudTasksQueue(new_queue_path("contract"), emulator_host=api.host)
        yield cloud, lambda: len(api.tasks)
        cloud.close()


def test_enqueue_many_returns_how_many_were_new_and_dedups_by_name(any_queue: tuple[TaskQueue, Callable[[], int]]) -> None:
    queue, held = any_queue
    url = f"http://127.0.0.1:{free_port()}/tasks/batch-worker"
    batch = [chunk_task("c1", i, url) for i in range(4)]

    assert queue.enqueue_many(batch) == 4
    assert queue.enqueue_many(batch[2:] + [chunk_task("c1", 4, url), chunk_task("c1", 4, url)]) == 1
    assert queue.enqueue(batch[0]) is False
    assert queue.enqueue_many([]) == 0
    assert held() == 5


def test_enqueue_many_with_an_invalid_name_adds_nothing(any_queue: tuple[TaskQueue, Callable[[], int]]) -> None:
    queue, held = any_queue

    with pytest.raises(ValueError):
        queue.enqueue_many([chunk_task("c2", 0), Task("has space", "http://127.0.0.1:9/", {})])

    assert held() == 0


def test_local_enqueue_many_delivers_every_new_task_once(tmp_path: Path, worker: Worker) -> None:
    queue = LocalTaskQueue(SqliteDatabase(tmp_path / "tasks.sqlite3"), min_backoff_seconds=0.05, request_timeout_seconds=5.0)
    tasks = [chunk_task("c3", i, worker.url) for i in range(10)]

    assert queue.enqueue_many(tasks + tasks[:3]) == 10

    deliveries = worker.wait_for(10)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while queue.counts() != {"done": 10} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert queue.counts() == {"done": 10}
    assert sorted(d.headers["x-cloudtasks-taskname"] for d in deliveries) == [t.name for t in tasks]
