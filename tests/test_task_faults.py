"""Task delivery when processes die or stop, on real servers over HTTP on 127.0.0.1.

A worker process SIGKILLed in the middle of a chunk, on the embedded queue (the chunk is delivered again
once its dispatch deadline has passed, by whichever process is alive) and on the Cloud Tasks emulator
(which retries at once); the process that enqueued a run killed while the run goes on; and a server
stopped with SIGTERM, which refuses new connections and finishes the requests in flight within 10 s.

A chunk is held in the middle by holding the database's write lock from the test: the worker reads and
scores the chunk, then waits at its first write (SQLite's busy timeout) until the lock is released, so
it is in flight for as long as the test needs whatever the machine's speed. Which process delivers or
serves what is read from the outside: the tasks' leases, the emulator's queue (it takes a task off while
delivering it), and the server's sockets (/proc).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest
import requests

from shared.batch import models_signature, serving_versions, task_name
from shared.errors import ConfigError
from shared.local_stack import LocalServer, ensure_demo_students, free_port
from shared.runs import Chunk, Run
from shared.services import Services
from shared.settings import Settings
from shared.sqlite import SqliteDatabase
from shared.tasks import LEASE_GRACE_SECONDS, LocalTaskQueue, Task
from tests.emulators.cloud_tasks import CloudTasksEmulator, cloud_tasks_emulator, new_queue_path  # noqa: F401
from tests.task_worker import Worker, worker  # noqa: F401 (worker is a fixture)

pytestmark = pytest.mark.integration

SKILLS = 7
# Far longer than any chunk here takes, and the shortest Cloud Tasks accepts; a dead process's task comes
# back within the test.
DEADLINE_SECONDS = 15
RUN_DEADLINE_SECONDS = 90  # bounds a run from dispatch to its last chunk
GRACE_SECONDS = 10  # what Cloud Run gives an instance between SIGTERM and SIGKILL

T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.02) -> T:
    """Returns probe()'s first truthy answer; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


