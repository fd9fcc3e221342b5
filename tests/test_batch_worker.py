"""The chunk worker and dispatcher in process: runs always finish, and malformed task input is a 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared import batch
from shared.artifacts import ONNX_FILE
from shared.errors import ModelUnavailable
from shared.local_stack import ensure_demo_students
from shared.publishing import publish_version
from shared.runs import Chunk, Run
from shared.services import Services


def _run(services: Services, run_id: str, student_ids: list[str]) -> None:
    signature = batch.models_signature(batch.production_versions(services))
    run = Run(run_id, False, signature, "2030-01-01T00:00:00.000Z", len(student_ids), 1)
    assert services.runs.create(run, [Chunk(run_id, 0, student_ids)])


def test_a_run_whose_model_cannot_load_fails_its_chunk_on_the_last_attempt(
    services: Services, trained_dir: Path
) -> None:
    ensure_demo_students(services, 20)
    ids = [s.student_id for s in services.features.scan()]
    record = publish_version(services.registry, services.artifacts, trained_dir / "leadership", force=True)
    services.artifacts.put(f"leadership/{record.version}/{ONNX_FILE}", b"not a model")
    services.registry.promote("leadership", record.version)
    _run(services, "broken-model", ids)

    with pytest.raises(ModelUnavailable):
        batch.score_chunk(services, "broken-model", 0, ids, attempt=0)
    assert services.runs.get("broken-model").status == "running"  # type: ignore[union-attr]

    with pytest.raises(ModelUnavailable):
        batch.score_chunk(services, "broken-model", 0, ids, attempt=services.settings.task_max_attempts - 1)
    run = services.runs.get("broken-model")
    assert run is not None and run.to_dict()["status"] == "failed"
    assert (run.students_scored, run.students_failed) == (0, 20)
    assert services.assessments.count("broken-model") == 0
    reasons = {f["reason"] for f in services.runs.chunks("broken-model")[0].failed}
    [reason] = reasons
    assert reason.startswith("chunk failed after 3 attempts:") and "leadership" in reason, reason


def test_a_chunk_scores_only_the_skills_the_run_recorded(services: Services) -> None:
    ensure_demo_students(services, 10)
    ids = [s.student_id for s in services.features.scan()]
    versions = batch.production_versions(services)
    del versions["creativity"]
    run = Run("six-skills", False, batch.models_signature(versions), "2030-01-01T00:00:00.000Z", 10, 1)
    services.runs.create(run, [Chunk("six-skills", 0, ids)])

    assert batch.score_chunk(services, "six-skills", 0, ids) == {"scored": 10, "failed": 0}
    skills = {a.skill for a in services.assessments.latest(ids[0])}
    assert skills == set(versions)


@pytest.mark.parametrize("run_id", ["bad\n", "white space", "x" * 101, "", 7])
def test_the_dispatcher_refuses_a_malformed_run_id_before_storing_anything(client, services: Services, run_id) -> None:
    response = client.post("/tasks/nightly", data=json.dumps({"run_id": run_id}), content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["details"] == [{"field": "run_id", "problem": "must be 1 to 100 letters, digits, '-' or '_'"}]
    assert services.runs.get(str(run_id)) is None


def test_a_student_id_with_a_lone_surrogate_is_a_validation_error(client) -> None:
    body = b'{"student_id": "s-\\ud800", "skill": "leadership", "features": {}}'
    response = client.post("/api/v1/skills/infer", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["details"][0]["field"] == "student_id"


def test_an_odd_retry_count_header_is_read_as_a_first_attempt(client, services: Services) -> None:
    ensure_demo_students(services, 5)
    ids = [s.student_id for s in services.features.scan()]
    _run(services, "odd-header", ids)
    response = client.post(
        "/tasks/batch-worker",
        data=json.dumps({"run_id": "odd-header", "chunk": 0, "student_ids": ids}),
        content_type="application/json",
        headers={"X-CloudTasks-TaskRetryCount": "²"},
    )
    assert response.status_code == 200, response.json
    assert response.json == {"scored": 5, "failed": 0}


def test_a_worker_never_scores_a_run_with_an_older_version_it_still_holds(services: Services, trained_dir: Path) -> None:
    ensure_demo_students(services, 5)
    ids = [s.student_id for s in services.features.scan()]
    assert services.engine.status()[0]["leadership"] == "1.0.0"  # 1.0.0 is loaded and serving
    record = publish_version(services.registry, services.artifacts, trained_dir / "leadership", force=True)
    services.artifacts.put(f"leadership/{record.version}/{ONNX_FILE}", b"not a model")
    services.registry.promote("leadership", record.version)
    _run(services, "stale", ids)

    with pytest.raises(ModelUnavailable, match="cannot load the run's model versions"):
        batch.score_chunk(services, "stale", 0, ids)
    assert services.assessments.count("stale") == 0


def test_a_chunk_number_its_run_does_not_have_is_not_found_and_writes_nothing(client, services: Services) -> None:
    ensure_demo_students(services, 5)
    ids = [s.student_id for s in services.features.scan()]
    _run(services, "one-chunk", ids)
    response = client.post("/tasks/batch-worker", json={"run_id": "one-chunk", "chunk": 1, "student_ids": ids})
    assert response.status_code == 404, response.json
    assert response.json["error"]["code"] == "not_found" and "no chunk 1" in response.json["error"]["message"]
    assert all(services.assessments.latest(s) == [] for s in ids)
    assert services.runs.get("one-chunk").tasks_done == 0


def test_a_chunk_delivered_again_after_it_is_done_is_not_scored_again(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_demo_students(services, 5)
    ids = [s.student_id for s in services.features.scan()]
    _run(services, "twice", ids)
    first = batch.score_chunk(services, "twice", 0, ids)
    stored = {a.id: a for s in ids for a in services.assessments.latest(s)}

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("a done chunk was scored again")

    monkeypatch.setattr(batch, "_score_chunk", no_scoring)
    assert batch.score_chunk(services, "twice", 0, ids) == first == {"scored": 5, "failed": 0}
    assert {a.id: a for s in ids for a in services.assessments.latest(s)} == stored
    run = services.runs.get("twice")
    assert run is not None and (run.tasks_done, run.students_scored) == (1, 5)
