"""The nightly run end to end on the GCP backends: Cloud Tasks emulator -> worker over HTTP, models from the
storage emulator, students and assessments in the Firestore emulator, with the fault drill on."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared.local_stack import LocalServer, ensure_demo_models, ensure_demo_students, free_port
from shared.services import Services
from shared.settings import Settings
from tests.emulators.cloud_tasks import CloudTasksEmulator, cloud_tasks_emulator, new_queue_path  # noqa: F401
from tests.emulators.firestore import (  # noqa: F401
    FirestoreEmulator,
    firestore_database,
    firestore_emulator,
    firestore_session_database,
)
from tests.emulators.storage import GcsLocation, StorageEmulator, gcs_location, storage_emulator  # noqa: F401

pytestmark = pytest.mark.integration

STUDENTS = 1_000


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.fixture
def gcp_env(
    firestore_emulator: FirestoreEmulator,  # noqa: F811
    firestore_database: object,  # noqa: F811  (empties the database for this test)
    storage_emulator: StorageEmulator,  # noqa: F811
    gcs_location: GcsLocation,  # noqa: F811
    cloud_tasks_emulator: CloudTasksEmulator,  # noqa: F811
    tmp_path: Path,
) -> dict[str, str]:
    port = free_port()
    queue = cloud_tasks_emulator.create_queue(new_queue_path("nightly"))
    return {
        "PORT": str(port),
        "ARTIFACT_STORE": gcs_location.uri,
        "ARTIFACT_CACHE_DIR": str(tmp_path / "artifact-cache"),
        "DATABASE_URL": f"firestore://{firestore_emulator.project}/(default)",
        "FIRESTORE_EMULATOR_HOST": firestore_emulator.host,
        "STORAGE_EMULATOR_HOST": storage_emulator.url,
        "TASK_QUEUE": f"cloudtasks://{queue}",
        "CLOUD_TASKS_EMULATOR_HOST": cloud_tasks_emulator.host,
        "WORKER_URL": f"http://127.0.0.1:{port}/tasks/batch-worker",
        "METRICS": "off",
        "LOG_LEVEL": "WARNING",
    }


def test_a_full_nightly_run_on_the_gcp_backends_stores_every_assessment_exactly_once(
    gcp_env: dict[str, str], trained_dir: Path
) -> None:
    # The fault drill: the first attempt of chunks 1 and 3 writes half its assessments, then fails.
    env = {**gcp_env, "CHAOS_FAIL_CHUNKS": "1,3", "LOG_LEVEL": "INFO"}
    services = Services(Settings.from_env(env))
    published = ensure_demo_models(services, trained_dir)
    assert len(published) == 7 and services.settings.artifact_store.startswith("gs://")
    assert ensure_demo_students(services, count=STUDENTS, seed=17) == STUDENTS

    with LocalServer(env, int(env["PORT"]), workers=2) as server:
        status, dispatched = _post(f"{server.url}/tasks/nightly", {"full": True, "run_id": "gcp-e2e"})
        assert status == 202 and dispatched == {"run_id": "gcp-e2e", "students": STUDENTS, "tasks": 5}
        deadline = time.monotonic() + 180
        while (run := _get(f"{server.url}/api/v1/batch/runs/gcp-e2e"))["status"] == "running":
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
        # Firing the same run again enqueues nothing new: every chunk is done.
        assert _post(f"{server.url}/tasks/nightly", {"run_id": "gcp-e2e"})[0] == 202
        log = server.log()

    assert run["status"] == "succeeded", (run, log[-3000:])
    assert (run["students_scored"], run["students_failed"]) == (STUDENTS, 0)
    # Exactly once: 7,000 documents, one per (student, skill), none left over from the failed attempts.
    assert services.assessments.count("gcp-e2e") == STUDENTS * 7
    client = services.firestore.client
    pairs = Counter(
        (doc.get("student_id"), doc.get("skill"))
        for doc in client.collection("skill_assessments").where("run_id", "==", "gcp-e2e").select(["student_id", "skill"]).stream()
    )
    assert len(pairs) == STUDENTS * 7 and set(pairs.values()) == {1}
    # The drill really failed two chunks once: the worker answered 503 twice, and the queue retried.
    worker_lines = [json.loads(line) for line in log.splitlines() if '"function": "batch_worker"' in line]
    assert Counter(line["status"] for line in worker_lines) == {200: 5, 503: 2}
    latest = services.assessments.latest("student-000042")
    assert sorted(a.skill for a in latest) == sorted(services.catalog.names)
    assert {a.run_id for a in latest} == {"gcp-e2e"}
