"""The canary check on real models: a canary trained on shuffled labels is aborted by one check (recorded in
the registry history by `canary-check`), one trained on the same data with another seed passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from functions.local_server import create_app
from shared import batch
from shared.canary import ACTOR, run_canary_check
from shared.catalog import SkillCatalog
from shared.local_stack import ensure_demo_students
from shared.metrics import open_metrics_reader
from shared.publishing import publish_version
from shared.registry import CANARY_ABORT
from shared.runs import Chunk, Run
from shared.services import Services
from shared.synthetic import generate_cohort
from shared.training import TrainingConfig, train_skill, write_trained

SKILL = "leadership"


def _canary(services: Services, catalog: SkillCatalog, out: Path, config: TrainingConfig, shuffle: bool) -> str:
    cohort = generate_cohort(catalog, config.n_students, config.seed)
    if shuffle:
        cohort.labels[SKILL] = np.random.default_rng(3).permutation(cohort.labels[SKILL])
    folder = write_trained(train_skill(catalog.skill(SKILL), cohort, config), out)
    record = publish_version(services.registry, services.artifacts, folder)
    services.registry.start_canary(SKILL, record.version, 0.5, actor="test")
    services.engine.refresh(force=True)
    return record.version


def _traffic(services: Services, catalog: SkillCatalog, requests: int) -> None:
    """A nightly run over every demo student, and online requests through the app (recorded as metrics)."""
    ids = sorted(s.student_id for s in services.features.scan())
    run = Run("canary-night", True, batch.models_signature(batch.serving_versions(services)), "2030-01-01T00:00:00.000Z", len(ids), 1)
    services.runs.create(run, [Chunk("canary-night", 0, ids)])
    batch.score_chunk(services, "canary-night", 0, ids)
    client = create_app().test_client()
    stored = services.features.get_many(ids[:requests])
    for student_id, features in stored.items():
        body = {"student_id": student_id, "skill": SKILL, "features": {k: v for k, v in features.features.items()}}
        assert client.post("/api/v1/skills/infer", json=body).status_code == 200
    services.metrics.flush()


def test_a_canary_trained_on_shuffled_labels_is_aborted_by_one_check(
    services: Services, catalog: SkillCatalog, tmp_path: Path
) -> None:
    ensure_demo_students(services, 1000)
    version = _canary(services, catalog, tmp_path, TrainingConfig(n_students=3000, n_estimators=60), shuffle=True)
    _traffic(services, catalog, 300)

    check = run_canary_check(services, window_minutes=60, reader=open_metrics_reader(services.settings))

    [result] = check["skills"]
    assert (result["skill"], result["canary"], result["decision"], result["action"]) == (SKILL, version, "rollback", "aborted")
    assert any("teachers" in r and "p " in r for r in result["reasons"]), result["reasons"]
    assert result["teacher_correlation"]["p_value_canary_worse"] < 0.05
    assert result["versions"]["canary"]["requests"] > 100 and result["versions"]["production"]["requests"] > 100
    last = services.registry.history(SKILL)[-1]
    assert (last.action, last.actor) == (CANARY_ABORT, ACTOR) and "teachers" in (last.reason or "")
    assert services.registry.status(SKILL).canary is None


def test_a_canary_trained_with_another_seed_passes(services: Services, catalog: SkillCatalog, tmp_path: Path) -> None:
    ensure_demo_students(services, 1000)
    version = _canary(services, catalog, tmp_path, TrainingConfig(seed=8), shuffle=False)
    _traffic(services, catalog, 400)

    check = run_canary_check(services, window_minutes=60, reader=open_metrics_reader(services.settings))

    [result] = check["skills"]
    assert (result["canary"], result["decision"], result["action"]) == (version, "promote", None), result
    assert result["score_psi"] < 0.1
    assert services.registry.status(SKILL).canary is not None  # a decision to promote changes nothing by itself
