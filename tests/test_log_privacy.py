"""No log line or metric label carries a student id or a feature value: every line a real server writes
on the HTTP, nightly and drift paths is read, including the metric lines and the error paths."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer, ensure_demo_models, free_port
from shared.services import Services
from shared.settings import Settings

pytestmark = pytest.mark.integration

# Values no code path would write by itself: if one shows up in a log line, it was copied there.
STUDENT_PREFIX = "pupil-7f3a9c"
FEATURE_VALUE = 1234.56789


def _features(catalog: SkillCatalog, skill: str) -> dict[str, float]:
    spec = catalog.skill(skill)
    values = {f.name: f.default for f in spec.features}
    # a value inside its range, distinctive in any log
    wide = next(f for f in spec.features if f.min <= FEATURE_VALUE <= f.max)
    values[wide.name] = FEATURE_VALUE
    return values


def test_no_log_line_carries_a_student_id_or_a_feature_value(tmp_path: Path, trained_dir: Path) -> None:
    port = free_port()
    env = {
        "ARTIFACT_STORE": str(tmp_path / "artifacts"),
        "DATABASE_URL": str(tmp_path / "skills.sqlite3"),
        "LOG_LEVEL": "DEBUG",
        "METRICS": "log",
        "METRICS_FLUSH_SECONDS": "5",
        "PROFILE_FLUSH_SECONDS": "1",
        "WORKER_URL": f"http://127.0.0.1:{port}/tasks/batch-worker",
    }
    services = Services(Settings.from_env(env))
    ensure_demo_models(services, trained_dir)
    catalog = services.catalog
    students = {f"{STUDENT_PREFIX}-{i:03d}": {} for i in range(60)}
    for student_id in students:
        for skill in catalog.names:
            students[student_id].update(_features(catalog, skill) if skill == "leadership" else {})
    everything = {f.name: f.default for spec in catalog for f in spec.features}
    services.features.upsert({sid: {**everything, **values} for sid, values in students.items()})
    # one student whose stored value breaks a skill: its failure is logged, its id must not be
    broken = f"{STUDENT_PREFIX}-broken"
    services.features.upsert({broken: {**everything, "lexical_diversity": 5.0}})

    with LocalServer(env, port, workers=2) as server:
        session = requests.Session()
        for i, student_id in enumerate(list(students)[:20]):
            body: dict[str, Any] = {"student_id": student_id, "skill": "leadership", "features": _features(catalog, "leadership")}
            if i % 5 == 0:
                body["explain"] = True
            assert session.post(f"{server.url}/api/v1/skills/infer", json=body, timeout=30).status_code == 200
        # the caller's mistakes: the answer may name the value, the log must not
        bad = {"student_id": f"{STUDENT_PREFIX}-bad", "skill": "leadership", "features": {"word_count_total": -FEATURE_VALUE}}
        assert session.post(f"{server.url}/api/v1/skills/infer", json=bad, timeout=30).status_code == 400
        unknown = {"student_id": f"{STUDENT_PREFIX}-x", "skill": f"skill-{FEATURE_VALUE}", "features": {}}
        assert session.post(f"{server.url}/api/v1/skills/infer", json=unknown, timeout=30).status_code == 400
        batch = {"items": [{"student_id": sid, "skill": "leadership", "features": _features(catalog, "leadership")} for sid in students]}
        assert session.post(f"{server.url}/api/v1/skills/infer/batch", json=batch, timeout=30).status_code == 200
        assert session.post(f"{server.url}/tasks/nightly", json={"run_id": "privacy", "full": True}, timeout=30).status_code == 202
        deadline = time.monotonic() + 120
        while session.get(f"{server.url}/api/v1/batch/runs/privacy", timeout=30).json()["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        run = session.get(f"{server.url}/api/v1/batch/runs/privacy", timeout=30).json()
        assert run["status"] == "partial"  # the broken student failed on some skills
        assert session.post(f"{server.url}/tasks/drift-check", json={"window_days": 1}, timeout=120).status_code == 200
        time.sleep(1.5)  # a profile flush
    log = server.log()

    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) > 40
    assert any("skills.metrics" in line.get("logger", "") for line in lines), "no metric line was written"
    leaks = [line for line in log.splitlines() if STUDENT_PREFIX in line or "1234.56" in line]
    assert leaks == [], leaks[:3]
