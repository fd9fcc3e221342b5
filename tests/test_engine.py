"""The inference engine against the published artifacts: exact scores, explanations, batches, integrity, threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost

from shared.artifacts import ARTIFACT_FILES, BOOSTER_FILE, METADATA_FILE, ONNX_FILE, SCALER_FILE, read_verified, version_key
from shared.catalog import SkillCatalog, SkillSpec
from shared.engine import InferenceEngine, InferenceRequest, parse_inference_request
from shared.errors import ModelUnavailable, ServiceError, StoreUnavailable, UnknownSkill, ValidationError
from shared.publishing import publish_version
from shared.registry import ModelRegistry, ModelVersion
from shared.services import Services
from shared.settings import Settings
from shared.synthetic import generate_cohort

N_STUDENTS = 50


class Exported:
    """One published version read back from the store and scored with XGBoost alone, as a reference."""

    def __init__(self, services: Services, record: ModelVersion) -> None:
        files = {
            name: read_verified(services.artifacts, record.artifact_uri, record.checksums, name)
            for name in ARTIFACT_FILES
        }
        scaler = json.loads(files[SCALER_FILE])
        self.feature_names = scaler["feature_names"]
        self.mean = np.asarray(scaler["mean"], dtype=np.float64)
        self.scale_ = np.asarray(scaler["scale"], dtype=np.float64)
        self.metadata = json.loads(files[METADATA_FILE])
        self.booster = xgboost.Booster()
        self.booster.load_model(bytearray(files[BOOSTER_FILE]))

    def scale(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale_).astype(np.float32)

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        return self.booster.inplace_predict(self.scale(X)).astype(np.float64)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        return self.booster.predict(xgboost.DMatrix(self.scale(X)), pred_contribs=True)

    def margins(self, X: np.ndarray) -> np.ndarray:
        return self.booster.predict(xgboost.DMatrix(self.scale(X)), output_margin=True)


def _students(catalog: SkillCatalog, spec: SkillSpec, seed: int, n: int = N_STUDENTS) -> tuple[np.ndarray, list[InferenceRequest]]:
    cohort = generate_cohort(catalog, n, seed, id_prefix=f"{spec.skill}-{seed}")
    X = cohort.matrix(spec)
    requests = [
        InferenceRequest(student_id, spec.skill, {name: float(X[i, j]) for j, name in enumerate(spec.feature_names)})
        for i, student_id in enumerate(cohort.student_ids)
    ]
    return X, requests


def _production(services: Services, skill: str) -> ModelVersion:
    return services.registry.serving()[skill][0]


# -- exact scores --------------------------------------------------------------------------------


def test_served_scores_equal_xgboost_on_the_exported_artifacts(services: Services, catalog: SkillCatalog) -> None:
    engine = services.engine
    for n, spec in enumerate(catalog):
        exported = Exported(services, _production(services, spec.skill))
        assert exported.feature_names == list(spec.feature_names)
        X, requests = _students(catalog, spec, seed=100 + n)
        expected = exported.probabilities(X)
        results = [engine.infer(r) for r in requests]
        served = np.array([r["score"] for r in results])
        assert np.max(np.abs(served - expected)) <= 1e-6, spec.skill
        # Not a constant model: the students get different scores.
        assert np.ptp(expected) > 0.1, spec.skill
        for result, request in zip(results, requests):
            assert result["student_id"] == request.student_id
            assert result["skill"] == spec.skill
            assert result["model_version"] == "1.0.0"
            assert result["imputed"] == [] and result["ignored"] == []
            assert result["confidence"] == pytest.approx(abs(2 * result["score"] - 1), abs=1e-12)
            assert 0.0 <= result["confidence"] <= 1.0


def test_imputed_features_score_as_their_defaults(services: Services, catalog: SkillCatalog) -> None:
    spec = catalog.skill("creativity")
    exported = Exported(services, _production(services, spec.skill))
    features = {f.name: f.default for f in spec.features if f.required}
    result = services.engine.infer(InferenceRequest("s-1", spec.skill, {**features, "shoe_size": 42}))
    expected = exported.probabilities(np.array([[f.default for f in spec.features]]))[0]
    assert result["score"] == pytest.approx(expected, abs=1e-6)
    assert result["imputed"] == [f.name for f in spec.features if not f.required]
    assert result["ignored"] == ["shoe_size"]


def test_feature_importance_is_the_top_five_of_the_metadata(services: Services, catalog: SkillCatalog) -> None:
    for spec in catalog:
        exported = Exported(services, _production(services, spec.skill))
        _, requests = _students(catalog, spec, seed=7, n=1)
        importance = services.engine.infer(requests[0])["feature_importance"]
        assert len(importance) == 5
        weights = [item["importance"] for item in importance]
        assert weights == sorted(weights, reverse=True)
        assert importance == exported.metadata["feature_importance"][:5]
        assert {item["feature"] for item in importance} <= set(spec.feature_names)


def test_explanations_are_exact_treeshap(services: Services, catalog: SkillCatalog) -> None:
    for n, spec in enumerate(catalog):
        exported = Exported(services, _production(services, spec.skill))
        X, requests = _students(catalog, spec, seed=300 + n, n=10)
        contribs = exported.contributions(X)
        margins = exported.margins(X)
        # Exact TreeSHAP: every feature's contribution plus the bias adds up to the margin.
        assert np.allclose(contribs.sum(axis=1), margins, atol=1e-4), spec.skill
        for i, request in enumerate(requests):
            result = services.engine.infer(InferenceRequest(request.student_id, spec.skill, request.features, explain=True))
            top = result["contributions"]
            assert len(top) == 5
            names = [item["feature"] for item in top]
            assert len(set(names)) == 5 and set(names) <= set(spec.feature_names)
            for item in top:
                j = spec.feature_names.index(item["feature"])
                assert item["value"] == request.features[item["feature"]]
                assert item["contribution"] == pytest.approx(float(contribs[i, j]), abs=1e-5)
            # The five are the largest in magnitude, largest first.
            magnitudes = [abs(item["contribution"]) for item in top]
            assert magnitudes == sorted(magnitudes, reverse=True)
            rest = np.delete(np.abs(contribs[i, :-1]), [spec.feature_names.index(x) for x in names])
            assert min(magnitudes) >= rest.max() - 1e-5


def test_no_contributions_unless_asked(services: Services, catalog: SkillCatalog) -> None:
    _, requests = _students(catalog, catalog.skill("leadership"), seed=5, n=1)
    assert "contributions" not in services.engine.infer(requests[0])


# -- batches -------------------------------------------------------------------------------------


def test_infer_many_scores_a_mixed_batch_with_per_item_errors(services: Services, catalog: SkillCatalog) -> None:
    batch: list[InferenceRequest] = []
    for n, skill in enumerate(["communication", "leadership", "creativity", "communication"]):
        _, requests = _students(catalog, catalog.skill(skill), seed=400 + n, n=3)
        batch.extend(requests)
    batch[4] = InferenceRequest(batch[4].student_id, batch[4].skill, batch[4].features, explain=True)
    bad_features = dict(batch[7].features)
    bad_features[catalog.skill(batch[7].skill).feature_names[0]] = "lots"
    batch[7] = InferenceRequest(batch[7].student_id, batch[7].skill, bad_features)
    batch.append(InferenceRequest("nobody", "juggling", {}))

    results = services.engine.infer_many(batch)
    assert len(results) == len(batch)
    assert isinstance(results[7], ValidationError)
    assert results[7].problems[0]["field"] == f"features.{catalog.skill(batch[7].skill).feature_names[0]}"
    assert isinstance(results[-1], UnknownSkill)
    for i, (request, result) in enumerate(zip(batch, results)):
        if i in (7, len(batch) - 1):
            continue
        assert not isinstance(result, ServiceError), result
        single = services.engine.infer(request)
        assert result["student_id"] == request.student_id
        assert result["skill"] == request.skill
        assert result["score"] == pytest.approx(single["score"], abs=1e-9)
        assert ("contributions" in result) == request.explain
        if request.explain:
            assert [c["feature"] for c in result["contributions"]] == [c["feature"] for c in single["contributions"]]
            for got, want in zip(result["contributions"], single["contributions"]):
                assert got["value"] == want["value"]
                assert got["contribution"] == pytest.approx(want["contribution"], abs=1e-6)


def test_infer_many_of_nothing(services: Services) -> None:
    assert services.engine.infer_many([]) == []


# -- integrity and availability ------------------------------------------------------------------


def test_a_tampered_artifact_is_refused_and_the_old_version_keeps_serving(
    services: Services, catalog: SkillCatalog, trained_dir: Path
) -> None:
    skill = "critical_thinking"
    engine = services.engine
    _, requests = _students(catalog, catalog.skill(skill), seed=11, n=3)
    before = [engine.infer(r)["score"] for r in requests]

    record = publish_version(services.registry, services.artifacts, trained_dir / skill, force=True)
    assert record.version == "1.1.0"
    key = version_key(skill, record.version) + ONNX_FILE
    original = services.artifacts.get(services.artifacts.uri_for(key))
    services.artifacts.put(key, original[:-16] + b"\x00" * 16)
    services.registry.promote(skill, record.version)
    engine.refresh(force=True)

    for request, score in zip(requests, before):
        result = engine.infer(request)
        assert result["model_version"] == "1.0.0"
        assert result["score"] == score
    versions, problems = engine.status()
    assert versions[skill] == "1.0.0"
    assert set(problems) == {skill}
    assert "1.1.0" in problems[skill]
    assert all(versions[s] == "1.0.0" for s in catalog.names)

    # Once the artifact is repaired, the next check loads the new version.
    services.artifacts.put(key, original)
    engine.refresh(force=True)
    versions, problems = engine.status()
    assert (versions[skill], problems) == ("1.1.0", {})
    assert engine.infer(requests[0])["model_version"] == "1.1.0"


def test_a_version_promoted_with_a_tampered_metadata_is_refused(
    services: Services, catalog: SkillCatalog, trained_dir: Path
) -> None:
    skill = "self_regulation"
    assert services.engine.status()[0][skill] == "1.0.0"  # loaded before the bad version arrives
    record = publish_version(services.registry, services.artifacts, trained_dir / skill, force=True)
    key = version_key(skill, record.version) + METADATA_FILE
    metadata = json.loads(services.artifacts.get(services.artifacts.uri_for(key)))
    metadata["feature_importance"] = metadata["feature_importance"][::-1]
    services.artifacts.put(key, json.dumps(metadata).encode())
    services.registry.promote(skill, record.version)
    services.engine.refresh(force=True)
    versions, problems = services.engine.status()
    assert versions[skill] == "1.0.0"
    assert skill in problems


def test_an_unknown_skill(services: Services, catalog: SkillCatalog) -> None:
    with pytest.raises(UnknownSkill) as caught:
        services.engine.infer(InferenceRequest("s-1", "juggling", {}))
    assert caught.value.details == {"valid_skills": catalog.names}
    with pytest.raises(UnknownSkill):
        parse_inference_request({"student_id": "s-1", "skill": "juggling", "features": {}}, catalog)


def test_parse_inference_request_names_every_bad_field(catalog: SkillCatalog) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_inference_request({"student_id": "", "skill": 3, "features": [], "explain": "yes"}, catalog)
    assert {p["field"] for p in caught.value.problems} == {"student_id", "skill", "features", "explain"}
    with pytest.raises(ValidationError):
        parse_inference_request({"student_id": "x" * 129, "skill": "leadership", "features": {}}, catalog)
    with pytest.raises(ValidationError):
        parse_inference_request(["not", "an", "object"], catalog)
    request = parse_inference_request({"student_id": "s", "skill": "leadership", "features": {"a": 1}}, catalog)
    assert request == InferenceRequest("s", "leadership", {"a": 1}, False)


def test_a_skill_without_production_is_unavailable(tmp_path: Path, catalog: SkillCatalog) -> None:
    empty = Services(
        Settings.from_env({"ARTIFACT_STORE": str(tmp_path / "a"), "DATABASE_URL": str(tmp_path / "db.sqlite3")})
    )
    with pytest.raises(ModelUnavailable) as caught:
        empty.engine.infer(InferenceRequest("s-1", "leadership", {}))
    assert caught.value.status == 503
    versions, problems = empty.engine.status()
    assert versions == {}
    assert set(problems) == set(catalog.names)


class SwitchableBackend:
    """The registry's SQLite backend behind a switch that makes it unreachable, as a database outage would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the registry database is unreachable")

    def insert(self, version: ModelVersion) -> None:
        self._check()
        self.inner.insert(version)

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        self._check()
        return self.inner.list(skill)

    def update(self, skill: str, decide: Any) -> None:
        self._check()
        self.inner.update(skill, decide)


