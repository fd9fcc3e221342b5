"""The canary check on real models: a canary trained on shuffled labels is aborted by one check (recorded in
the registry history by `canary-check`), one trained on the same data with another seed passes."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from functions.local_server import create_app
from shared import batch
from shared.canary import ACTOR, Guardrails, request_guardrails, run_canary_check
from shared.catalog import SkillCatalog
from shared.engine import in_canary
from shared.local_stack import LocalServer, ensure_demo_models, ensure_demo_students, free_port
from shared.metrics import open_metrics_reader
from shared.publishing import publish_version
from shared.registry import CANARY_ABORT, CANARY_PROMOTE, CANARY_START, CANARY_TRAFFIC
from shared.runs import Chunk, Run
from shared.services import Services, use_services
from shared.settings import Settings
from shared.synthetic import generate_cohort
from shared.training import TrainingConfig, train_skill, write_trained
from tests.emulators.metric_service import MetricServiceEmulator, metric_service  # noqa: F401 (a fixture)
from tests.http_traffic import Client

SKILL = "leadership"
# Wall-clock latency on a shared test machine is noise, not what the checks below judge: the p99 guardrail
# is tested on given figures (test_the_p99_guardrail_*), and set out of reach where real requests are timed.
LATENCY_NOT_JUDGED = {"min_p99_increase_ms": float("inf")}


def _figures(requests: int, errors: int, p99_ms: float) -> dict[str, float]:
    return {"requests": requests, "errors": errors, "error_rate": errors / requests, "latency_p99_ms": p99_ms}


@pytest.mark.parametrize(
    ("production_p99", "canary_p99", "trips"),
    [
        (0.8, 1.7, False),  # over 1.5x, but 0.9 ms more: one scheduling pause, not a slower model
        (0.8, 5.7, False),  # 4.9 ms more
        (0.8, 5.8, True),  # 5 ms more and over 1.5x
        (20.0, 29.0, False),  # 9 ms more but under 1.5x
        (20.0, 31.0, True),
    ],
)
def test_the_p99_guardrail_needs_both_the_ratio_and_an_absolute_increase(
    production_p99: float, canary_p99: float, trips: bool
) -> None:
    reasons = request_guardrails(_figures(1000, 0, production_p99), _figures(1000, 0, canary_p99), Guardrails())
    assert bool(reasons) == trips, reasons
    assert all("p99 latency" in r for r in reasons)


def test_the_error_rate_guardrail_floors_an_error_free_production_at_one_in_its_requests() -> None:
    guardrails = Guardrails()  # at most 2x
    assert request_guardrails(_figures(1000, 0, 1.0), _figures(1000, 2, 1.0), guardrails) == []
    [reason] = request_guardrails(_figures(1000, 0, 1.0), _figures(1000, 3, 1.0), guardrails)
    assert reason.startswith("error rate 0.0030 is over 2.0x")
    assert request_guardrails(_figures(1000, 10, 1.0), _figures(1000, 20, 1.0), guardrails) == []
    assert request_guardrails(_figures(1000, 10, 1.0), _figures(1000, 21, 1.0), guardrails)


def _canary(
    services: Services, catalog: SkillCatalog, out: Path, config: TrainingConfig, shuffle: bool, steps: tuple[float, ...] = ()
) -> str:
    cohort = generate_cohort(catalog, config.n_students, config.seed)
    if shuffle:
        cohort.labels[SKILL] = np.random.default_rng(3).permutation(cohort.labels[SKILL])
    folder = write_trained(train_skill(catalog.skill(SKILL), cohort, config), out)
    record = publish_version(services.registry, services.artifacts, folder)
    services.registry.start_canary(SKILL, record.version, None if steps else 0.5, steps=steps, actor="test")
    services.engine.refresh(force=True)
    return record.version


def _traffic(services: Services, catalog: SkillCatalog, requests: int, run_id: str = "canary-night") -> None:
    """A nightly run over every demo student, and online requests through the app (recorded as metrics)."""
    ids = sorted(s.student_id for s in services.features.scan())
    run = Run(run_id, True, batch.models_signature(batch.serving_versions(services)), "2030-01-01T00:00:00.000Z", len(ids), 1)
    services.runs.create(run, [Chunk(run_id, 0, ids)])
    batch.score_chunk(services, run_id, 0, ids)
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

    check = run_canary_check(
        services, window_minutes=60, reader=open_metrics_reader(services.settings), guardrails=Guardrails(**LATENCY_NOT_JUDGED)
    )

    [result] = check["skills"]
    assert (result["canary"], result["decision"], result["action"]) == (version, "promote", None), result
    assert result["score_psi"] < 0.1
    assert services.registry.status(SKILL).canary is not None  # a decision to promote changes nothing by itself


def test_a_good_canary_started_with_steps_goes_through_them_to_production(
    services: Services, catalog: SkillCatalog, tmp_path: Path
) -> None:
    ensure_demo_students(services, 1000)
    steps = (0.05, 0.25, 0.5, 1.0)
    version = _canary(services, catalog, tmp_path, TrainingConfig(seed=8), shuffle=False, steps=steps)
    # Enough data per version at the 5 % step (about 50 students and 30 requests) to judge rather than hold.
    guardrails = Guardrails(min_requests=20, min_students=30, min_rated=10, **LATENCY_NOT_JUDGED)
    actions, shares = [], []
    for n in range(len(steps) - 1):  # from the first step, each passing check moves one step on
        _traffic(services, catalog, 600, run_id=f"canary-night-{n}")
        check = run_canary_check(services, window_minutes=60, reader=open_metrics_reader(services.settings), guardrails=guardrails)
        [result] = check["skills"]
        assert (result["decision"], result["canary_plan"]) == ("promote", list(steps)), result["reasons"]
        actions.append(result["action"])
        canary = services.registry.status(SKILL).canary
        shares.append(canary.traffic if canary else None)

    assert actions == ["advanced", "advanced", "promoted"]
    assert shares == [0.25, 0.5, None]
    status = services.registry.status(SKILL)
    assert status.production is not None and status.production.version == version and status.canary is None
    history = services.registry.history(SKILL)[-4:]
    assert [(e.action, e.actor) for e in history] == [
        (CANARY_START, "test"), (CANARY_TRAFFIC, ACTOR), (CANARY_TRAFFIC, ACTOR), (CANARY_PROMOTE, ACTOR)
    ]
    assert all("every guardrail passed" in (e.reason or "") for e in history[1:])
    assert services.engine.deployment(SKILL).production.version == version  # served at once by this process


@pytest.mark.integration
def test_concurrent_traffic_sees_no_failed_request_while_a_check_aborts_a_bad_canary(
    env: dict[str, str], catalog: SkillCatalog, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env["MODEL_REFRESH_SECONDS"] = "0.5"
    services: Services = request.getfixturevalue("services")
    ensure_demo_students(services, 1000)
    version = _canary(services, catalog, tmp_path, TrainingConfig(n_students=3000, n_estimators=60), shuffle=True)
    _traffic(services, catalog, 300)
    production = services.registry.status(SKILL).production
    assert production is not None
    # Students on both sides of the 50 % split, so the traffic hits both versions until the abort.
    stored = services.features.get_many(sorted(s.student_id for s in services.features.scan())[:40])
    canary_side = [sid for sid in stored if in_canary(sid, 0.5)][:2]
    production_side = [sid for sid in stored if not in_canary(sid, 0.5)][:2]
    bodies = [{"student_id": sid, "skill": SKILL, "features": dict(stored[sid].features)} for sid in canary_side + production_side]

    with LocalServer(env, free_port(), workers=2) as server:
        clients = [Client(server.url + "/api/v1/skills/infer", body, budget_seconds=90) for body in bodies]
        for client in clients:
            client.start()
        try:
            while any(c.is_alive() and len(c.snapshot()) < 10 for c in clients):
                time.sleep(0.02)
            check = requests.post(server.url + "/tasks/canary-check", json={"window_minutes": 60}, timeout=120)
            assert check.status_code == 200, check.text
            [result] = check.json()["skills"]
            assert (result["canary"], result["decision"], result["action"]) == (version, "rollback", "aborted")
            aborted_at = [len(c.snapshot()) for c in clients]
            for client, since in zip(clients, aborted_at):
                assert client.wait_for_run(production.version, since), client.snapshot()[since:]
        finally:
            for client in clients:
                client.stop.set()
            for client in clients:
                client.join(timeout=15)

    answers = [a for c in clients for a in c.snapshot()]
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    assert {v for _, v in answers} == {production.version, version}  # the canary served until the abort
    assert services.registry.status(SKILL).canary is None
    last = services.registry.history(SKILL)[-1]
    assert (last.action, last.actor) == (CANARY_ABORT, ACTOR)


def test_on_gcp_the_check_reads_each_versions_requests_and_latency_from_cloud_monitoring(
    env: dict[str, str], trained_dir: Path, catalog: SkillCatalog, metric_service: MetricServiceEmulator
) -> None:
    settings = Settings.from_env(
        {**env, "METRICS": "monitoring://test-project", "MONITORING_EMULATOR_HOST": metric_service.host, "METRICS_FLUSH_SECONDS": "60"}
    )
    services = Services(settings)
    ensure_demo_models(services, trained_dir)
    use_services(services)
    try:
        record = publish_version(services.registry, services.artifacts, trained_dir / SKILL, force=True)  # the same model again
        services.registry.start_canary(SKILL, record.version, 0.5, actor="test")
        services.engine.refresh(force=True)
        spec = catalog.skill(SKILL)
        cohort = generate_cohort(catalog, 150, seed=21)
        client = create_app().test_client()
        served: Counter[str] = Counter()
        for n, row in enumerate(cohort.matrix(spec)):
            body = {"student_id": f"s-{n}", "skill": SKILL, "features": dict(zip(spec.feature_names, map(float, row)))}
            answer = client.post("/api/v1/skills/infer", json=body)
            assert answer.status_code == 200
            served[answer.get_json()["model_version"]] += 1
        services.metrics.flush()  # to the MetricService, as each instance's flush thread does
        check = run_canary_check(services, window_minutes=60, guardrails=Guardrails(min_requests=20, **LATENCY_NOT_JUDGED))
    finally:
        use_services(None)
        services.metrics.close()

    [result] = check["skills"]
    production, canary = result["versions"]["production"], result["versions"]["canary"]
    assert (production["model_version"], canary["model_version"]) == ("1.0.0", record.version)
    # Read back through ListTimeSeries: exactly the requests each version answered, none failed.
    assert (production["requests"], canary["requests"]) == (served["1.0.0"], served[record.version])
    assert min(served.values()) >= 20 and production["errors"] == canary["errors"] == 0
    assert all(v["latency_p50_ms"] is not None and v["latency_p99_ms"] >= v["latency_p50_ms"] for v in (production, canary))
    reads = [c for c in metric_service.calls if c.method == "ListTimeSeries"]
    assert reads and all(c.status == grpc.StatusCode.OK for c in reads)
    assert any(f'metric.labels.model_version = "{record.version}"' in c.request.filter for c in reads), reads[0].request.filter
    assert not any("error rate" in r for r in result["reasons"])  # the same model, no failed request: no error-rate trip