def dispatch(server: LocalServer, run_id: str) -> dict[str, Any]:
    response = requests.post(f"{server.url}/tasks/nightly", json={"run_id": run_id, "full": True}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def run_status(server: LocalServer, run_id: str) -> dict[str, Any]:
    response = requests.get(f"{server.url}/api/v1/batch/runs/{run_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_run(server: LocalServer, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_DEADLINE_SECONDS
    while (run := run_status(server, run_id))["status"] == "running":
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still running after {RUN_DEADLINE_SECONDS} s: {run}\n{server.log()[-3000:]}")
        time.sleep(0.2)
    return run


def assert_stored_exactly_once(services: Services, run_id: str, students: int) -> None:
    """Every (student, skill) of the run has exactly one assessment: none lost, none duplicated."""
    [row] = services.database.query(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT student_id || '/' || skill) AS pairs, COUNT(DISTINCT student_id) AS ids "
        "FROM skill_assessments WHERE run_id = ?",
        (run_id,),
    )
    assert (row["n"], row["pairs"], row["ids"]) == (students * SKILLS, students * SKILLS, students)


def settled_tasks(queue: LocalTaskQueue, run_id: str, chunks: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The run's tasks once none is pending: the run finishes when its last chunk is recorded, a moment
    before that chunk's worker answers and the queue records the attempt."""

    def settled() -> list[dict[str, Any]] | None:
        tasks = [queue.task(task_name(run_id, chunk)) for chunk in range(chunks)]
        return [t for t in tasks if t is not None] if all(t is not None and t["state"] != "pending" for t in tasks) else None

    return wait_for(f"the tasks of {run_id} settled", settled, timeout)


@contextmanager
def write_lock(services: Services) -> Iterator[None]:
    """Holds the database's write lock: a chunk worker that reaches its first write waits there until the
    block ends (readers go on: the database is in WAL mode)."""
    conn = sqlite3.connect(services.database.path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def worker_lines(server: LocalServer) -> list[dict[str, Any]]:
    """The request log lines of the batch worker target, in the order they were written."""
    lines = (json.loads(line) for line in server.log().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("function") == "batch_worker"]


def fired(server: LocalServer) -> int:
    """How many times the dispatcher was called."""
    return sum(1 for line in server.log().splitlines() if '"function": "nightly"' in line)


def server_workers(server: LocalServer) -> list[int]:
    """The pids of the server's worker processes (the children of gunicorn's master)."""
    assert server.process is not None
    master = server.process.pid
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # the process ended meanwhile
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                children.append(int(entry.name))
    return sorted(children)


def tcp_connections(pid: int) -> list[tuple[int, int, str]]:
    """The process's IPv4 TCP sockets as (local port, remote port, state): 01 established, 0A listening."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:  # the process ended meanwhile
        return []
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            found.append((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[3]))
    return found


def delivering(server: LocalServer) -> list[int]:
    """The server's workers that have a task delivery open: a connection of theirs to the server's own port."""
    return [pid for pid in server_workers(server) if any(r == server.port and s == "01" for _, r, s in tcp_connections(pid))]


def serving(server: LocalServer) -> list[int]:
    """The server's workers that are answering a request: a connection they accepted on the server's port."""
    return [pid for pid in server_workers(server) if any(l == server.port and s == "01" for l, _, s in tcp_connections(pid))]


def kill(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


# -- the setting -------------------------------------------------------------------------------------------


def test_the_dispatch_deadline_defaults_to_cloud_tasks_default_and_takes_its_range() -> None:
    queue = "cloudtasks://projects/skills-test/locations/us-central1/queues/q"
    assert Settings.from_env({}).task_dispatch_deadline_seconds == 600
    assert Settings.from_env({"TASK_DISPATCH_DEADLINE_SECONDS": "3"}).task_dispatch_deadline_seconds == 3
    assert Settings.from_env({"TASK_QUEUE": queue, "TASK_DISPATCH_DEADLINE_SECONDS": "15"}).task_dispatch_deadline_seconds == 15
    for env in (
        {"TASK_QUEUE": queue, "TASK_DISPATCH_DEADLINE_SECONDS": "14"},  # below what Cloud Tasks accepts
        {"TASK_DISPATCH_DEADLINE_SECONDS": "1801"},
        {"TASK_DISPATCH_DEADLINE_SECONDS": "0"},
        {"TASK_DISPATCH_DEADLINE_SECONDS": "ten"},
    ):
        with pytest.raises(ConfigError, match="TASK_DISPATCH_DEADLINE_SECONDS"):
            Settings.from_env(env)


# -- the embedded queue: leases --------------------------------------------------------------------------


def test_a_task_whose_deliverer_died_is_delivered_again_by_another_process_once_its_lease_runs_out(
    tmp_path: Path, worker: Worker  # noqa: F811
) -> None:
    """The first queue claims the task and dies with it (it never delivers); a second, watching as a server
    process does, delivers it once the dispatch deadline and the lease's grace have passed, counting the
    lost attempt."""
    db_path = tmp_path / "tasks.sqlite3"
    dead = LocalTaskQueue(SqliteDatabase(db_path), request_timeout_seconds=1.0, concurrency=1)
    dead.stop_delivery()  # so that enqueueing starts no delivery thread: the claim below is the only attempt
    assert dead.enqueue(Task("orphan", worker.url, {"n": 1})) is True
    claimed = dead._claim()
    assert claimed is not None and claimed[0] == "orphan"
    claimed_at = time.time()

    alive = LocalTaskQueue(SqliteDatabase(db_path), request_timeout_seconds=1.0, concurrency=1)
    alive.keep_delivering(watch_seconds=0.1)
    try:
        [delivery] = worker.wait_for(1)
        redelivered_at = time.time()
        wait_for("the task done", lambda: (alive.task("orphan") or {}).get("state") == "done", 5)
    finally:
        alive.stop_delivery()

    assert redelivered_at - claimed_at >= 1.0 + LEASE_GRACE_SECONDS - 0.2  # not before the lease ran out
    assert delivery.headers["x-cloudtasks-taskretrycount"] == "1"  # the lost attempt counts
    task = alive.task("orphan")
    assert task is not None and (task["attempts"], task["last_status"], task["lease_until"]) == (2, "200", 0)


# -- the embedded queue: a real server -------------------------------------------------------------------


@pytest.fixture
def faults_env(env: dict[str, str]) -> dict[str, str]:
    env.update({"TASK_DISPATCH_DEADLINE_SECONDS": str(DEADLINE_SECONDS), "TASK_MIN_BACKOFF_SECONDS": "0.2", "LOG_LEVEL": "INFO"})
    return env


def test_a_worker_killed_in_the_middle_of_a_chunk_gets_it_delivered_again_after_the_dispatch_deadline(
    faults_env: dict[str, str], services: Services
) -> None:
    """One worker process delivers and scores; SIGKILLed mid-chunk, gunicorn starts another, which delivers the
    chunk left pending at once and the lost one once its lease has run out, nobody firing the run again."""
    students = 400
    ensure_demo_students(services, students)
    queue = services.tasks
    assert isinstance(queue, LocalTaskQueue)

    with LocalServer(faults_env, free_port(), workers=1) as server:
        [first_worker] = server_workers(server)
        assert dispatch(server, "killed-chunk") == {"run_id": "killed-chunk", "students": students, "tasks": 2}

        def in_flight() -> str | None:
            """The task the worker has taken: leased by its first attempt, and its request accepted."""
            rows = services.database.query(
                "SELECT name FROM local_tasks WHERE state = 'pending' AND lease_until > ? AND attempts = 1", (time.time(),)
            )
            return rows[0]["name"] if rows and serving(server) else None

        name = wait_for("a chunk in flight", in_flight, 30)
        with write_lock(services):
            time.sleep(0.5)  # the worker goes on reading and scoring the chunk, then waits at its first write
            kill([first_worker])
            killed_at = time.monotonic()
        run = services.runs.get("killed-chunk")
        assert run is not None and run.tasks_done == 0
        replacement = wait_for("a new worker", lambda: [p for p in server_workers(server) if p != first_worker], 20)

        # Until the lease runs out, nobody takes the lost chunk again (the other one is delivered meanwhile).
        time.sleep(max(0.0, killed_at + DEADLINE_SECONDS / 2 - time.monotonic()))
        task = queue.task(name)
        assert task is not None and (task["state"], task["attempts"]) == ("pending", 1), task

        status = wait_for_run(server, "killed-chunk")
        assert fired(server) == 1
        lines = worker_lines(server)
        alive = server_workers(server)

    assert alive == replacement
    assert status["status"] == "succeeded", status
    assert (status["students_scored"], status["students_failed"], status["tasks_done"]) == (students, 0, 2)
    assert_stored_exactly_once(services, "killed-chunk", students)
    tasks = {t["name"]: (t["state"], t["attempts"]) for t in settled_tasks(queue, "killed-chunk", 2)}
    assert tasks == {n: ("done", 2 if n == name else 1) for n in tasks}
    # The lost chunk was answered on its second attempt, the other on its first; the killed request never was.
    answered = sorted((line["task"], int(line["attempt"]), line["status"]) for line in lines)
    assert answered == sorted((n, 1 if n == name else 0, 200) for n in tasks)


def test_a_run_goes_on_when_the_process_that_enqueued_it_is_killed(
    faults_env: dict[str, str], services: Services
) -> None:
    """The defect this guards against: the run's tasks were delivered only by threads of the process that
    enqueued them, so killing it left the run `running` until someone fired it again."""
    students = 1000
    ensure_demo_students(services, students)
    queue = services.tasks
    assert isinstance(queue, LocalTaskQueue)

    with LocalServer(faults_env, free_port(), workers=2) as server:
        assert dispatch(server, "killed-enqueuer")["tasks"] == 5
        deliverers = wait_for("a worker delivering tasks", lambda: delivering(server), 10, every=0.005)
        kill(deliverers)
        assert run_status(server, "killed-enqueuer")["status"] == "running"

        run = wait_for_run(server, "killed-enqueuer")
        assert run["status"] == "succeeded", run
        assert (run["students_scored"], run["students_failed"]) == (students, 0)
        assert_stored_exactly_once(services, "killed-enqueuer", students)
        # A task whose deliverer died is delivered again once its lease has run out, even if another worker
        # scored its chunk meanwhile (the killed process only sent it): scored again, the chunk overwrites
        # the same assessments.
        tasks = settled_tasks(queue, "killed-enqueuer", 5, timeout=DEADLINE_SECONDS + LEASE_GRACE_SECONDS + 30)
        assert fired(server) == 1

    assert {t["state"] for t in tasks} == {"done"}
    assert_stored_exactly_once(services, "killed-enqueuer", students)


# -- the Cloud Tasks emulator ------------------------------------------------------------------------------


@pytest.fixture
def cloud_tasks_env(faults_env: dict[str, str], cloud_tasks_emulator: CloudTasksEmulator) -> dict[str, str]:  # noqa: F811
    port = free_port()
    queue = cloud_tasks_emulator.create_queue(new_queue_path("faults"))
    faults_env.update(
        {
            "PORT": str(port),
            "TASK_QUEUE": f"cloudtasks://{queue}",
            "CLOUD_TASKS_EMULATOR_HOST": cloud_tasks_emulator.host,
            "WORKER_URL": f"http://127.0.0.1:{port}/tasks/batch-worker",
        }
    )
    return faults_env


def test_each_cloud_task_carries_the_dispatch_deadline(
    cloud_tasks_emulator: CloudTasksEmulator,  # noqa: F811
) -> None:
    from shared.gcp.tasks import CloudTasksQueue

    path = cloud_tasks_emulator.create_queue(new_queue_path("deadline"), paused=True)
    queue = CloudTasksQueue(path, emulator_host=cloud_tasks_emulator.host, dispatch_deadline_seconds=45)
    try:
        assert queue.enqueue_many([Task(f"r-chunk-{i:06d}", "http://127.0.0.1:9/w", {"chunk": i}) for i in range(2)]) == 2
    finally:
        queue.close()

    tasks = cloud_tasks_emulator.list_tasks(path)
    assert [t.dispatch_deadline.total_seconds() for t in tasks] == [45.0, 45.0]


def test_the_cloud_tasks_emulator_delivers_again_a_chunk_whose_worker_was_killed(
    cloud_tasks_env: dict[str, str], services: Services, cloud_tasks_emulator: CloudTasksEmulator  # noqa: F811
) -> None:
    """The emulator ignores dispatch_deadline (it waits for an answer without a timeout), so this tests what
    it does do: the killed worker's connection drops, the emulator counts a failed attempt and delivers the
    task again at once, and the server's new worker scores it."""
    students = 400
    ensure_demo_students(services, students)
    path = cloud_tasks_env["TASK_QUEUE"].removeprefix("cloudtasks://")

    with LocalServer(cloud_tasks_env, int(cloud_tasks_env["PORT"]), workers=1) as server:
        [first_worker] = server_workers(server)
        assert dispatch(server, "emulated")["tasks"] == 2

        def in_flight() -> list[str] | None:
            """The tasks still waiting, once the emulator has taken one off to deliver it and the worker has it."""
            waiting = [t.name.rsplit("/", 1)[1] for t in cloud_tasks_emulator.list_tasks(path)]
            return waiting if len(waiting) == 1 and serving(server) else None

        # The emulator takes a task off its queue while it delivers it, one at a time.
        waiting = wait_for("a chunk in flight", in_flight, 30)
        with write_lock(services):
            time.sleep(0.5)  # the worker goes on reading and scoring the chunk, then waits at its first write
            kill([first_worker])
        [killed] = {task_name("emulated", chunk) for chunk in range(2)} - set(waiting)
        run = services.runs.get("emulated")
        assert run is not None and run.tasks_done == 0

        status = wait_for_run(server, "emulated")
        lines = worker_lines(server)

    assert status["status"] == "succeeded", status
    assert (status["students_scored"], status["students_failed"]) == (students, 0)
    assert_stored_exactly_once(services, "emulated", students)
    # Each chunk was answered once; the killed one on its second attempt, the other on its first.
    assert Counter(line["status"] for line in lines) == {200: 2}
    assert {line["task"]: int(line["attempt"]) for line in lines} == {
        task_name("emulated", chunk): int(task_name("emulated", chunk) == killed) for chunk in range(2)
    }


# -- SIGTERM ---------------------------------------------------------------------------------------------------


def post_chunks(server: LocalServer, run_id: str, chunks: list[Chunk]) -> tuple[list[threading.Thread], dict[int, Any]]:
    """POSTs each chunk to the worker target from a thread of its own; `answers` fills in as they come back."""
    answers: dict[int, Any] = {}

    def post(chunk: Chunk) -> None:
        try:
            response = requests.post(
                f"{server.url}/tasks/batch-worker",
                json={"run_id": run_id, "chunk": chunk.chunk, "student_ids": chunk.student_ids},
                timeout=60,
            )
            answers[chunk.chunk] = (response.status_code, response.json())
        except requests.RequestException as exc:
            answers[chunk.chunk] = exc

    threads = [threading.Thread(target=post, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    return threads, answers


def test_sigterm_refuses_new_connections_and_finishes_the_requests_in_flight_within_10_s(
    faults_env: dict[str, str], services: Services
) -> None:
    students = 200
    ensure_demo_students(services, students)
    ids = sorted(s.student_id for s in services.features.scan())
    chunks = [Chunk("sigterm", i, ids[i * 50 : (i + 1) * 50]) for i in range(4)]
    signature = models_signature(serving_versions(services))
    services.runs.create(Run("sigterm", True, signature, "2026-01-01T00:00:00Z", students, len(chunks)), chunks)

    with LocalServer(faults_env, free_port(), workers=2) as server:
        assert server.process is not None
        # Each worker scores a first chunk (loading its models and XGBoost): the lock makes the first worker
        # wait at its write, so that the second takes the other chunk.
        with write_lock(services):
            warm_up, warmed = post_chunks(server, "sigterm", chunks[:2])
            wait_for("a chunk in each worker", lambda: len(serving(server)) == 2, 30, every=0.005)
        for thread in warm_up:
            thread.join(timeout=60)
        assert [warmed[i] for i in (0, 1)] == [(200, {"scored": 50, "failed": 0})] * 2

        with write_lock(services):
            threads, answers = post_chunks(server, "sigterm", chunks[2:])
            wait_for("both chunks in flight", lambda: len(serving(server)) == 2, 30, every=0.005)
            server.process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_for("new connections refused", refused, 5, every=0.01)
            time.sleep(1.0)  # the server stays up, draining, while its requests wait
            assert answers == {} and server.process.poll() is None

        exit_code = server.process.wait(timeout=GRACE_SECONDS + 5)
        exited_after = time.monotonic() - stopped_at
        for thread in threads:
            thread.join(timeout=30)

    log = server.log()
    assert [answers.get(i) for i in (2, 3)] == [(200, {"scored": 50, "failed": 0})] * 2, log[-3000:]
    assert exit_code == 0, log[-3000:]
    assert exited_after < GRACE_SECONDS
    assert "Traceback" not in log  # no worker failed on the way out
    run = services.runs.get("sigterm")
    assert run is not None and run.status == "succeeded"
    assert_stored_exactly_once(services, "sigterm", students)
