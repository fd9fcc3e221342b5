"""The assessment and run stores (SQLite): idempotent writes, a latest view that only moves forward, run totals."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from shared.assessments import Assessment, SqliteAssessmentStore, assessment_id
from shared.errors import NotFound
from shared.runs import Chunk, Run, SqliteRunStore
from shared.sqlite import SqliteDatabase

T1, T2, T3 = "2026-01-01T02:00:00.000Z", "2026-01-02T02:00:00.000Z", "2026-01-03T02:00:00.000Z"


@pytest.fixture
def db(tmp_path: Path) -> SqliteDatabase:
    return SqliteDatabase(tmp_path / "stores.sqlite3")


@pytest.fixture
def assessments(db: SqliteDatabase) -> SqliteAssessmentStore:
    return SqliteAssessmentStore(db)


@pytest.fixture
def runs(db: SqliteDatabase) -> SqliteRunStore:
    return SqliteRunStore(db)


def assessment(run_id: str, student_id: str, skill: str, score: float, assessed_at: str, **changes: Any) -> Assessment:
    values: dict[str, Any] = dict(
        run_id=run_id, student_id=student_id, skill=skill, score=score, confidence=abs(2 * score - 1),
        model_version="1.0.0", features_hash="h-" + student_id, assessed_at=assessed_at,
    )
    values.update(changes)
    return Assessment(**values)


def batch(
    run_id: str,
    score: float,
    assessed_at: str,
    students: tuple[str, ...] = ("s1", "s2", "s3"),
    skills: tuple[str, ...] = ("communication", "leadership"),
) -> list[Assessment]:
    return [assessment(run_id, s, k, score, assessed_at) for s in students for k in skills]


# -- assessments -----------------------------------------------------------------------------------


def test_writing_the_same_batch_twice_replaces_values_without_duplicating(assessments: SqliteAssessmentStore) -> None:
    assessments.write(batch("r1", 0.25, T1))
    assert assessments.count("r1") == 6

    assessments.write(batch("r1", 0.75, T1))  # a retried chunk with new results

    assert assessments.count("r1") == assessments.count() == 6
    history = assessments.history("s2", "leadership")
    assert [(a.run_id, a.score) for a in history] == [("r1", 0.75)]
    assert [a.score for a in assessments.latest("s2")] == [0.75, 0.75]


def test_latest_moves_only_forward_in_assessed_at(assessments: SqliteAssessmentStore) -> None:
    assessments.write(batch("r2", 0.6, T2))
    assessments.write(batch("r1", 0.1, T1))  # an older run's retried write, arriving late

    latest = assessments.latest("s1")
    assert [(a.skill, a.run_id, a.score) for a in latest] == [("communication", "r2", 0.6), ("leadership", "r2", 0.6)]

    assessments.write(batch("r3", 0.9, T3))
    assert {a.run_id for a in assessments.latest("s1")} == {"r3"}
    assessments.write(batch("r3", 0.8, T3))  # the same run rewriting itself keeps being the latest
    assert [a.score for a in assessments.latest("s1")] == [0.8, 0.8]
    assert assessments.latest("nobody") == []


def test_history_keeps_one_assessment_per_run_oldest_first(assessments: SqliteAssessmentStore) -> None:
    assessments.write(batch("r3", 0.9, T3))
    assessments.write(batch("r1", 0.1, T1))
    assessments.write(batch("r2", 0.5, T2))
    assessments.write(batch("r2", 0.55, T2))

    history = assessments.history("s3", "communication")

    assert [(a.run_id, a.score, a.assessed_at) for a in history] == [("r1", 0.1, T1), ("r2", 0.55, T2), ("r3", 0.9, T3)]
    assert assessments.history("s3", "creativity") == []
    assert (assessments.count("r1"), assessments.count("r2"), assessments.count("r3"), assessments.count()) == (6, 6, 6, 18)
    assert assessments.count("r9") == 0


def test_every_field_and_contributions_round_trip(assessments: SqliteAssessmentStore) -> None:
    contributions = [{"feature": "word_count_total", "value": 1200.0, "contribution": -0.5}]
    written = [
        assessment("r1", "s1", "communication", 0.3, T1, contributions=contributions, model_version="1.2.0"),
        assessment("r1", "s1", "leadership", 0.7, T1),
    ]
    assessments.write(written)

    assert assessments.latest("s1") == written
    assert assessments.latest("s1")[0].to_dict()["id"] == assessment_id("r1", "s1", "communication")


def test_assessment_id_is_deterministic_and_distinct_per_run_student_and_skill() -> None:
    keys = list(itertools.product(["r1", "r2", "r1 s"], ["s1", "s2", "s 1"], ["communication", "leadership"]))
    ids = [assessment_id(*key) for key in keys]

    assert ids == [assessment_id(*key) for key in keys]
    assert len(set(ids)) == len(keys)
    assert all(len(i) == 40 and int(i, 16) >= 0 for i in ids)
    # The parts are separated, so shifting text from one part to the next gives another id.
    assert assessment_id("r1", "s1x", "y") != assessment_id("r1s", "1x", "y")
    assert assessment("r1", "s1", "communication", 0.5, T1).id == assessment_id("r1", "s1", "communication")


# -- runs ------------------------------------------------------------------------------------------------


def new_run(run_id: str = "run-1", chunks: int = 3, per_chunk: int = 4) -> tuple[Run, list[Chunk]]:
    parts = [Chunk(run_id, c, [f"s{c}-{i}" for i in range(per_chunk)]) for c in range(chunks)]
    run = Run(run_id=run_id, full=False, models="m=1.0.0", started_at=T1,
              students_total=chunks * per_chunk, tasks_total=chunks)
    return run, parts


def test_create_stores_a_run_once(runs: SqliteRunStore) -> None:
    run, chunks = new_run()
    assert runs.create(run, chunks) is True

    other, other_chunks = new_run(chunks=5)
    assert runs.create(other, other_chunks) is False  # changes nothing

    stored = runs.get("run-1")
    assert stored is not None
    assert (stored.students_total, stored.tasks_total, stored.models, stored.full) == (12, 3, "m=1.0.0", False)
    assert [(c.chunk, c.student_ids, c.done) for c in runs.chunks("run-1")] == [
        (c.chunk, c.student_ids, False) for c in chunks
    ]
    assert runs.get("nope") is None
    assert runs.chunks("nope") == []


def test_record_chunk_replaces_an_earlier_attempt_and_never_double_counts(runs: SqliteRunStore) -> None:
    runs.create(*new_run())

    first = runs.record_chunk("run-1", 0, 4, [])
    assert (first.status, first.tasks_done, first.students_scored, first.finished_at) == ("running", 1, 4, None)

    retried = runs.record_chunk("run-1", 0, 3, [{"student_id": "s0-3", "reason": "bad"}])
    assert (retried.tasks_done, retried.students_scored, retried.students_failed) == (1, 3, 1)
    assert runs.chunks("run-1")[0].failed == [{"student_id": "s0-3", "reason": "bad"}]

    runs.record_chunk("run-1", 1, 4, [])
    again = runs.record_chunk("run-1", 1, 4, [])
    assert (again.tasks_done, again.students_scored, again.students_failed, again.status) == (2, 7, 1, "running")


def test_status_and_finished_at_once_the_last_chunk_reports(runs: SqliteRunStore) -> None:
    runs.create(*new_run("ok", chunks=2))
    runs.create(*new_run("some-failed", chunks=2))
    runs.create(*new_run("all-failed", chunks=1, per_chunk=2))

    assert runs.record_chunk("ok", 1, 4, []).finished_at is None
    done = runs.record_chunk("ok", 0, 4, [])
    assert (done.status, done.students_scored, done.tasks_done) == ("succeeded", 8, 2)
    assert done.finished_at is not None and done.finished_at >= done.started_at

    runs.record_chunk("some-failed", 0, 4, [])
    partial = runs.record_chunk("some-failed", 1, 3, [{"student_id": "s1-0", "reason": "bad"}])
    assert (partial.status, partial.students_scored, partial.students_failed) == ("partial", 7, 1)

    failures = [{"student_id": "s0-0", "reason": "x"}, {"student_id": "s0-1", "reason": "y"}]
    failed = runs.record_chunk("all-failed", 0, 0, failures)
    assert (failed.status, failed.students_failed) == ("failed", 2)
    assert failed.to_dict() == {
        "run_id": "all-failed", "status": "failed", "students_total": 2, "students_scored": 0,
        "students_failed": 2, "tasks_total": 1, "tasks_done": 1, "started_at": T1, "finished_at": failed.finished_at,
    }

    # A late duplicate delivery of a chunk keeps the run's first finish time.
    late = runs.record_chunk("ok", 0, 4, [])
    assert late.finished_at == done.finished_at


def test_a_run_without_chunks_is_finished_from_the_start(runs: SqliteRunStore) -> None:
    run = Run(run_id="empty", full=False, models="m=1.0.0", started_at=T1, students_total=0, tasks_total=0, finished_at=T1)
    runs.create(run, [])

    stored = runs.get("empty")
    assert stored is not None
    assert (stored.status, stored.tasks_done, stored.finished_at) == ("succeeded", 0, T1)


def test_record_chunk_of_an_unknown_run_raises_not_found(runs: SqliteRunStore) -> None:
    with pytest.raises(NotFound):
        runs.record_chunk("nope", 0, 1, [])
