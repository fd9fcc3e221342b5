"""One contract per store Protocol, run against SQLite and Firestore (the real emulator): same inputs, same behaviour.

Every test taking `stores` runs twice, once per implementation. The tests after the contract are
Firestore's own: concurrent writers on the emulator, run creation larger than one commit, the
client's lazy construction, and what an unreachable Firestore turns into.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from shared.assessments import Assessment, AssessmentStore, SqliteAssessmentStore, assessment_id
from shared.drift import DriftCheckStore, SqliteDriftCheckStore
from shared.errors import Conflict, NotFound, StoreUnavailable
from shared.feature_store import FeatureStore, ScoredMarker, ScoringState, SqliteFeatureStore, features_hash
from shared.gcp.firestore import (
    FirestoreAssessmentStore,
    FirestoreDatabase,
    FirestoreDriftCheckStore,
    FirestoreFeatureStore,
    FirestoreProfileStore,
    FirestoreRegistryBackend,
    FirestoreRunStore,
    FirestoreTeacherRatingStore,
)
from shared.local_stack import free_port
from shared.profiles import PREDICTION, ProfilePart, ProfileStore, SqliteProfileStore, sum_parts
from shared.ratings import SqliteTeacherRatingStore, TeacherRating, TeacherRatingStore
from shared.registry import Decide, ModelRegistry, ModelVersion, RegistryBackend, SqliteRegistryBackend, StageChange
from shared.registry import Decision, HistoryEvent, Transition, VersionState
from shared.runs import Chunk, Run, RunStore, SqliteRunStore
from shared.settings import PROJECT_ROOT
from shared.sqlite import SqliteDatabase
from tests.emulators.firestore import (  # noqa: F401 - fixtures
    FirestoreEmulator,
    firestore_database,
    firestore_emulator,
    firestore_session_database,
)

T1, T2, T3 = "2026-01-01T02:00:00.000Z", "2026-01-02T02:00:00.000Z", "2026-01-03T02:00:00.000Z"
SKILL = "communication"


@dataclass(frozen=True)
class Stores:
    """The stores of one implementation, on one empty database."""

    registry: RegistryBackend
    features: FeatureStore
    assessments: AssessmentStore
    runs: RunStore
    profiles: ProfileStore
    ratings: TeacherRatingStore
    drift_checks: DriftCheckStore


@pytest.fixture(params=["sqlite", "firestore"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    if request.param == "sqlite":
        db = SqliteDatabase(tmp_path / "stores.sqlite3")
        return Stores(
            SqliteRegistryBackend(db), SqliteFeatureStore(db), SqliteAssessmentStore(db), SqliteRunStore(db),
            SqliteProfileStore(db), SqliteTeacherRatingStore(db), SqliteDriftCheckStore(db),
        )
    # Requested only here, so the SQLite half never starts (or needs) the emulator.
    fdb: FirestoreDatabase = request.getfixturevalue("firestore_database")
    return Stores(
        FirestoreRegistryBackend(fdb),
        FirestoreFeatureStore(fdb),
        FirestoreAssessmentStore(fdb),
        FirestoreRunStore(fdb),
        FirestoreProfileStore(fdb),
        FirestoreTeacherRatingStore(fdb),
        FirestoreDriftCheckStore(fdb),
    )


# -- registry backend -----------------------------------------------------------------------------------


def model_version(version: str, skill: str = SKILL, created_at: str = T1, **changes: Any) -> ModelVersion:
    values: dict[str, Any] = dict(
        skill=skill, version=version, stage="staging", traffic=0.0, created_at=created_at, trained_at=T1,
        metrics={"heldout": {"auc": 0.8, "n": 1600}, "baseline": {"auc": 0.7}},
        artifact_uri=f"gs://models/{skill}/{version}/", sha256="ab" * 32,
        checksums={"model.onnx": "cd" * 32, "model.ubj": "ef" * 32},
    )
    values.update(changes)
    return ModelVersion(**values)


def stages(backend: RegistryBackend, skill: str = SKILL) -> dict[str, tuple[str, float]]:
    return {v.version: (v.stage, v.traffic) for v in backend.list(skill)}


def test_insert_then_list_round_trips_every_field(stores: Stores) -> None:
    promoted = model_version("1.1.0", stage="production", traffic=1.0, promoted_at=T2, promotion_seq=3)
    stores.registry.insert(model_version("1.0.0"))
    stores.registry.insert(promoted)

    assert stores.registry.list(SKILL) == [model_version("1.0.0"), promoted]
    assert isinstance(stores.registry.list(SKILL)[1].traffic, float)
    assert stores.registry.list("leadership") == []


def test_a_duplicate_insert_is_a_conflict_and_changes_nothing(stores: Stores) -> None:
    stores.registry.insert(model_version("1.0.0"))
    with pytest.raises(Conflict):
        stores.registry.insert(model_version("1.0.0", sha256="99" * 32))
    assert stores.registry.list(SKILL) == [model_version("1.0.0")]
    stores.registry.insert(model_version("1.0.0", skill="leadership"))  # another skill's 1.0.0 is another model
    assert len(stores.registry.list()) == 2


def test_list_is_oldest_first_per_skill_and_ties_keep_insertion_order(stores: Stores) -> None:
    stores.registry.insert(model_version("1.2.0", created_at=T2))
    stores.registry.insert(model_version("1.0.0", skill="leadership", created_at=T3))
    stores.registry.insert(model_version("1.0.0", created_at=T1))
    stores.registry.insert(model_version("1.1.0", created_at=T2))  # created in the same millisecond as 1.2.0

    assert [v.version for v in stores.registry.list(SKILL)] == ["1.0.0", "1.2.0", "1.1.0"]
    assert [(v.skill, v.version) for v in stores.registry.list()] == [
        (SKILL, "1.0.0"), (SKILL, "1.2.0"), (SKILL, "1.1.0"), ("leadership", "1.0.0"),
    ]


def test_update_hands_decide_the_stored_versions_and_applies_its_changes(stores: Stores) -> None:
    stores.registry.insert(model_version("1.0.0", created_at=T1))
    stores.registry.insert(model_version("1.1.0", created_at=T2))
    stores.registry.insert(model_version("9.0.0", skill="leadership"))
    seen: list[list[ModelVersion]] = []

    def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
        seen.append(stored)
        return {"1.1.0": StageChange("production", 0.75, T3, 1), "1.0.0": StageChange("canary", 0.25, None, 0)}

    stores.registry.update(SKILL, decide)

    assert [v.version for v in seen[-1]] == ["1.0.0", "1.1.0"]  # only this skill's, oldest first
    assert stages(stores.registry) == {"1.0.0": ("canary", 0.25), "1.1.0": ("production", 0.75)}
    production = stores.registry.list(SKILL)[1]
    assert (production.promoted_at, production.promotion_seq) == (T3, 1)
    assert replace(production, stage="staging", traffic=0.0, promoted_at=None, promotion_seq=0) == model_version(
        "1.1.0", created_at=T2
    )  # every other field untouched
    assert stages(stores.registry, "leadership") == {"9.0.0": ("staging", 0.0)}


@pytest.mark.parametrize("error", [Conflict("no"), RuntimeError("a bug in decide")])
def test_update_writes_nothing_when_decide_raises(stores: Stores, error: Exception) -> None:
    stores.registry.insert(model_version("1.0.0"))
    stores.registry.insert(model_version("1.1.0"))
    before = stores.registry.list(SKILL)

    def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
        # A decide that has worked out its changes and then refuses: none of them may land.
        _ = {v.version: StageChange("production", 1.0, T1, 1) for v in stored}
        raise error

    with pytest.raises(type(error)):
        stores.registry.update(SKILL, decide)
    assert stores.registry.list(SKILL) == before


def test_update_of_a_skill_without_versions_hands_decide_nothing(stores: Stores) -> None:
    seen: list[list[ModelVersion]] = []

    def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
        seen.append(stored)
        return {}

    stores.registry.update("creativity", decide)
    assert seen == [[]]


def test_the_registry_rules_hold_on_the_backend(stores: Stores) -> None:
    registry = ModelRegistry(stores.registry)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        registry.register(
            SKILL, version, trained_at=T1, metrics={}, artifact_uri=f"gs://m/{version}/", sha256="0" * 64, checksums={}
        )
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0")
    registry.promote(SKILL, "1.2.0", "canary", 0.2)
    assert stages(stores.registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 0.8), "1.2.0": ("canary", 0.2)}

    assert registry.rollback(SKILL).version == "1.0.0"
    assert stages(stores.registry) == {"1.0.0": ("production", 0.8), "1.1.0": ("archived", 0.0), "1.2.0": ("canary", 0.2)}
    assert [v.version for v in registry.serving()[SKILL]] == ["1.0.0", "1.2.0"]
    with pytest.raises(Conflict):
        registry.rollback(SKILL)  # nothing served before 1.0.0


def test_concurrent_inserts_of_one_version_one_wins_the_other_gets_conflict(stores: Stores) -> None:
    for repetition in range(10):
        version = f"1.{repetition}.0"
        barrier = threading.Barrier(2, timeout=10)
        outcomes: dict[str, str] = {}

        # Bound per iteration, so a thread that outlives its join timeout cannot see the next iteration's (B023).
        def insert(name: str, barrier: threading.Barrier = barrier, version: str = version, outcomes: dict[str, str] = outcomes) -> None:
            barrier.wait()
            try:
                stores.registry.insert(model_version(version, sha256=name * 64))
                outcomes[name] = "inserted"
            except Conflict:
                outcomes[name] = "conflict"

        threads = [threading.Thread(target=insert, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes.values()) == ["conflict", "inserted"], outcomes
        winner = next(name for name, outcome in outcomes.items() if outcome == "inserted")
        stored = [v for v in stores.registry.list(SKILL) if v.version == version]
        assert [v.sha256 for v in stored] == [winner * 64]


# -- feature store ------------------------------------------------------------------------------------------


def test_upsert_creates_then_merges_and_counts_the_students_it_changed(stores: Stores) -> None:
    features = stores.features
    assert features.upsert({"s1": {"a": 1.0, "b": 2.0}, "s2": {"a": 5.0}}) == 2
    assert features.upsert({"s1": {"b": 3.0, "c": 4.0}}) == 1

    stored = features.get_many(["s1", "s2"])
    assert stored["s1"].features == {"a": 1.0, "b": 3.0, "c": 4.0}
    assert stored["s1"].features_hash == features_hash({"a": 1.0, "b": 3.0, "c": 4.0})
    assert (stored["s1"].scored_hash, stored["s1"].scored_models) == (None, None)
    assert stored["s2"].features == {"a": 5.0}
    assert features.count() == 2
    assert features.upsert({}) == 0


def test_upsert_bumps_updated_at_and_hash_only_when_a_value_changes(stores: Stores) -> None:
    features = stores.features
    features.upsert({"s1": {"a": 1.0, "b": 2.0}, "s2": {"a": 1.0}})
    before = features.get_many(["s1", "s2"])
    time.sleep(0.01)  # timestamps have millisecond precision

    assert features.upsert({"s1": {"a": 1.0, "b": 2.0}}) == 0
    assert features.upsert({"s1": {"b": 2.0}, "s2": {"a": 1.0}}) == 0  # a subset of the same values
    assert features.get_many(["s1", "s2"]) == before

    assert features.upsert({"s1": {"b": 2.5}, "s2": {"a": 1.0}}) == 1
    after = features.get_many(["s1", "s2"])
    assert after["s1"].updated_at > before["s1"].updated_at
    assert after["s1"].features_hash != before["s1"].features_hash
    assert after["s2"] == before["s2"]


def test_upsert_and_get_many_past_one_commit_and_one_page(stores: Stores) -> None:
    features = stores.features
    assert features.upsert({f"s{i:04d}": {"a": float(i)} for i in range(600)}) == 600
    # Changed, unchanged and new students, across a commit boundary.
    assert features.upsert({f"s{i:04d}": {"a": float(i) + (i % 2)} for i in range(0, 700)}) == 300 + 100
    wanted = [f"s{i:04d}" for i in range(0, 1100)] + ["absent-1", "s0002", "absent-2"]  # more than a page

    found = features.get_many(wanted)

    assert set(found) == {f"s{i:04d}" for i in range(700)}
    assert (found["s0598"].features, found["s0599"].features, found["s0650"].features) == (
        {"a": 598.0}, {"a": 600.0}, {"a": 650.0},
    )
    assert features.get_many([]) == {}
    assert features.count() == 700


ODD_IDS = ["A", "a", "a-1", "z_9", "Zoë", "ünï", "日本-1", "😀x", "x/y", "__id__", " lead", "."]


def test_scan_and_scoring_states_yield_every_student_once_ordered_by_id_page_by_page(stores: Stores) -> None:
    features = stores.features
    assert list(features.scan()) == [] and list(features.scoring_states()) == []
    first = [f"student-{i:05d}" for i in range(1000)]  # exactly one page
    features.upsert({sid: {"x": 1.0} for sid in first})
    assert [s.student_id for s in features.scan()] == first

    rest = [f"student-{i:05d}" for i in range(1000, 1030)] + ODD_IDS
    shuffled = rest[:]
    random.Random(3).shuffle(shuffled)
    features.upsert({sid: {"x": 2.0, "y": 3.0} for sid in shuffled})
    everyone = sorted(first + rest)  # code point order = UTF-8 byte order, as both stores sort

    scan = features.scan()
    scanned = [next(scan)]
    # Pages are read as the scan reaches them: a student stored meanwhile beyond the first page is seen.
    features.upsert({"zz-late": {"x": 1.0}})
    scanned.extend(scan)
    states = list(features.scoring_states())
    everyone = sorted(everyone + ["zz-late"])

    assert [s.student_id for s in scanned] == everyone
    assert [s.student_id for s in states] == everyone
    assert {s.student_id: s.features for s in scanned}["Zoë"] == {"x": 2.0, "y": 3.0}
    assert all(type(s) is ScoringState for s in states)  # the state only, not the features
    assert {s.student_id: s.features_hash for s in states} == {s.student_id: s.features_hash for s in scanned}
    assert features.count() == len(everyone)


def test_mark_scored_records_markers_and_ignores_unknown_students(stores: Stores) -> None:
    features = stores.features
    features.upsert({"s1": {"a": 1.0}, "s2": {"a": 2.0}})
    s1 = features.get_many(["s1"])["s1"]
    assert s1.needs_scoring("m=1.0.0")

    features.mark_scored([ScoredMarker("s1", s1.features_hash, "m=1.0.0"), ScoredMarker("ghost", "h", "m=1.0.0")])
    features.mark_scored([ScoredMarker("ghost", "h", "m=1.0.0")])  # only unknown students
    features.mark_scored([])

    stored = features.get_many(["s1", "s2", "ghost"])
    assert set(stored) == {"s1", "s2"} and features.count() == 2
    assert (stored["s1"].scored_hash, stored["s1"].scored_models) == (s1.features_hash, "m=1.0.0")
    assert not stored["s1"].needs_scoring("m=1.0.0")
    assert stored["s1"].needs_scoring("m=1.1.0")
    assert stored["s2"].needs_scoring("m=1.0.0")
    assert stored["s1"].updated_at == s1.updated_at and stored["s1"].features == s1.features
    states = {s.student_id: s for s in features.scoring_states()}
    assert (states["s1"].scored_hash, states["s1"].scored_models) == (s1.features_hash, "m=1.0.0")

    features.upsert({"s1": {"a": 1.0}})  # the same value: still scored
    assert not features.get_many(["s1"])["s1"].needs_scoring("m=1.0.0")
    features.upsert({"s1": {"a": 1.5}})  # a changed value: needs scoring again, the marker is kept
    changed = features.get_many(["s1"])["s1"]
    assert changed.scored_hash == s1.features_hash
    assert changed.needs_scoring("m=1.0.0")


def test_mark_scored_of_many_students_past_one_commit(stores: Stores) -> None:
    features = stores.features
    features.upsert({f"s{i:04d}": {"a": 1.0} for i in range(520)})
    digest = features_hash({"a": 1.0})
    features.mark_scored([ScoredMarker(f"s{i:04d}", digest, "m=2") for i in range(0, 560)])
    assert all(not s.needs_scoring("m=2") for s in features.scoring_states())
    assert features.count() == 520


# -- assessment store ---------------------------------------------------------------------------------------


def assessment(run_id: str, student_id: str, skill: str, score: float, assessed_at: str, **changes: Any) -> Assessment:
    values: dict[str, Any] = dict(
        run_id=run_id, student_id=student_id, skill=skill, score=score, confidence=abs(2 * score - 1),
        model_version="1.0.0", features_hash="h-" + student_id, assessed_at=assessed_at,
    )
    values.update(changes)
    return Assessment(**values)


def batch(
    run_id: str, score: float, assessed_at: str, students: Sequence[str] = ("s1", "s2", "s3"),
    skills: Sequence[str] = ("communication", "leadership"),
) -> list[Assessment]:
    return [assessment(run_id, s, k, score, assessed_at) for s in students for k in skills]


def test_writing_a_batch_twice_replaces_its_values_without_duplicating(stores: Stores) -> None:
    assessments = stores.assessments
    assessments.write(batch("r1", 0.25, T1))
    assert assessments.count("r1") == 6

    assessments.write(batch("r1", 0.75, T1))  # a retried chunk with new results

    assert assessments.count("r1") == assessments.count() == 6
    assert [(a.run_id, a.score) for a in assessments.history("s2", "leadership")] == [("r1", 0.75)]
    assert [a.score for a in assessments.latest("s2")] == [0.75, 0.75]
    assessments.write([])
    assert assessments.count() == 6


def test_latest_moves_only_forward_in_assessed_at(stores: Stores) -> None:
    assessments = stores.assessments
    assessments.write(batch("r2", 0.6, T2))
    assessments.write(batch("r1", 0.1, T1))  # an older run's retried write, arriving late

    assert [(a.skill, a.run_id, a.score) for a in assessments.latest("s1")] == [
        ("communication", "r2", 0.6), ("leadership", "r2", 0.6),
    ]
    assessments.write(batch("r3", 0.9, T3))
    assert {a.run_id for a in assessments.latest("s1")} == {"r3"}
    assessments.write(batch("r3", 0.8, T3))  # the same run rewriting itself stays the latest
    assert [a.score for a in assessments.latest("s1")] == [0.8, 0.8]
    assert assessments.latest("nobody") == []


def test_latest_within_one_write_follows_assessed_at_not_position(stores: Stores) -> None:
    stores.assessments.write(
        [assessment("r3", "s1", SKILL, 0.9, T3), assessment("r1", "s1", SKILL, 0.1, T1), assessment("r2", "s1", SKILL, 0.5, T2)]
    )
    assert [(a.run_id, a.score) for a in stores.assessments.latest("s1")] == [("r3", 0.9)]


def test_history_keeps_one_assessment_per_run_oldest_first_and_count_is_per_run(stores: Stores) -> None:
    assessments = stores.assessments
    assessments.write(batch("r3", 0.9, T3))
    assessments.write(batch("r1", 0.1, T1))
    assessments.write(batch("r2", 0.5, T2))
    assessments.write(batch("r2", 0.55, T2))

    history = assessments.history("s3", "communication")

    assert [(a.run_id, a.score, a.assessed_at) for a in history] == [("r1", 0.1, T1), ("r2", 0.55, T2), ("r3", 0.9, T3)]
    assert assessments.history("s3", "creativity") == []
    assert [assessments.count(r) for r in ("r1", "r2", "r3", "r9")] == [6, 6, 6, 0]
    assert assessments.count() == 18


def test_every_field_and_contributions_round_trip(stores: Stores) -> None:
    contributions = [{"feature": "word_count_total", "value": 1200.0, "contribution": -0.5}]
    written = [
        assessment("r1", "s1", "communication", 0.3, T1, contributions=contributions, model_version="1.2.0"),
        assessment("r1", "s1", "leadership", 0.7, T1),
        assessment("r1", "s1", "creativity", 0.5, T1, contributions=[]),
    ]
    stores.assessments.write(written)

    latest = stores.assessments.latest("s1")
    assert latest == sorted(written, key=lambda a: a.skill)
    assert stores.assessments.history("s1", "communication") == [written[0]]
    assert latest[0].to_dict()["id"] == assessment_id("r1", "s1", "communication")


def test_a_write_larger_than_one_commit(stores: Stores) -> None:
    students = [f"s{i:03d}" for i in range(130)]
    assessments = stores.assessments
    assessments.write(batch("r2", 0.5, T2, students))  # 260 assessments and their 260 latest pointers
    assessments.write(batch("r1", 0.1, T1, students))  # older: history grows, latest stays

    assert (assessments.count("r1"), assessments.count("r2"), assessments.count()) == (260, 260, 520)
    for student in ("s000", "s124", "s125", "s129"):
        assert [(a.run_id, a.score) for a in assessments.latest(student)] == [("r2", 0.5), ("r2", 0.5)]
        assert [a.run_id for a in assessments.history(student, "leadership")] == ["r1", "r2"]


# -- run store ----------------------------------------------------------------------------------------------


def new_run(run_id: str = "run-1", chunks: int = 3, per_chunk: int = 4, started_at: str = T1) -> tuple[Run, list[Chunk]]:
    parts = [Chunk(run_id, c, [f"s{c}-{i}" for i in range(per_chunk)]) for c in range(chunks)]
    run = Run(run_id=run_id, full=False, models="m=1.0.0", started_at=started_at,
              students_total=chunks * per_chunk, tasks_total=chunks)
    return run, parts


def test_create_stores_a_run_once(stores: Stores) -> None:
    runs = stores.runs
    run, chunks = new_run()
    assert runs.create(run, chunks) is True

    other, other_chunks = new_run(chunks=5)
    assert runs.create(replace(other, full=True), other_chunks) is False  # changes nothing

    stored = runs.get("run-1")
    assert stored == replace(run, tasks_done=0, students_scored=0, students_failed=0, finished_at=None)
    assert stored is not None and stored.status == "running"
    assert runs.chunks("run-1") == chunks
    assert runs.get("nope") is None
    assert runs.chunks("nope") == []


def test_a_run_larger_than_one_commit(stores: Stores) -> None:
    runs = stores.runs
    run, chunks = new_run("big", chunks=500, per_chunk=2)  # two commits, the second of one chunk
    assert runs.create(run, chunks) is True
    assert runs.create(*new_run("big", chunks=2)) is False

    assert runs.chunks("big") == chunks
    runs.record_chunk("big", 0, 2, [])
    runs.record_chunk("big", 499, 1, [{"student_id": "s499-0", "reason": "bad"}])
    stored = runs.get("big")
    assert stored is not None
    assert (stored.tasks_total, stored.students_total, stored.tasks_done) == (500, 1000, 2)
    assert (stored.students_scored, stored.students_failed, stored.status) == (3, 1, "running")


def test_record_chunk_replaces_an_earlier_attempt_and_never_double_counts(stores: Stores) -> None:
    runs = stores.runs
    runs.create(*new_run())

    first = runs.record_chunk("run-1", 0, 4, [])
    assert (first.status, first.tasks_done, first.students_scored, first.finished_at) == ("running", 1, 4, None)

    retried = runs.record_chunk("run-1", 0, 3, [{"student_id": "s0-3", "reason": "bad"}])
    assert (retried.tasks_done, retried.students_scored, retried.students_failed) == (1, 3, 1)
    assert runs.chunks("run-1")[0] == Chunk("run-1", 0, ["s0-0", "s0-1", "s0-2", "s0-3"], True, 3,
                                            [{"student_id": "s0-3", "reason": "bad"}])

    runs.record_chunk("run-1", 1, 4, [])
    again = runs.record_chunk("run-1", 1, 4, [])
    assert (again.tasks_done, again.students_scored, again.students_failed, again.status) == (2, 7, 1, "running")
    assert runs.get("run-1") == again


def test_status_and_finished_at_once_the_last_chunk_reports(stores: Stores) -> None:
    runs = stores.runs
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

    time.sleep(0.01)  # a later duplicate delivery of a chunk keeps the run's first finish time
    late = runs.record_chunk("ok", 0, 4, [])
    assert late.finished_at == done.finished_at
    assert runs.get("ok") == late


def test_a_run_without_chunks_is_finished_from_the_start(stores: Stores) -> None:
    run = Run(run_id="empty", full=True, models="m=1.0.0", started_at=T1, students_total=0, tasks_total=0, finished_at=T1)
    assert stores.runs.create(run, []) is True

    stored = stores.runs.get("empty")
    assert stored is not None
    assert (stored.status, stored.tasks_done, stored.finished_at, stored.full) == ("succeeded", 0, T1, True)
    assert stores.runs.chunks("empty") == []


def test_record_chunk_of_an_unknown_run_raises_not_found(stores: Stores) -> None:
    with pytest.raises(NotFound):
        stores.runs.record_chunk("nope", 0, 1, [])


def test_record_chunk_of_a_chunk_the_run_does_not_have_changes_nothing(stores: Stores) -> None:
    stores.runs.create(*new_run(chunks=2))
    run = stores.runs.record_chunk("run-1", 7, 4, [])
    assert (run.tasks_done, run.students_scored) == (0, 0)
    assert [c.chunk for c in stores.runs.chunks("run-1")] == [0, 1]


def test_one_chunk_is_read_with_its_result_once_recorded(stores: Stores) -> None:
    run, chunks = new_run(chunks=2)
    stores.runs.create(run, chunks)
    assert stores.runs.chunk("run-1", 1) == chunks[1] and not chunks[1].done
    failed = [{"student_id": chunks[1].student_ids[0], "reason": "bad features", "skills": {"leadership": "bad features"}}]
    stores.runs.record_chunk("run-1", 1, 3, failed)
    recorded = stores.runs.chunk("run-1", 1)
    assert recorded is not None and (recorded.done, recorded.scored, recorded.failed) == (True, 3, failed)
    assert recorded.student_ids == chunks[1].student_ids
    assert stores.runs.chunk("run-1", 2) is None and stores.runs.chunk("no-such-run", 0) is None


# -- profile store ------------------------------------------------------------------------------------------


D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"


def profile_part(
    source: str, day: str = D1, students: int = 10, version: str = "1.0.0", skill: str = SKILL, seed: int = 0
) -> ProfilePart:
    # The prediction's key, `__prediction__`, is one Firestore refuses as a map key: the store must keep it.
    counts = {PREDICTION: [seed, 1, 2], "word_count_total": [3, seed, 5, 0], "a.b/c": [seed]}
    return ProfilePart(skill, version, day, source, students, counts, T1)


def test_a_profile_part_replaces_only_its_own_sources_earlier_part(stores: Stores) -> None:
    profiles = stores.profiles
    serving = profile_part("instance:a", students=10, seed=1)
    other = profile_part("instance:b", students=4, seed=2)
    chunk = profile_part("run:nightly-20260101:chunk:7", students=200, seed=3)
    profiles.put([serving, other, chunk])

    rewritten = replace(profile_part("instance:a", students=25, seed=9), updated_at=T2)
    profiles.put([rewritten])  # the process's next flush: its running counts so far

    assert profiles.parts(SKILL, "1.0.0", [D1]) == [rewritten, other, chunk]  # ordered by day, then source
    students, totals = sum_parts(profiles.parts(SKILL, "1.0.0", [D1]))
    assert students == 25 + 4 + 200
    assert totals[PREDICTION].tolist() == [9 + 2 + 3, 3, 6]
    profiles.put([])


def test_a_part_repeated_in_one_put_keeps_the_last(stores: Stores) -> None:
    stores.profiles.put([profile_part("instance:a", students=1), profile_part("instance:a", students=2)])
    assert [p.students for p in stores.profiles.parts(SKILL, "1.0.0", [D1])] == [2]


def test_parts_of_other_days_versions_and_skills_are_left_out(stores: Stores) -> None:
    profiles = stores.profiles
    wanted = [profile_part("instance:a", D1), profile_part("instance:b", D3), profile_part("instance:a", D3)]
    profiles.put(
        [
            *wanted,
            profile_part("instance:a", D2),
            profile_part("instance:a", D1, version="1.1.0"),
            profile_part("instance:a", D1, skill="leadership"),
        ]
    )

    assert profiles.parts(SKILL, "1.0.0", [D3, D1]) == sorted(wanted, key=lambda p: (p.day, p.source))
    assert profiles.parts(SKILL, "1.0.0", [D1, D1]) == [wanted[0]]  # a day named twice is read once
    assert profiles.parts(SKILL, "1.1.0", [D1, D2, D3]) == [profile_part("instance:a", D1, version="1.1.0")]
    assert profiles.parts(SKILL, "1.0.0", ["2026-02-01"]) == []
    assert profiles.parts(SKILL, "1.0.0", []) == []
    assert profiles.parts("creativity", "1.0.0", [D1]) == []


def test_many_parts_of_one_day_past_one_commit_and_one_page(stores: Stores) -> None:
    chunks = [profile_part(f"run:r1:chunk:{n}", D2, students=n, seed=n) for n in range(520)]
    stores.profiles.put([*chunks, profile_part("instance:a", D1)])

    found = stores.profiles.parts(SKILL, "1.0.0", [D1, D2])

    assert found == [profile_part("instance:a", D1), *sorted(chunks, key=lambda p: p.source)]
    assert sum_parts(found)[0] == sum(range(520)) + 10


# -- teacher rating store -----------------------------------------------------------------------------------


def rating(student_id: str, value: float, rater: str = "t-1", skill: str = SKILL, rated_at: str = T1) -> TeacherRating:
    return TeacherRating(student_id, skill, value, rated_at, rater)


def test_a_later_rating_by_the_same_rater_replaces_and_students_get_their_mean(stores: Stores) -> None:
    ratings = stores.ratings
    assert ratings.for_skill(SKILL) == {}
    assert ratings.put_many(
        [rating("s1", 4.0), rating("s1", 2.0, rater="t-2"), rating("s2", 3.0), rating("s1", 1.0, skill="leadership")]
    ) == 4

    assert ratings.put_many([rating("s1", 5.0, rated_at=T2), rating("s3", 2.5, rater="t/3")]) == 2

    assert ratings.for_skill(SKILL) == pytest.approx({"s1": (5.0 + 2.0) / 2, "s2": 3.0, "s3": 2.5})
    assert ratings.for_skill("leadership") == {"s1": 1.0}
    assert ratings.for_skill("creativity") == {}
    assert ratings.put_many([]) == 0


def test_a_rating_repeated_in_one_call_keeps_the_last(stores: Stores) -> None:
    assert stores.ratings.put_many([rating("s1", 1.0), rating("s1", 4.0)]) == 2
    assert stores.ratings.for_skill(SKILL) == {"s1": 4.0}


def test_ratings_of_many_students_past_one_commit_and_one_page(stores: Stores) -> None:
    students = [f"s{i:04d}" for i in range(1100)]
    ratings = [rating(s, 1.0 + i % 5) for i, s in enumerate(students)]
    ratings += [rating(s, 5.0, rater="t-2") for s in students[:300]]
    assert stores.ratings.put_many(ratings) == 1400

    means = stores.ratings.for_skill(SKILL)

    assert len(means) == 1100
    assert means["s0000"] == pytest.approx(3.0) and means["s0299"] == pytest.approx((5.0 + 5.0) / 2)
    assert means["s0300"] == pytest.approx(1.0) and means["s1099"] == pytest.approx(5.0)


# -- drift check store --------------------------------------------------------------------------------------


def drift_check(check_id: str, created_at: str, psi: float = 0.05) -> dict[str, Any]:
    return {
        "check_id": check_id,
        "created_at": created_at,
        "window": {"days": 7, "from": D1, "to": D3},
        "skills": [
            {"skill": SKILL, "model_version": "1.0.0", "psi_prediction": psi, "teacher_correlation": None,
             "features": [{"feature": "word_count_total", "psi": 0.01, "ks": 0.2, "ks_pvalue": 1e-300}],
             "alerts": [], "labels": {"__prediction__": 1, "a.b": "ünï", "": [None, -0.0, 1.5e308]}},
        ],
        "report_uri": None,
    }


def test_drift_checks_get_and_latest(stores: Stores) -> None:
    checks = stores.drift_checks
    assert checks.latest() is None and checks.get("drift-a") is None

    first, newest, saved_last = drift_check("drift-a", T1), drift_check("drift-b", T3), drift_check("drift-c", T2)
    for check in (first, newest, saved_last):
        checks.save(check)

    assert checks.get("drift-a") == first
    assert checks.get("drift-c") == saved_last
    assert checks.latest() == newest  # by created_at, not by when it was saved
    assert checks.get("drift-z") is None


def test_saving_a_check_id_again_replaces_it(stores: Stores) -> None:
    checks = stores.drift_checks
    checks.save(drift_check("drift-a", T1))
    checks.save(drift_check("drift-b", T2))
    redone = drift_check("drift-a", T3, psi=0.3)
    checks.save(redone)

    assert checks.get("drift-a") == redone
    assert checks.latest() == redone


def test_checks_created_in_the_same_second_are_latest_by_check_id(stores: Stores) -> None:
    for check_id in ("drift-m", "drift-z", "drift-a"):
        stores.drift_checks.save(drift_check(check_id, T2))
    stores.drift_checks.save(drift_check("drift-zz", T1))
    latest = stores.drift_checks.latest()
    assert latest is not None and latest["check_id"] == "drift-z"


# -- Firestore: concurrency on the emulator -------------------------------------------------------------


class ReadTogether:
    """A registry backend that, on each thread's first update, holds decide until the other thread's
    decide has run too: both transactions have read the versions before either writes."""

    def __init__(self, inner: RegistryBackend, barrier: threading.Barrier) -> None:
        self.inner = inner
        self.barrier = barrier
        self.local = threading.local()
        self.interleaved = False

    def insert(self, version: ModelVersion) -> None:
        self.inner.insert(version)

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        return self.inner.list(skill)

    def update(self, skill: str, decide: Decide) -> None:
        def together(stored: list[ModelVersion]) -> Any:
            if not getattr(self.local, "waited", False):
                self.local.waited = True
                try:
                    self.barrier.wait()
                    self.interleaved = True
                except threading.BrokenBarrierError:
                    pass
            return decide(stored)

        self.inner.update(skill, together)


def test_concurrent_promotions_leave_exactly_one_production_version(firestore_database: FirestoreDatabase) -> None:
    """20 races at once, one skill each: two operators promote different versions of the skill; both
    transactions read before either writes; Firestore aborts one, which retries on the new state."""
    backend = FirestoreRegistryBackend(firestore_database)
    skills = [f"skill-{i:02d}" for i in range(20)]

    def set_up(skill: str) -> None:
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            backend.insert(model_version(version, skill=skill))
        ModelRegistry(backend).promote(skill, "1.0.0")

    with ThreadPoolExecutor(max_workers=len(skills)) as pool:
        list(pool.map(set_up, skills))
    racers = {skill: ReadTogether(backend, threading.Barrier(2, timeout=10)) for skill in skills}
    errors: list[BaseException] = []

    def promote(skill: str, version: str) -> None:
        try:
            ModelRegistry(racers[skill]).promote(skill, version)
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(s, v)) for s in skills for v in ("1.1.0", "1.2.0")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    assert all(racer.interleaved for racer in racers.values())
    for skill in skills:
        result = stages(backend, skill)
        production = [v for v, (stage, _) in result.items() if stage == "production"]
        assert len(production) == 1 and production[0] in ("1.1.0", "1.2.0"), result
        assert result["1.0.0"] == ("archived", 0.0)
        assert sum(traffic for _, traffic in result.values()) == pytest.approx(1.0)
        # The first to commit was promoted, then archived by the second: both served, in order.
        sequence = sorted((v.promotion_seq, v.version) for v in backend.list(skill) if v.promotion_seq)
        assert [v for _, v in sequence][-1] == production[0] and len(sequence) == 3


# -- Firestore: run creation larger than one commit ------------------------------------------------------


class CreatorDied(Exception):
    pass


class ChunksUntil(Sequence[Chunk]):
    """A run's chunks, handed out one by one; at `stop` the creator dies, or `at_stop` runs first."""

    def __init__(self, chunks: list[Chunk], stop: int, at_stop: Callable[[], None] | None = None) -> None:
        self.items = chunks
        self.stop = stop
        self.at_stop = at_stop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]

    def __iter__(self) -> Iterator[Chunk]:
        for i, chunk in enumerate(self.items):
            if i == self.stop:
                if self.at_stop is None:
                    raise CreatorDied
                self.at_stop()
            yield chunk