def test_a_registry_outage_after_loading_keeps_the_loaded_models(services: Services, catalog: SkillCatalog) -> None:
    backend = SwitchableBackend(services.registry.backend)
    engine = InferenceEngine(catalog, ModelRegistry(backend), services.artifacts, refresh_seconds=0.0)
    _, requests = _students(catalog, catalog.skill("leadership"), seed=31, n=1)
    expected = engine.infer(requests[0])
    backend.down = True
    assert engine.infer(requests[0]) == expected
    assert engine.status() == ({skill: "1.0.0" for skill in catalog.names}, {})


def test_a_registry_outage_at_the_first_load_is_reported(services: Services, catalog: SkillCatalog) -> None:
    """Nothing is loaded and nothing can be: every skill must show a problem, so /healthz answers 503
    instead of 200 "ok" with no models."""
    backend = SwitchableBackend(services.registry.backend)
    backend.down = True
    engine = InferenceEngine(catalog, ModelRegistry(backend), services.artifacts, refresh_seconds=0.0)
    _, requests = _students(catalog, catalog.skill("leadership"), seed=31, n=1)
    with pytest.raises(ModelUnavailable):
        engine.infer(requests[0])
    versions, problems = engine.status()
    assert versions == {}
    assert set(problems) == set(catalog.names)


