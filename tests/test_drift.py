"""Drift checks: the statistics, serving profiles, teacher ratings, the check's verdicts on shifted and fresh data, the report."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from shared import batch
from shared.drift import DriftThresholds, VersionWindow, check_version, gather_window, run_drift_check
from shared.drift_statistics import (
    ReferenceProfile,
    fisher_z_difference,
    ks_two_sample,
    pearson,
    pearson_ci95,
    psi,
    spearman,
)
from shared.local_stack import ensure_demo_students
from shared.profiles import PREDICTION, ProfilePart, ServingProfiler, SqliteProfileStore, sum_parts, utc_day
from shared.ratings import SqliteTeacherRatingStore, TeacherRating, load_ratings_file
from shared.runs import Chunk, Run
from shared.services import Services
from shared.skill_model import SkillModel
from shared.sqlite import SqliteDatabase
from shared.synthetic import generate_cohort

SKILL = "leadership"


# -- statistics ---------------------------------------------------------------------------------------


def test_ks_on_quantile_bins_is_close_to_the_exact_two_sample_test() -> None:
    rng = np.random.default_rng(3)
    reference, current = rng.normal(size=1600), rng.normal(0.15, 1.0, size=1000)
    profile = ReferenceProfile.from_values(reference)
    statistic, pvalue = ks_two_sample(profile, profile.bin_counts(current))
    exact = stats.ks_2samp(reference, current)
    assert statistic == pytest.approx(exact.statistic, abs=0.012)
    assert pvalue == pytest.approx(exact.pvalue, rel=0.9, abs=1e-6)


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(4)
    profile = ReferenceProfile.from_values(rng.normal(size=1600))
    assert psi(profile, profile.bin_counts(rng.normal(size=1000))) < 0.05
    assert psi(profile, profile.bin_counts(rng.normal(1.0, 1.0, size=1000))) > 0.5


def test_correlations_match_scipy_and_the_fisher_interval_covers_r() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=300)
    y = np.rint(np.clip(3 + x + rng.normal(size=300), 1, 5))  # ties, as teacher ratings have
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    low, high = pearson_ci95(pearson(x, y), 300)
    assert low < pearson(x, y) < high
    z, p = fisher_z_difference(0.8, 400, 0.3, 400)
    assert z > 0 and p < 1e-6


def test_schema_one_deciles_still_make_a_profile() -> None:
    entry = {"edges": [0.0, 1.0, 2.0, 3.0], "proportions": [0.25, 0.5, 0.25]}
    profile = ReferenceProfile.from_metadata(entry, n=100)
    assert profile.counts.tolist() == [25, 50, 25]
    assert psi(profile, np.array([25, 50, 25])) == pytest.approx(0.0, abs=1e-9)


# -- serving profiles -----------------------------------------------------------------------------------


def test_a_process_replaces_its_own_part_at_each_flush(services: Services) -> None:
    model = services.engine.deployment(SKILL).production
    store = SqliteProfileStore(services.database)
    profiler = ServingProfiler(lambda: store, flush_seconds=3600)
    X = generate_cohort(services.catalog, 50, 21).matrix(services.catalog.skill(SKILL))
    profiler.observe_many(model, X, model.probabilities(X))
    profiler.flush()
    profiler.observe(model, list(X[0]), 0.5)
    profiler.flush()
    parts = store.parts(SKILL, model.version, [utc_day()])
    assert [p.source for p in parts] == [profiler.source]
    students, counts = sum_parts(parts)
    assert students == 51
    assert int(counts[PREDICTION].sum()) == 51
    assert all(int(c.sum()) == 51 for c in counts.values())


def test_online_inference_records_a_profile(services: Services, client) -> None:  # type: ignore[no-untyped-def]
    spec = services.catalog.skill(SKILL)
    features = {f.name: f.default for f in spec.features}
    for i in range(5):
        response = client.post("/api/v1/skills/infer", json={"student_id": f"s-{i}", "skill": SKILL, "features": features})
        assert response.status_code == 200
    services.profiler.flush()
    version = services.engine.deployment(SKILL).production.version
    students, _ = sum_parts(services.profiles.parts(SKILL, version, [utc_day()]))
    assert students == 5


# -- teacher ratings ------------------------------------------------------------------------------------


def test_ratings_load_from_csv_and_report_bad_rows_by_line(tmp_path: Path, services: Services) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(
        "student_id,skill,rating,rater\n"
        "s-1,leadership,4,t-1\n"
        "s-1,leadership,2,t-2\n"
        "s-2,leadership,7,t-1\n"
        "s-3,telepathy,3,t-1\n"
        ",leadership,3,t-1\n"
    )
    store = SqliteTeacherRatingStore(SqliteDatabase(tmp_path / "r.sqlite3"))
    report = load_ratings_file(store, services.catalog, path)
    assert report.accepted == 2
    assert [bad["line"] for bad in report.bad_rows] == [4, 5, 6]
    assert "rating must be a number from 1 to 5" in report.bad_rows[0]["problems"][0]
    assert store.for_skill(SKILL) == {"s-1": 3.0}  # two raters, averaged


def test_ratings_load_from_the_generator_jsonl(tmp_path: Path, services: Services) -> None:
    path = tmp_path / "cohort.jsonl"
    path.write_text(
        json.dumps({"student_id": "s-9", "features": {}, "teacher_ratings": {"leadership": 5, "creativity": 2}}) + "\n"
    )
    store = SqliteTeacherRatingStore(SqliteDatabase(tmp_path / "r.sqlite3"))
    assert load_ratings_file(store, services.catalog, path).accepted == 1
    assert store.for_skill("creativity") == {"s-9": 2.0}


# -- verdicts ---------------------------------------------------------------------------------------------


def _window(model: SkillModel, X: np.ndarray, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> VersionWindow:
    from shared.profiles import model_profile

    scores = model.probabilities(X)
    counts = model_profile(model).counts(X, scores)
    return VersionWindow(model, "production", len(X), counts, pairs)


@pytest.mark.parametrize("which", ["most important", "least important"])
def test_a_shift_of_three_features_is_flagged_on_exactly_those_features_and_the_prediction_when_it_moves(
    services: Services, which: str
) -> None:
    model = services.engine.deployment(SKILL).production
    spec = services.catalog.skill(SKILL)
    X = generate_cohort(services.catalog, 2000, 99).matrix(spec)
    baseline = check_version(_window(model, X.copy()), DriftThresholds())
    reference = model.metadata["reference"]["features"]
    by_gain = [item["feature"] for item in model.metadata["feature_importance"]]
    shifted = by_gain[:3] if which == "most important" else by_gain[-3:]
    for name in shifted:
        j = spec.feature_names.index(name)
        feature = next(f for f in spec.features if f.name == name)
        X[:, j] = np.clip(X[:, j] + reference[name]["std"], feature.min, feature.max)
    thresholds = DriftThresholds()
    result = check_version(_window(model, X), thresholds)
    flagged = {a["feature"] for a in result["alerts"] if a["kind"] == "feature_psi"}
    assert flagged == set(shifted)
    assert all(a["severity"] == "alert" for a in result["alerts"] if a["kind"] == "feature_psi")
    prediction = [a for a in result["alerts"] if a["kind"] == "prediction_psi"]
    if which == "most important":
        # The model leans on these features: its scores move, and the prediction is flagged too.
        assert result["psi_prediction"] >= thresholds.psi_warn > baseline["psi_prediction"]
        assert prediction and prediction[0]["value"] == result["psi_prediction"]
    else:
        # Features the model barely uses move while its scores stay put: no prediction alert.
        assert result["psi_prediction"] < thresholds.psi_warn
        assert prediction == []


def test_fresh_samples_from_the_training_distribution_raise_no_alert_in_19_of_20_repetitions(services: Services) -> None:
    models = [services.engine.deployment(skill).production for skill in services.catalog.names]
    quiet = 0
    for repetition in range(20):
        cohort = generate_cohort(services.catalog, 1000, 1000 + repetition)
        alerts = [
            alert
            for model in models
            for alert in check_version(_window(model, cohort.matrix(services.catalog.skill(model.skill))), DriftThresholds())["alerts"]
            if alert["severity"] == "alert"
        ]
        quiet += not alerts
    assert quiet >= 19


def test_too_few_students_is_insufficient_data_and_no_alert(services: Services) -> None:
    model = services.engine.deployment(SKILL).production
    X = generate_cohort(services.catalog, 40, 7).matrix(services.catalog.skill(SKILL)) * 3.0
    result = check_version(_window(model, X), DriftThresholds(min_students=100))
    assert result["status"] == "insufficient_data"
    assert result["alerts"] == [] and result["psi_prediction"] is None and result["features"] == []


def _score_everyone(services: Services, run_id: str) -> None:
    """A nightly run, in process: the dispatcher's run record, then every chunk through the worker's code."""
    ids = [s.student_id for s in services.features.scoring_states()]
    chunks = [Chunk(run_id, i, ids[s : s + 200]) for i, s in enumerate(range(0, len(ids), 200))]
    signature = batch.models_signature(batch.production_versions(services))
    services.runs.create(Run(run_id, True, signature, "", len(ids), len(chunks)), chunks)
    for chunk in chunks:
        batch.score_chunk(services, run_id, chunk.chunk, chunk.student_ids)


def test_teacher_agreement_holds_for_the_generator_and_alerts_when_ratings_are_permuted(services: Services) -> None:
    ensure_demo_students(services, count=600, seed=31)
    _score_everyone(services, "drift-ratings")
    model = services.engine.deployment(SKILL).production
    days = [utc_day()]
    correlation = check_version(gather_window(services, model, "production", days), DriftThresholds())["teacher_correlation"]
    assert correlation is not None and correlation["n"] == 600
    assert correlation["pearson"] > 0.5
    ratings = services.ratings.for_skill(SKILL)
    students = sorted(ratings)
    permuted = np.random.default_rng(8).permutation([ratings[s] for s in students])
    services.ratings.put_many(
        [TeacherRating(s, SKILL, float(r), "2026-01-01T00:00:00Z", "demo-teacher") for s, r in zip(students, permuted)]
    )
    result = check_version(gather_window(services, model, "production", days), DriftThresholds())
    assert result["teacher_correlation"]["pearson"] < 0.5
    assert [a["kind"] for a in result["alerts"] if a["kind"] == "teacher_correlation"] == ["teacher_correlation"]


def test_a_check_stores_its_result_and_a_report_with_one_png_per_chart(services: Services) -> None:
    ensure_demo_students(services, count=300, seed=32)
    _score_everyone(services, "drift-report")
    check = run_drift_check(services, 1, [SKILL, "creativity"])
    assert services.drift_checks.latest() == check
    assert [entry["skill"] for entry in check["skills"]] == [SKILL, "creativity"]
    entry = check["skills"][0]
    assert entry["students"] == 300 and entry["status"] == "ok"
    assert {"feature", "psi", "ks", "ks_pvalue"} <= set(entry["features"][0])
    html = Path(check["report_uri"].removeprefix("file://")).read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    # per skill: PSI bars, the prediction and the three most drifted features, scores against ratings
    assert len(images) == 2 * 6
    for data in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        assert Image.open(io.BytesIO(png)).format == "PNG"
    assert "http://" not in html and "https://" not in html  # nothing is fetched


def test_chunk_profiles_are_written_once_per_chunk_even_when_retried(services: Services) -> None:
    ensure_demo_students(services, count=200, seed=33)
    _score_everyone(services, "drift-chunks")
    version = services.engine.deployment(SKILL).production.version
    before = services.profiles.parts(SKILL, version, [utc_day()])
    batch.score_chunk(services, "drift-chunks", 0, services.runs.chunks("drift-chunks")[0].student_ids, attempt=1)
    after = services.profiles.parts(SKILL, version, [utc_day()])
    assert [(p.source, p.students) for p in after] == [(p.source, p.students) for p in before]
    assert sum_parts(after)[0] == 200


def test_parts_of_other_days_are_outside_the_window(tmp_path: Path) -> None:
    store = SqliteProfileStore(SqliteDatabase(tmp_path / "p.sqlite3"))
    store.put([ProfilePart("x", "1.0.0", "2026-01-01", "instance:a", 3, {PREDICTION: [3]}, "t")])
    store.put([ProfilePart("x", "1.0.0", "2026-01-02", "instance:a", 4, {PREDICTION: [4]}, "t")])
    assert sum_parts(store.parts("x", "1.0.0", ["2026-01-02"]))[0] == 4


def test_a_model_published_with_schema_one_metadata_still_loads_and_is_checked(
    services: Services, trained_dir: Path, tmp_path: Path
) -> None:
    from shared.artifacts import METADATA_FILE
    from shared.publishing import publish_version

    folder = tmp_path / SKILL
    folder.mkdir()
    for path in (trained_dir / SKILL).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["schema_version"] = 1
    for entry in [*metadata["reference"]["features"].values(), metadata["reference"]["prediction"]]:
        entry.pop("quantiles")
        entry.pop("counts")
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    record = publish_version(services.registry, services.artifacts, folder, force=True)
    services.registry.promote(SKILL, record.version)
    services.engine.refresh(force=True)
    model = services.engine.deployment(SKILL).production
    assert (model.version, model.metadata["schema_version"]) == (record.version, 1)
    X = generate_cohort(services.catalog, 500, 41).matrix(services.catalog.skill(SKILL))
    result = check_version(_window(model, X), DriftThresholds())
    assert result["status"] == "ok" and result["alerts"] == []
    assert len(result["features"]) == len(model.feature_names)


# -- over HTTP ---------------------------------------------------------------------------------------------


def test_the_drift_function_answers_the_check_and_both_reads_return_it(services: Services, client) -> None:  # type: ignore[no-untyped-def]
    from tests.openapi_contract import assert_matches_spec

    ensure_demo_students(services, count=200, seed=34)
    _score_everyone(services, "drift-http")
    response = client.post("/tasks/drift-check", json={"window_days": 2, "skills": [SKILL]})
    assert response.status_code == 200, response.get_json()
    check = response.get_json()
    assert_matches_spec("POST", "/tasks/drift-check", 200, check)
    assert check["window"]["days"] == 2 and [s["skill"] for s in check["skills"]] == [SKILL]
    for path in ("/api/v1/drift/checks/latest", f"/api/v1/drift/checks/{check['check_id']}"):
        read = client.get(path)
        assert read.status_code == 200 and read.get_json() == check
        assert_matches_spec("GET", path, 200, read.get_json())
    missing = client.get("/api/v1/drift/checks/drift-nope")
    assert missing.status_code == 404
    assert_matches_spec("GET", "/api/v1/drift/checks/drift-nope", 404, missing.get_json())


@pytest.mark.parametrize(
    "body, field",
    [
        ({"window_days": 0}, "window_days"),
        ({"window_days": 91}, "window_days"),
        ({"window_days": True}, "window_days"),
        ({"skills": []}, "skills"),
        ({"skills": ["telepathy"]}, "skills"),
        ({"skills": "leadership"}, "skills"),
        ([], "body"),
    ],
)
def test_a_bad_drift_request_names_its_field(client, body: object, field: str) -> None:  # type: ignore[no-untyped-def]
    from tests.openapi_contract import assert_matches_spec

    response = client.post("/tasks/drift-check", json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and error["details"][0]["field"] == field
    assert_matches_spec("POST", "/tasks/drift-check", 400, response.get_json())


def test_the_drift_function_runs_alone_under_functions_framework(services: Services) -> None:
    from functions_framework import create_app

    from shared.settings import PROJECT_ROOT

    app = create_app("drift_check", str(PROJECT_ROOT / "functions" / "main.py"))
    response = app.test_client().post("/", json={"window_days": 1, "skills": [SKILL]})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["skills"][0]["status"] == "insufficient_data"