def test_a_creator_that_died_blocks_its_run_until_its_lease_expires(firestore_database: FirestoreDatabase) -> None:
    lease = 2.0
    runs = FirestoreRunStore(firestore_database, lease_seconds=lease)
    run, chunks = new_run("big", chunks=600, per_chunk=1)
    with pytest.raises(CreatorDied):
        runs.create(run, ChunksUntil(chunks, 550))  # after the first commit of 499 chunks
    died = time.monotonic()

    # Half-created: another creator is told to come back later, and the run reads as absent.
    smaller, smaller_chunks = new_run("big", chunks=300, per_chunk=2, started_at=T2)
    with pytest.raises(StoreUnavailable):
        runs.create(smaller, smaller_chunks)
    assert time.monotonic() - died < lease, "the machine is too slow for this test's lease"
    assert runs.get("big") is None and runs.chunks("big") == []
    with pytest.raises(NotFound):
        runs.record_chunk("big", 0, 1, [])

    time.sleep(max(0.0, lease + 0.1 - (time.monotonic() - died)))
    assert runs.create(smaller, smaller_chunks) is True  # the lease expired: taken over

    assert runs.get("big") == replace(smaller, finished_at=None)
    assert runs.chunks("big") == smaller_chunks  # not the dead creator's chunks 300..498
    assert runs.record_chunk("big", 450, 1, []).tasks_done == 0  # a leftover is not this run's
    assert runs.create(*new_run("big")) is False