def test_a_canary_serves_a_stable_share_of_students(
    services: Services, catalog: SkillCatalog, trained_dir: Path
) -> None:
    skill = "collaboration"
    record = publish_version(services.registry, services.artifacts, trained_dir / skill, force=True)
    services.registry.promote(skill, record.version, "canary", 0.5)
    services.engine.refresh(force=True)
    _, requests = _students(catalog, catalog.skill(skill), seed=21, n=200)
    first = [services.engine.infer(r)["model_version"] for r in requests]
    assert set(first) == {"1.0.0", "1.1.0"}
    assert 50 <= first.count("1.1.0") <= 150
    assert [services.engine.infer(r)["model_version"] for r in requests] == first


# -- threads -------------------------------------------------------------------------------------


def test_concurrent_inference_matches_sequential(services: Services, catalog: SkillCatalog, settings: Settings) -> None:
    work: list[InferenceRequest] = []
    for n, spec in enumerate(catalog):
        _, requests = _students(catalog, spec, seed=500 + n, n=8)
        work.extend(InferenceRequest(r.student_id, r.skill, r.features, explain=(i % 3 == 0)) for i, r in enumerate(requests))
    assert len(work) >= 50

    def run(engine: InferenceEngine, requests: list[InferenceRequest]) -> list[dict[str, Any]]:
        return [engine.infer(r) for r in requests]

    # A fresh engine, so the threads also race on the first load and on the lazy XGBoost booster.
    fresh = Services(settings).engine
    plans = [[work[(t * 7 + k) % len(work)] for k in range(50)] for t in range(8)]
    outputs: list[list[dict[str, Any]] | None] = [None] * 8
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            outputs[t] = run(fresh, plans[t])
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    sequential = Services(settings).engine
    for t in range(8):
        assert outputs[t] == run(sequential, plans[t]), f"thread {t}"
