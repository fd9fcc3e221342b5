"""Faults the service survives, each staged on the real local servers that stand in for Google Cloud: Firestore
restarted in the middle of a nightly run, Cloud Storage down when a new model version is to be loaded, and
Cloud Tasks down when the nightly run is dispatched."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from shared.batch import task_name
from shared.catalog import SkillCatalog
from shared.errors import StoreUnavailable
from shared.gcp.firestore import FirestoreRegistryBackend
from shared.gcp.storage import DOWNLOAD_RETRY_SECONDS
from shared.local_stack import LocalServer, ensure_demo_models, ensure_demo_students, free_port
from shared.publishing import publish_version
from shared.registry import ModelVersion, StageChange
from shared.services import Services
from shared.settings import Settings
from tests.emulators import emulator_missing
from tests.emulators.cloud_tasks import CloudTasksEmulator, cloud_tasks_emulator, new_queue_path  # noqa: F401
from tests.emulators.firestore import (  # noqa: F401
    EmulatorNotInstalled,
    FirestoreEmulator,
    firestore_database,
    firestore_emulator,
    firestore_session_database,
)
from tests.emulators.relay import TcpRelay
from tests.emulators.storage import GcsLocation, StorageEmulator, gcs_location, storage_emulator  # noqa: F401
from tests.openapi_contract import assert_matches_spec

pytestmark = pytest.mark.integration

SKILL = "leadership"
STUDENTS = 600
CHUNK_SIZE = 100
# The longest a test waits for anything (a run to finish, a model to load); the tests themselves take
# well under a minute and a half each.
WAIT_SECONDS = 60.0


def _request(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """Returns (status, headers, JSON body) of a request; an error status is an answer, not an exception."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def _wait_for_run(server: LocalServer, run_id: str, done: int | None = None) -> dict[str, Any]:
    """Polls the run until it finishes (or until `done` of its tasks are done); returns its status."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        status, _, run = _request("GET", f"{server.url}/api/v1/batch/runs/{run_id}")
        assert status == 200, run
        if run["status"] != "running" or (done is not None and run["tasks_done"] >= done):
            return run
        assert time.monotonic() < deadline, (run, server.log()[-3000:])
        time.sleep(0.1)


def _log_lines(server: LocalServer, function: str) -> list[dict[str, Any]]:
    """The request log lines of one function target."""
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{") and f'"function": "{function}"' in line:
            lines.append(json.loads(line))
    return lines


def _assessed_pairs(services: Services, run_id: str) -> Counter[tuple[str, str]]:
    """How many assessment documents the run has per (student, skill), read straight from Firestore."""
    from google.cloud.firestore_v1.base_query import FieldFilter

    query = services.firestore.client.collection("skill_assessments").where(filter=FieldFilter("run_id", "==", run_id))
    return Counter((doc.get("student_id"), doc.get("skill")) for doc in query.select(["student_id", "skill"]).stream())


@pytest.fixture
def own_firestore() -> Iterator[FirestoreEmulator]:
    """A Firestore emulator of this test's own (the session's is shared, and this one gets restarted)."""
    emulator = FirestoreEmulator()
    try:
        emulator.start()
    except EmulatorNotInstalled as missing:
        emulator_missing(missing.what, missing.how_to_install)
    try:
        yield emulator
    finally:
        emulator.stop()


def _gcp_env(port: int, firestore_host: str, storage_url: str, gcs: GcsLocation, queue: str, tasks_host: str, tmp_path: Path) -> dict[str, str]:
    return {
        "PORT": str(port),
        "ARTIFACT_STORE": gcs.uri,
        "ARTIFACT_CACHE_DIR": str(tmp_path / "artifact-cache"),
        "DATABASE_URL": "firestore://demo-skills/(default)",
        "FIRESTORE_EMULATOR_HOST": firestore_host,
        "STORAGE_EMULATOR_HOST": storage_url,
        "TASK_QUEUE": f"cloudtasks://{queue}",
        "CLOUD_TASKS_EMULATOR_HOST": tasks_host,
        "WORKER_URL": f"http://127.0.0.1:{port}/tasks/batch-worker",
        "BATCH_CHUNK_SIZE": str(CHUNK_SIZE),
        "METRICS": "off",
        "LOG_LEVEL": "INFO",
    }


# -- Firestore restarted in the middle of a nightly run ---------------------------------------------------

FIRESTORE_OUTAGE_SECONDS = 8.0


def test_firestore_restarted_in_the_middle_of_a_nightly_run_loses_and_duplicates_no_assessment(
    own_firestore: FirestoreEmulator,
    storage_emulator: StorageEmulator,  # noqa: F811
    gcs_location: GcsLocation,  # noqa: F811
    cloud_tasks_emulator: CloudTasksEmulator,  # noqa: F811
    trained_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Firestore goes away while chunks are being scored, and comes back on the same address with every
    document it had committed: the run finishes with one assessment per (student, skill), none lost, none
    twice, and no worker answers anything the queue would not retry.

    How the outage is staged, and why: the emulator keeps documents in memory only, so a plain restart
    would come back empty, a loss real Firestore never has, and the test would then measure the harness.
    The emulator is therefore restarted with its own export (its documented export endpoint, then
    `--import-data` at the start). The service reaches it through a TCP relay that is cut first (every
    connection reset, the port refusing connections) and restored once the emulator is back, so no write
    can land between the export and the stop and be lost by the harness rather than by the service.
    Freezing the process (SIGSTOP) would keep the state too, but the service would see calls hang rather
    than connections refused and reset, which is not what a restart looks like.
    """
    with TcpRelay(own_firestore.port) as relay:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", relay.address)
        port = free_port()
        queue = cloud_tasks_emulator.create_queue(new_queue_path("fs-restart"))
        env = _gcp_env(port, relay.address, storage_emulator.url, gcs_location, queue, cloud_tasks_emulator.host, tmp_path)
        services = Services(Settings.from_env(env))
        ensure_demo_models(services, trained_dir)
        assert ensure_demo_students(services, count=STUDENTS, seed=23) == STUDENTS
        chunks = STUDENTS // CHUNK_SIZE

        with LocalServer(env, port, workers=2) as server:
            status, _, body = _request("POST", f"{server.url}/tasks/nightly", {"full": True, "run_id": "fs-restart"})
            assert (status, body) == (202, {"run_id": "fs-restart", "students": STUDENTS, "tasks": chunks})
            assert _wait_for_run(server, "fs-restart", done=2)["status"] == "running"

            cut_at = time.monotonic()
            relay.cut()
            own_firestore.restart()
            time.sleep(max(0.0, FIRESTORE_OUTAGE_SECONDS - (time.monotonic() - cut_at)))
            relay.restore()

            run = _wait_for_run(server, "fs-restart")
            log = server.log()
        pairs = _assessed_pairs(services, "fs-restart")

    assert run["status"] == "succeeded", (run, log[-3000:])
    assert (run["students_scored"], run["students_failed"], run["tasks_done"]) == (STUDENTS, 0, chunks)
    assert len(pairs) == STUDENTS * len(services.catalog.names)
    assert set(pairs.values()) == {1}
    # Every chunk was scored once to the end; an attempt that met the outage answered 503 store_unavailable,
    # which the queue retries, never a 500 (whose traceback would say the failure was not understood).
    answers = _log_lines(server, "batch_worker")
    assert Counter(line["status"] for line in answers if line["status"] == 200) == {200: chunks}
    assert all(line["status"] == 200 or (line["status"], line.get("error_code")) == (503, "store_unavailable") for line in answers), answers
    assert "unhandled error" not in log