def test_a_slow_creator_whose_lease_was_taken_over_stops(firestore_database: FirestoreDatabase) -> None:
    runs = FirestoreRunStore(firestore_database, lease_seconds=0.5)
    slow, slow_chunks = new_run("slow", chunks=600, per_chunk=1)
    taker, taker_chunks = new_run("slow", chunks=520, per_chunk=3, started_at=T2)
    took_over: list[bool] = []

    def stall_then_watch_a_takeover() -> None:
        time.sleep(0.6)
        took_over.append(runs.create(taker, taker_chunks))

    with pytest.raises(StoreUnavailable):
        runs.create(slow, ChunksUntil(slow_chunks, 499, stall_then_watch_a_takeover))

    assert took_over == [True]
    assert runs.get("slow") == replace(taker, finished_at=None)
    assert runs.chunks("slow") == taker_chunks


# -- Firestore: the client --------------------------------------------------------------------------------


def test_one_client_per_database_built_on_first_use(firestore_emulator: FirestoreEmulator) -> None:
    db = firestore_emulator.database()
    clients: list[object] = []
    barrier = threading.Barrier(8)

    def use() -> None:
        barrier.wait()
        clients.append(db.client)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(clients) == 8 and len({id(c) for c in clients}) == 1


def test_importing_the_firestore_stores_loads_no_google_client() -> None:
    code = (
        "import sys; before = set(sys.modules); import shared.gcp.firestore; "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('google', 'grpc'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


CLIENT_DEFAULT_SECONDS = 60  # how long the Firestore client retries a call, or waits for a transaction, unless told


def test_an_unreachable_firestore_is_store_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the port: every call answers StoreUnavailable (503, so the queue retries)
    once the deadline passes, instead of hanging or leaking a Google exception."""
    host = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", host)
    db = FirestoreDatabase("demo-skills", emulator_host=host, deadline_seconds=0.3)
    calls: list[Callable[[], object]] = [
        FirestoreFeatureStore(db).count,
        lambda: list(FirestoreFeatureStore(db).scan()),
        lambda: FirestoreFeatureStore(db).get_many(["s1"]),
        FirestoreRegistryBackend(db).list,
        lambda: FirestoreRegistryBackend(db).insert(model_version("1.0.0")),
        lambda: FirestoreAssessmentStore(db).latest("s1"),
        lambda: FirestoreRunStore(db).chunks("r1"),
        lambda: FirestoreProfileStore(db).put([profile_part("instance:a")]),
        lambda: FirestoreProfileStore(db).parts(SKILL, "1.0.0", [D1]),
        lambda: FirestoreTeacherRatingStore(db).put_many([rating("s1", 3.0)]),
        lambda: FirestoreTeacherRatingStore(db).for_skill(SKILL),
        lambda: FirestoreDriftCheckStore(db).save(drift_check("drift-a", T1)),
        lambda: FirestoreDriftCheckStore(db).get("drift-a"),
        FirestoreDriftCheckStore(db).latest,
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        # Not a speed target: without the database's deadline the client waits its own 60 s.
        assert time.monotonic() - started < CLIENT_DEFAULT_SECONDS / 2


# -- registry history (every backend) ----------------------------------------------------------------------


def history_event(action: str, *moves: tuple[str, tuple[str, float] | None, tuple[str, float]], **fields: Any) -> HistoryEvent:
    values: dict[str, Any] = dict(skill=SKILL, at=T2, action=action, actor="alice@school.example", reason=None, note=None)
    values.update(fields)
    changes = tuple(
        Transition(version, VersionState(*before) if before else None, VersionState(*after)) for version, before, after in moves
    )
    return HistoryEvent(changes=changes, **values)


def test_history_round_trips_every_field_numbered_from_1(stores: Stores) -> None:
    reserved = history_event("publish.reserve", ("1.0.0", None, ("reserved", 0)), reason="nightly retrain", note="é ✓")
    stores.registry.insert(model_version("1.0.0", stage="reserved"), reserved)
    promoted = history_event(
        "promote", ("1.0.0", ("reserved", 0.0), ("production", 1)), ("0.9.0", ("production", 1.0), ("archived", 0.0)), at=T3
    )
    stores.registry.update(SKILL, lambda stored: Decision({"1.0.0": StageChange("production", 1.0, T3, 1)}, promoted))

    history = stores.registry.history(SKILL)
    assert history == [replace(reserved, sequence=1), replace(promoted, sequence=2)]
    assert all(isinstance(t.after.traffic, float) for e in history for t in e.changes)
    assert stages(stores.registry) == {"1.0.0": ("production", 1.0)}
    assert stores.registry.history("leadership") == []


def test_an_update_without_an_event_records_nothing(stores: Stores) -> None:
    stores.registry.insert(model_version("1.0.0"))
    stores.registry.update(SKILL, lambda stored: {"1.0.0": StageChange("production", 1.0, T1, 1)})
    stores.registry.update(SKILL, lambda stored: Decision({}))
    assert stages(stores.registry) == {"1.0.0": ("production", 1.0)}
    assert stores.registry.history(SKILL) == []


@pytest.mark.parametrize("error", [Conflict("no"), RuntimeError("a bug in decide")])
def test_an_update_that_raises_writes_neither_its_changes_nor_its_event(stores: Stores, error: Exception) -> None:
    stores.registry.insert(model_version("1.0.0"), history_event("register", ("1.0.0", None, ("staging", 0.0))))
    before = stores.registry.list(SKILL), stores.registry.history(SKILL)

    def decide(stored: list[ModelVersion]) -> Decision:
        _ = Decision({"1.0.0": StageChange("production", 1.0, T1, 1)}, history_event("promote"))
        raise error

    with pytest.raises(type(error)):
        stores.registry.update(SKILL, decide)
    assert (stores.registry.list(SKILL), stores.registry.history(SKILL)) == before


def test_a_refused_insert_appends_no_event(stores: Stores) -> None:
    stores.registry.insert(model_version("1.0.0"), history_event("register", ("1.0.0", None, ("staging", 0.0))))
    with pytest.raises(Conflict):
        stores.registry.insert(model_version("1.0.0", sha256="99" * 32), history_event("register", ("1.0.0", None, ("staging", 0.0)), actor="mallory"))
    assert [(e.sequence, e.actor) for e in stores.registry.history(SKILL)] == [(1, "alice@school.example")]


def test_concurrent_changes_of_one_skill_number_their_events_without_gaps_or_repeats(stores: Stores) -> None:
    """Publishers inserting and an operator changing stages at once: every change that lands has its
    event, and each number is taken once: 1..n, no gaps."""
    stores.registry.insert(model_version("1.0.0"))
    barrier = threading.Barrier(7, timeout=10)
    errors: list[BaseException] = []

    def insert(version: str) -> None:
        try:
            barrier.wait()
            stores.registry.insert(model_version(version), history_event("publish.reserve", (version, None, ("reserved", 0.0))))
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)

    def promote() -> None:
        try:
            barrier.wait()
            event = history_event("promote", ("1.0.0", ("staging", 0.0), ("production", 1.0)))
            stores.registry.update(SKILL, lambda stored: Decision({"1.0.0": StageChange("production", 1.0, T1, 1)}, event))
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(f"2.{i}.0",)) for i in range(6)] + [threading.Thread(target=promote)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    history = stores.registry.history(SKILL)
    assert [e.sequence for e in history] == list(range(1, 8))
    assert sorted(e.changes[0].version for e in history) == ["1.0.0"] + [f"2.{i}.0" for i in range(6)]
    assert len(stores.registry.list(SKILL)) == 7


def test_registry_changes_on_an_unreachable_firestore_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client opens a transaction with no deadline of its own: the registry's changes must still
    answer StoreUnavailable within the database's deadline, not after a minute."""
    host = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", host)
    backend = FirestoreRegistryBackend(FirestoreDatabase("demo-skills", emulator_host=host, deadline_seconds=0.3))
    calls: list[Callable[[], object]] = [
        lambda: backend.update(SKILL, lambda stored: {}),
        lambda: backend.history(SKILL),
        lambda: backend.insert(model_version("1.0.0"), history_event("register", ("1.0.0", None, ("staging", 0.0)))),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        # Not a speed target: without the database's deadline the client waits its own 60 s.
        assert time.monotonic() - started < CLIENT_DEFAULT_SECONDS / 2
