"""One bucket per student: while a canary runs, a student gets the same version of a skill in single,
batch and nightly scoring, and the canary's share of students is its traffic."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import batch
from shared.engine import InferenceRequest, in_canary
from shared.local_stack import ensure_demo_students
from shared.publishing import publish_version
from shared.runs import Chunk, Run
from shared.services import Services

SKILL = "leadership"


@pytest.mark.parametrize("traffic", [0.05, 0.1, 0.25, 0.5])
def test_the_canary_share_of_ten_thousand_students_is_its_traffic_within_one_point(traffic: float) -> None:
    ids = [f"student-{i:05d}" for i in range(10_000)]
    share = sum(in_canary(s, traffic) for s in ids) / len(ids)
    assert abs(share - traffic) <= 0.01, share
    assert [in_canary(s, traffic) for s in ids] == [in_canary(s, traffic) for s in ids]  # stable


def test_run_signatures_name_the_canary_and_read_back_old_ones() -> None:
    versions = {"a": batch.RunVersions("1.0.0"), "b": batch.RunVersions("1.0.0", "1.1.0", 0.1)}
    signature = batch.models_signature(versions)
    assert signature == "a=1.0.0;b=1.0.0|1.1.0@0.1"
    assert batch.parse_run_versions(signature) == versions
    assert batch.parse_run_versions("a=1.0.0;b=2.0.0") == {"a": batch.RunVersions("1.0.0"), "b": batch.RunVersions("2.0.0")}
    assert batch.models_signature({"a": "1.0.0"}) == "a=1.0.0"  # plain versions, as before


def test_a_student_gets_one_version_in_single_batch_and_nightly_scoring(services: Services, trained_dir: Path) -> None:
    ensure_demo_students(services, 400)
    ids = sorted(s.student_id for s in services.features.scan())
    canary = publish_version(services.registry, services.artifacts, trained_dir / SKILL, force=True)
    services.registry.start_canary(SKILL, canary.version, 0.3, actor="test")
    services.engine.refresh(force=True)

    # Nightly: the run records production and canary at dispatch, and each student is scored by its bucket.
    versions = batch.serving_versions(services)
    assert versions[SKILL] == batch.RunVersions("1.0.0", canary.version, 0.3)
    run = Run("bucketed", True, batch.models_signature(versions), "2030-01-01T00:00:00.000Z", len(ids), 1)
    services.runs.create(run, [Chunk("bucketed", 0, ids)])
    assert batch.score_chunk(services, "bucketed", 0, ids) == {"scored": len(ids), "failed": 0}
    nightly = {s: next(a.model_version for a in services.assessments.latest(s) if a.skill == SKILL) for s in ids}
    others = {a.model_version for s in ids[:20] for a in services.assessments.latest(s) if a.skill != SKILL}
    assert others == {"1.0.0"}

    stored = services.features.get_many(ids)
    requests = [InferenceRequest(s, SKILL, stored[s].features) for s in ids]
    single = {r.student_id: services.engine.infer(r)["model_version"] for r in requests}
    single_again = {r.student_id: services.engine.infer(r)["model_version"] for r in requests}
    many = {r.student_id: out["model_version"] for r, out in zip(requests, services.engine.infer_many(requests))}  # type: ignore[index]

    expected = {s: canary.version if in_canary(s, 0.3) else "1.0.0" for s in ids}
    assert nightly == single == single_again == many == expected
    assert 0.2 < sum(v == canary.version for v in expected.values()) / len(ids) < 0.4
    # The run marks its students with the signature it recorded, so the next incremental run skips them.
    assert all(not s.needs_scoring(run.models) for s in services.features.scoring_states() if s.student_id in stored)


def test_a_worker_that_cannot_load_the_runs_canary_answers_unavailable(services: Services, trained_dir: Path) -> None:
    from shared.errors import ModelUnavailable

    ensure_demo_students(services, 10)
    ids = [s.student_id for s in services.features.scan()]
    signature = batch.models_signature({**batch.serving_versions(services), SKILL: batch.RunVersions("1.0.0", "9.9.9", 0.5)})
    services.runs.create(Run("ghost", False, signature, "2030-01-01T00:00:00.000Z", len(ids), 1), [Chunk("ghost", 0, ids)])
    with pytest.raises(ModelUnavailable):
        batch.score_chunk(services, "ghost", 0, ids)
