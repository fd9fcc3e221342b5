"""The feature store (SQLite) and feature file loading: merges, change tracking, scan paging, bad rows by line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.catalog import SkillCatalog
from shared.feature_store import (
    LoadReport,
    ScoredMarker,
    SqliteFeatureStore,
    features_hash,
    load_feature_file,
)
from shared.settings import PROJECT_ROOT
from shared.sqlite import SqliteDatabase

LOAD_SCRIPT = PROJECT_ROOT / "scripts" / "load_features.py"


@pytest.fixture
def store(tmp_path: Path) -> SqliteFeatureStore:
    return SqliteFeatureStore(SqliteDatabase(tmp_path / "features.sqlite3"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def bad_lines(report: LoadReport) -> dict[int, list[str]]:
    return {bad["line"]: bad["problems"] for bad in report.bad_rows}


# -- the store -------------------------------------------------------------------------------------


def test_upsert_creates_then_merges_new_values_into_the_stored_ones(store: SqliteFeatureStore) -> None:
    assert store.upsert({"s1": {"a": 1.0, "b": 2.0}, "s2": {"a": 5.0}}) == 2

    assert store.upsert({"s1": {"b": 3.0, "c": 4.0}}) == 1

    stored = store.get_many(["s1", "s2"])
    assert stored["s1"].features == {"a": 1.0, "b": 3.0, "c": 4.0}
    assert stored["s1"].features_hash == features_hash({"a": 1.0, "b": 3.0, "c": 4.0})
    assert stored["s2"].features == {"a": 5.0}
    assert store.count() == 2


def test_upsert_bumps_updated_at_and_hash_only_when_a_value_changes(store: SqliteFeatureStore) -> None:
    store.upsert({"s1": {"a": 1.0, "b": 2.0}, "s2": {"a": 1.0}})
    before = store.get_many(["s1", "s2"])
    time.sleep(0.01)  # timestamps have millisecond precision

    assert store.upsert({"s1": {"a": 1.0, "b": 2.0}}) == 0  # the same values
    assert store.upsert({"s1": {"b": 2.0}, "s2": {"a": 1.0}}) == 0  # a subset of the same values
    unchanged = store.get_many(["s1", "s2"])
    assert unchanged == before

    assert store.upsert({"s1": {"b": 2.5}, "s2": {"a": 1.0}}) == 1
    after = store.get_many(["s1", "s2"])
    assert after["s1"].updated_at > before["s1"].updated_at
    assert after["s1"].features_hash != before["s1"].features_hash
    assert after["s2"] == before["s2"]


def test_get_many_returns_only_stored_students_across_query_pages(store: SqliteFeatureStore) -> None:
    store.upsert({f"s{i:04d}": {"a": float(i)} for i in range(1200)})
    wanted = [f"s{i:04d}" for i in range(0, 1200, 2)] + ["absent-1", "absent-2"]

    found = store.get_many(wanted)

    assert set(found) == {f"s{i:04d}" for i in range(0, 1200, 2)}
    assert found["s0998"].features == {"a": 998.0}
    assert store.get_many([]) == {}


def test_scan_yields_every_student_once_ordered_by_id_past_one_page(store: SqliteFeatureStore) -> None:
    ids = [f"student-{i:05d}" for i in range(2345)] + ["A", "a", "a-1", "z_9"]
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    for start in range(0, len(shuffled), 700):
        store.upsert({sid: {"x": 1.0} for sid in shuffled[start : start + 700]})

    scanned = [s.student_id for s in store.scan()]

    assert scanned == sorted(ids)
    assert len(scanned) == store.count() == len(ids)


def test_scan_of_an_empty_store_yields_nothing(store: SqliteFeatureStore) -> None:
    assert list(store.scan()) == []


def test_mark_scored_and_needs_scoring_follow_features_and_model_signature(store: SqliteFeatureStore) -> None:
    store.upsert({"s1": {"a": 1.0}, "s2": {"a": 2.0}})
    s1 = store.get_many(["s1"])["s1"]
    assert s1.needs_scoring("m=1.0.0")  # never scored

    store.mark_scored([ScoredMarker("s1", s1.features_hash, "m=1.0.0"), ScoredMarker("ghost", "h", "m=1.0.0")])

    stored = store.get_many(["s1", "s2", "ghost"])
    assert set(stored) == {"s1", "s2"}  # a marker for a student not stored creates nothing
    assert stored["s1"].scored_hash == s1.features_hash
    assert stored["s1"].scored_models == "m=1.0.0"
    assert not stored["s1"].needs_scoring("m=1.0.0")
    assert stored["s1"].needs_scoring("m=1.1.0")  # a model version changed
    assert stored["s2"].needs_scoring("m=1.0.0")

    store.upsert({"s1": {"a": 1.0}})  # the same value: still scored
    assert not store.get_many(["s1"])["s1"].needs_scoring("m=1.0.0")

    store.upsert({"s1": {"a": 1.5}})  # a changed value: needs scoring again
    changed = store.get_many(["s1"])["s1"]
    assert changed.scored_hash == s1.features_hash  # the marker itself is kept
    assert changed.needs_scoring("m=1.0.0")


# -- loading files -----------------------------------------------------------------------------------


def test_load_jsonl_reports_each_bad_row_by_line_and_loads_the_rest(
    store: SqliteFeatureStore, catalog: SkillCatalog, tmp_path: Path
) -> None:
    path = write_lines(
        tmp_path / "students.jsonl",
        [
            json.dumps({"student_id": "good-1", "features": {"word_count_total": 1200, "lexical_diversity": 0.5},
                        "teacher_ratings": {"communication": 4}}),
            "",
            '{"student_id": "broken", "features": {',
            "[1, 2, 3]",
            json.dumps({"features": {"word_count_total": 10}}),
            json.dumps({"student_id": "x" * 129, "word_count_total": 10}),
            json.dumps({"student_id": "not-number", "features": {"word_count_total": "lots"}}),
            json.dumps({"student_id": "out-of-range", "features": {"lexical_diversity": 1.5}}),
            json.dumps({"student_id": "good-2", "word_count_total": 300, "quiz_score_improvement_after_retry_points": -5,
                        "teacher_ratings": {"communication": 2}, "favourite_colour": "blue"}),
            json.dumps({"student_id": "good-3", "features": {"active_days_per_week": 7}}),
        ],
    )

    report = load_feature_file(store, catalog, path)

    bad = bad_lines(report)
    assert sorted(bad) == [3, 4, 5, 6, 7, 8]
    assert "not valid JSON" in bad[3][0]
    assert bad[4] == ["must be a JSON object"]
    assert bad[5] == ["student_id: must be 1 to 128 characters"]
    assert bad[6] == ["student_id: must be 1 to 128 characters"]
    assert bad[7][0].startswith("word_count_total: must be a number")
    assert bad[8][0].startswith("lexical_diversity: must be between 0 and 1")
    assert report.rows == 9  # the blank line is not a row
    assert report.accepted == report.changed == 3
    assert report.unknown_columns == ["favourite_colour"]  # teacher_ratings is known not to be a feature

    stored = store.get_many(["good-1", "good-2", "good-3", "not-number", "out-of-range"])
    assert set(stored) == {"good-1", "good-2", "good-3"}
    assert stored["good-1"].features == {"word_count_total": 1200.0, "lexical_diversity": 0.5}
    assert stored["good-2"].features == {"word_count_total": 300.0, "quiz_score_improvement_after_retry_points": -5.0}
    assert "teacher_ratings" not in stored["good-2"].features


def test_load_csv_reports_each_bad_row_by_line_and_loads_the_rest(
    store: SqliteFeatureStore, catalog: SkillCatalog, tmp_path: Path
) -> None:
    path = write_lines(
        tmp_path / "students.csv",
        [
            "student_id,word_count_total,lexical_diversity,mystery_column",
            "good-1,1200,0.5,abc",
            "nan-text,NaN,0.5,",
            "out-of-range,-1,0.5,",
            ",100,0.5,",
            "not-number,12k,0.5,",
            "good-2,300,,x",
            "infinite,inf,0.5,",
        ],
    )

    report = load_feature_file(store, catalog, path)

    bad = bad_lines(report)
    assert sorted(bad) == [3, 4, 5, 6, 8]
    assert bad[3] == ["word_count_total: must be a finite number"]
    assert bad[4][0].startswith("word_count_total: must be between 0 and 50000")
    assert bad[5] == ["student_id: must be 1 to 128 characters"]
    assert bad[6][0].startswith("word_count_total: must be a number")
    assert bad[8] == ["word_count_total: must be a finite number"]
    assert report.rows == 7
    assert report.accepted == report.changed == 2
    assert report.unknown_columns == ["mystery_column"]
    stored = store.get_many(["good-1", "good-2", "nan-text"])
    assert set(stored) == {"good-1", "good-2"}
    assert stored["good-2"].features == {"word_count_total": 300.0}  # an empty cell is no value


def test_load_csv_reports_a_row_with_more_cells_than_the_header(
    store: SqliteFeatureStore, catalog: SkillCatalog, tmp_path: Path
) -> None:
    """csv.DictReader files surplus cells under the key None; such a row is reported, not a crash."""
    path = write_lines(
        tmp_path / "ragged.csv",
        ["student_id,word_count_total,mystery_column", "good-1,100,a", "ragged,200,b,surplus", "good-2,300,c"],
    )

    report = load_feature_file(store, catalog, path)

    assert [bad["line"] for bad in report.bad_rows] == [3]
    assert report.unknown_columns == ["mystery_column"]
    assert set(store.get_many(["good-1", "ragged", "good-2"])) == {"good-1", "good-2"}


def test_loading_the_same_file_twice_changes_nothing_the_second_time(
    store: SqliteFeatureStore, catalog: SkillCatalog, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "s.csv", ["student_id,word_count_total", "a,1", "b,2", "c,3"])

    first = load_feature_file(store, catalog, path, batch_size=2)
    second = load_feature_file(store, catalog, path, batch_size=2)

    assert (first.accepted, first.changed) == (3, 3)
    assert (second.accepted, second.changed) == (3, 0)


# -- scripts/load_features.py ----------------------------------------------------------------------------


def run_load_script(path: Path, database: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": str(database),
        "ARTIFACT_STORE": str(database.parent / "artifacts"),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    return subprocess.run(
        [sys.executable, str(LOAD_SCRIPT), str(path)],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )


def test_load_script_exits_1_naming_the_bad_line_and_0_for_a_clean_file(tmp_path: Path) -> None:
    database = tmp_path / "script.sqlite3"
    bad = write_lines(tmp_path / "bad.csv", ["student_id,word_count_total", "a,1", "b,-5", "c,3"])
    clean = write_lines(tmp_path / "clean.jsonl", [json.dumps({"student_id": "d", "features": {"word_count_total": 4}})])

    failed = run_load_script(bad, database)
    assert failed.returncode == 1, failed.stderr
    assert "line 3: word_count_total: must be between 0 and 50000" in failed.stderr
    assert json.loads(failed.stdout) == {
        "rows": 3, "accepted": 2, "changed": 2, "rejected": 1, "unknown_columns": [], "incomplete": 2
    }
    # One feature is not a whole student: the skills that require others would fail on them at night.
    assert "warning: line 2: student a lacks required features" in failed.stderr

    passed = run_load_script(clean, database)
    assert passed.returncode == 0, passed.stderr
    assert "line 1: " not in passed.stderr.replace("warning: line 1: student d", "")
    assert json.loads(passed.stdout)["accepted"] == 1

    loaded = SqliteFeatureStore(SqliteDatabase(database)).get_many(["a", "b", "c", "d"])
    assert set(loaded) == {"a", "c", "d"}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_row_that_is_not_utf8_is_reported_by_line_and_the_rest_load(
    store: SqliteFeatureStore, catalog: SkillCatalog, tmp_path: Path, suffix: str
) -> None:
    if suffix == ".csv":
        lines = [b"student_id,word_count_total", b"good-1,100", b"bad-\xff\xfe,200", b"good-2,300"]
    else:
        lines = [
            b'{"student_id": "good-1", "features": {"word_count_total": 100}}',
            b'{"student_id": "bad-\xff\xfe", "features": {"word_count_total": 200}}',
            b'{"student_id": "good-2", "features": {"word_count_total": 300}}',
        ]
    path = tmp_path / f"mixed{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")

    report = load_feature_file(store, catalog, path)

    assert bad_lines(report) == {3 if suffix == ".csv" else 2: ["is not valid UTF-8"]}
    assert set(store.get_many(["good-1", "good-2"])) == {"good-1", "good-2"}


def test_a_student_id_with_a_lone_surrogate_is_a_bad_row(
    store: SqliteFeatureStore, catalog: SkillCatalog, tmp_path: Path
) -> None:
    path = write_lines(
        tmp_path / "surrogate.jsonl",
        ['{"student_id": "s-\\ud800", "features": {}}', '{"student_id": "fine", "features": {}}'],
    )

    report = load_feature_file(store, catalog, path)

    assert list(bad_lines(report)) == [1]
    assert report.accepted == 1


def test_a_student_left_without_a_required_feature_is_warned_about_and_refused_with_strict(
    tmp_path: Path, catalog: SkillCatalog
) -> None:
    required = {spec.skill: [f.name for f in spec.features if f.required] for spec in catalog}
    skill, names = next((s, n) for s, n in required.items() if n)
    everything = {f.name: f.default for spec in catalog for f in spec.features}
    partial = {k: v for k, v in everything.items() if k != names[0]}
    path = write_lines(
        tmp_path / "rows.jsonl",
        [json.dumps({"student_id": "whole", "features": everything}), json.dumps({"student_id": "partial", "features": partial})],
    )
    store = SqliteFeatureStore(SqliteDatabase(tmp_path / "warn.sqlite3"))
    report = load_feature_file(store, catalog, path)
    assert report.accepted == 2 and store.count() == 2
    [warning] = report.incomplete
    assert warning["line"] == 2 and warning["student_id"] == "partial" and names[0] in warning["missing"][skill]

    # Features already stored count: a later update of one feature is not incomplete.
    update = write_lines(tmp_path / "update.jsonl", [json.dumps({"student_id": "whole", "features": {names[0]: everything[names[0]]}})])
    assert load_feature_file(store, catalog, update).incomplete == []

    strict_store = SqliteFeatureStore(SqliteDatabase(tmp_path / "strict.sqlite3"))
    strict = load_feature_file(strict_store, catalog, path, strict=True)
    assert strict.accepted == 1 and strict_store.count() == 1
    assert [bad["line"] for bad in strict.bad_rows] == [2]
    assert "missing" in strict.bad_rows[0]["problems"][0]


def test_seeding_demo_students_leaves_no_temporary_folder_even_when_loading_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import shared.ratings
    from shared.local_stack import ensure_demo_students
    from shared.services import Services
    from shared.settings import Settings

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seeded = Services(Settings.from_env({"DATABASE_URL": str(tmp_path / "seeded.sqlite3"), "ARTIFACT_STORE": str(tmp_path / "a")}))
    assert ensure_demo_students(seeded, 5) == 5
    assert list(scratch.iterdir()) == []

    def broken_loader(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the ratings loader broke")

    monkeypatch.setattr(shared.ratings, "load_ratings_file", broken_loader)
    failing = Services(Settings.from_env({"DATABASE_URL": str(tmp_path / "failing.sqlite3"), "ARTIFACT_STORE": str(tmp_path / "b")}))
    with pytest.raises(RuntimeError):
        ensure_demo_students(failing, 5)
    assert list(scratch.iterdir()) == []