def test_a_transaction_that_outlives_a_firestore_restart_is_store_unavailable_and_writes_nothing(
    own_firestore: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restarted server no longer knows the transaction, so the commit fails, and so does the rollback
    the client then attempts: "Transaction is invalid or expired" (INVALID_ARGUMENT). Retried in a new
    transaction the change succeeds, so it must be a 503 the caller retries, not a 500."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own_firestore.host)
    backend = FirestoreRegistryBackend(own_firestore.database())
    backend.insert(_model_version())
    restarted: list[bool] = []

    def promote_across_a_restart(stored: list[ModelVersion]) -> dict[str, StageChange]:
        if not restarted:
            own_firestore.restart()
            restarted.append(True)
        return {"1.0.0": StageChange("production", 1.0, "2026-01-02T00:00:00.000Z", 1)}

    with pytest.raises(StoreUnavailable, match="Firestore is unavailable"):
        backend.update(SKILL, promote_across_a_restart)
    assert [(v.version, v.stage) for v in backend.list(SKILL)] == [("1.0.0", "staging")]
    backend.update(SKILL, promote_across_a_restart)  # the caller's retry
    assert [(v.version, v.stage) for v in backend.list(SKILL)] == [("1.0.0", "production")]


def _model_version() -> ModelVersion:
    return ModelVersion(
        skill=SKILL, version="1.0.0", stage="staging", traffic=0.0, created_at="2026-01-01T00:00:00.000Z",
        trained_at="2026-01-01T00:00:00.000Z", metrics={}, artifact_uri=f"gs://models/{SKILL}/1.0.0/", sha256="ab" * 32,
    )


# -- Cloud Storage down when a new model version is to be loaded -------------------------------------------


def _infer(server: LocalServer, catalog: SkillCatalog) -> tuple[int, Any]:
    """Scores one student on SKILL; returns (status, body)."""
    body = {"student_id": "student-001", "skill": SKILL, "features": {f.name: f.default for f in catalog.skill(SKILL).features}}
    status, _, answer = _request("POST", f"{server.url}/api/v1/skills/infer", body)
    return status, answer


def test_cloud_storage_down_at_a_model_refresh_keeps_the_loaded_model_serving_and_healthz_says_why(
    trained_dir: Path, catalog: SkillCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new production version is promoted while Cloud Storage cannot be reached: the process keeps serving
    the version it has, /healthz names the skill, the version that could not be loaded and why, and once
    Cloud Storage is back the new version is loaded and /healthz is ok again.

    The storage emulator (in this process) stops listening and serves the same objects on the same port
    again, as Cloud Storage keeps them through an outage. One worker: a process that never loaded the
    skill has no version to keep serving (it answers 503 model_unavailable for it until storage is back).
    """
    with StorageEmulator() as storage:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage.url)
        port = free_port()
        env = {
            "PORT": str(port),
            "ARTIFACT_STORE": f"gs://{storage.bucket}/refresh",
            "ARTIFACT_CACHE_DIR": str(tmp_path / "artifact-cache"),
            "STORAGE_EMULATOR_HOST": storage.url,
            "DATABASE_URL": str(tmp_path / "skills.sqlite3"),
            "MODEL_REFRESH_SECONDS": "1",
            "METRICS": "off",
            "LOG_LEVEL": "INFO",
        }
        services = Services(Settings.from_env(env))
        ensure_demo_models(services, trained_dir)
        # Published while storage is up, promoted while it is down: its metadata.json (stamped with the
        # version) is in no cache, so loading it needs Cloud Storage.
        new = publish_version(services.registry, services.artifacts, trained_dir / SKILL, force=True)

        with LocalServer(env, port, workers=1) as server:
            status, answer = _infer(server, catalog)
            assert (status, answer["model_version"]) == (200, "1.0.0"), answer

            storage.interrupt()
            services.registry.promote(SKILL, new.version)
            time.sleep(1.5)  # past the refresh interval: the next request loads the new version, and fails
            logged_before = len(server.log())
            during = [_infer(server, catalog) for _ in range(5)]
            failed_loads = server.log()[logged_before:].count("model failed to load")
            status, _, health = _request("GET", f"{server.url}/healthz")

            storage.resume()
            deadline = time.monotonic() + WAIT_SECONDS
            while (after := _request("GET", f"{server.url}/healthz"))[2].get("status") != "ok":
                assert time.monotonic() < deadline, after
                time.sleep(0.2)
            recovered = _infer(server, catalog)
            log = server.log()

    assert [(s, a["model_version"]) for s, a in during] == [(200, "1.0.0")] * 5, during
    # One request tried the new version, and gave up at the download deadline rather than the client's
    # two minutes; the ones after it did not try again (the next attempt is backed off).
    assert failed_loads == 1, failed_loads

    # Every skill is still served: 200 "degraded", so a probe keeps the instance, and the reason is named.
    assert status == 200 and health["status"] == "degraded", health
    assert health["models"] == {skill: "1.0.0" for skill in catalog.names}
    reason = health["refresh_problems"][SKILL]
    assert f"version {new.version} failed to load" in reason, reason
    assert "Cloud Storage could not download" in reason and "metadata.json" in reason, reason
    assert f"Timeout of {DOWNLOAD_RETRY_SECONDS}s exceeded" in reason, reason
    assert "version 1.0.0 keeps serving" in reason, reason
    assert list(health["refresh_problems"]) == [SKILL] and "problems" not in health
    assert_matches_spec("GET", "/healthz", 200, health)

    assert after[2] == {"status": "ok", "models": {**{skill: "1.0.0" for skill in catalog.names}, SKILL: new.version}}
    assert_matches_spec("GET", "/healthz", 200, after[2])
    assert (recovered[0], recovered[1]["model_version"]) == (200, new.version)
    assert "unhandled error" not in log


# -- Cloud Tasks down when the nightly run is dispatched ----------------------------------------------------


def test_cloud_tasks_down_at_dispatch_answers_503_and_firing_again_enqueues_each_chunk_once(
    firestore_emulator: FirestoreEmulator,  # noqa: F811
    firestore_database: object,  # noqa: F811  (empties the database for this test)
    storage_emulator: StorageEmulator,  # noqa: F811
    gcs_location: GcsLocation,  # noqa: F811
    trained_dir: Path,
    tmp_path: Path,
) -> None:
    """Cloud Scheduler fires the nightly run while Cloud Tasks cannot be reached: the dispatcher answers 503
    store_unavailable (Cloud Scheduler retries), with the run recorded and nothing enqueued. Fired again once
    Cloud Tasks is back, it enqueues every chunk exactly once, and the run completes once: a third firing
    enqueues nothing.

    The emulator (a process of this test's own) is stopped and started again on the same port. It keeps
    queues in memory only, so the queue is declared again after the restart, as it would still exist on
    Cloud Tasks; nothing else was in it. The queue is paused until the tasks have been counted, so that
    what the second firing enqueued is read before any of it is delivered.
    """
    if not CloudTasksEmulator.installed():
        emulator_missing("the Cloud Tasks emulator", "run `make emulators`")
    tasks = CloudTasksEmulator().start()
    try:
        queue = tasks.create_queue(new_queue_path("dispatch"), paused=True)
        port = free_port()
        env = _gcp_env(port, firestore_emulator.host, storage_emulator.url, gcs_location, queue, tasks.host, tmp_path)
        services = Services(Settings.from_env(env))
        ensure_demo_models(services, trained_dir)
        assert ensure_demo_students(services, count=STUDENTS, seed=29) == STUDENTS
        chunks = STUDENTS // CHUNK_SIZE
        nightly = {"full": True, "run_id": "tasks-down"}

        with LocalServer(env, port, workers=2) as server:
            tasks.stop()
            status, headers, refused = _request("POST", f"{server.url}/tasks/nightly", nightly)
            recorded = services.runs.get("tasks-down")

            tasks.start()
            tasks.create_queue(queue, paused=True)
            status_again, _, accepted = _request("POST", f"{server.url}/tasks/nightly", nightly)
            enqueued = [t.name.rsplit("/", 1)[-1] for t in tasks.list_tasks(queue)]

            tasks.client.resume_queue(name=queue)
            run = _wait_for_run(server, "tasks-down")
            status_third, _, third = _request("POST", f"{server.url}/tasks/nightly", nightly)
            left = tasks.list_tasks(queue)
            log = server.log()
    finally:
        tasks.stop()

    assert status == 503 and refused["error"]["code"] == "store_unavailable", refused
    assert queue in refused["error"]["message"], refused
    assert headers.get("Retry-After", "").isdigit(), headers
    assert_matches_spec("POST", "/tasks/nightly", 503, refused)
    assert recorded is not None and (recorded.students_total, recorded.tasks_total, recorded.tasks_done) == (STUDENTS, chunks, 0)

    assert (status_again, accepted) == (202, {"run_id": "tasks-down", "students": STUDENTS, "tasks": chunks})
    assert sorted(enqueued) == sorted(task_name("tasks-down", chunk) for chunk in range(chunks))

    assert run["status"] == "succeeded", (run, log[-3000:])
    assert (run["students_scored"], run["students_failed"], run["tasks_done"]) == (STUDENTS, 0, chunks)
    assert (status_third, third) == (202, accepted)
    assert left == []
    # Each chunk was delivered and scored once: the worker answered 200 once per chunk, nothing else.
    answers = _log_lines(server, "batch_worker")
    assert sorted(line["chunk"] for line in answers) == list(range(chunks)), answers
    assert {line["status"] for line in answers} == {200}
    assert services.assessments.count("tasks-down") == STUDENTS * len(services.catalog.names)
    assert "unhandled error" not in log
