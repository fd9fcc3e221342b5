"""Each function target deployed alone: functions-framework's own app for that one entry point."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import functions_framework
import pytest

from shared.catalog import SkillCatalog
from shared.services import Services
from shared.settings import PROJECT_ROOT
from shared.synthetic import generate_cohort

SOURCE = str(PROJECT_ROOT / "functions" / "main.py")

Client = Callable[[str], Any]


@pytest.fixture
def function_client(services: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """Builds the test client functions-framework serves one target with, on this test's services."""
    # create_app appends the source folder to sys.path and registers the module as `main`; undo both.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "main", raising=False)

    def build(target: str) -> Any:
        return functions_framework.create_app(target, SOURCE).test_client()

    yield build
    sys.modules.pop("main", None)


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _valid_body(catalog: SkillCatalog, skill: str) -> dict[str, Any]:
    spec = catalog.skill(skill)
    row = generate_cohort(catalog, 1, seed=3).matrix(spec)[0]
    return {"student_id": "s-alone", "skill": skill, "features": dict(zip(spec.feature_names, map(float, row)))}


def test_infer_alone(function_client: Client, catalog: SkillCatalog) -> None:
    client = function_client("infer")
    response = client.post("/", json=_valid_body(catalog, "communication"))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["student_id"], body["skill"], body["model_version"]) == ("s-alone", "communication", "1.0.0")
    assert 0.0 <= body["score"] <= 1.0
    assert body["confidence"] == pytest.approx(abs(2 * body["score"] - 1))

    explained = client.post("/", json={**_valid_body(catalog, "communication"), "explain": True}).get_json()
    assert len(explained["contributions"]) == 5
    assert explained["score"] == body["score"]

    wrong_method = client.get("/")
    error = _error(wrong_method, 405, "method_not_allowed")
    assert error["details"] == {"allowed": ["POST"]}
    assert wrong_method.headers["Allow"] == "POST"


def test_infer_alone_errors(function_client: Client, catalog: SkillCatalog) -> None:
    client = function_client("infer")
    _error(client.post("/", data="{not json", content_type="application/json"), 400, "invalid_json")
    _error(client.post("/", data=b""), 400, "invalid_json")
    unknown = _error(client.post("/", json={**_valid_body(catalog, "communication"), "skill": "juggling"}), 400, "unknown_skill")
    assert unknown["details"]["valid_skills"] == catalog.names
    body = _valid_body(catalog, "communication")
    body["features"]["word_count_total"] = -5
    invalid = _error(client.post("/", json=body), 400, "validation_error")
    assert invalid["details"] == [{"field": "features.word_count_total", "problem": "must be between 0 and 50000"}]
    huge = {"student_id": "s", "skill": "communication", "features": {"pad": "x" * (2 << 20)}}
    _error(client.post("/", json=huge), 413, "payload_too_large")


def test_list_models_alone(function_client: Client, catalog: SkillCatalog) -> None:
    client = function_client("list_models")
    response = client.get("/")
    assert response.status_code == 200
    skills = response.get_json()["skills"]
    assert [s["skill"] for s in skills] == catalog.names
    assert all(s["deployed_version"] == "1.0.0" for s in skills)

    one = client.get("/?skill=leadership").get_json()["skills"]
    assert [(s["skill"], [v["version"] for v in s["versions"]]) for s in one] == [("leadership", ["1.0.0"])]
    assert one[0]["versions"][0]["stage"] == "production"

    _error(client.post("/"), 405, "method_not_allowed")
    _error(client.get("/?skill=juggling"), 400, "unknown_skill")
    _error(client.get("/?skill="), 400, "validation_error")


def test_list_skills_alone(function_client: Client, catalog: SkillCatalog) -> None:
    client = function_client("list_skills")
    response = client.get("/")
    assert response.status_code == 200
    assert response.get_json() == catalog.to_dict()
    _error(client.delete("/"), 405, "method_not_allowed")


def test_healthz_alone(function_client: Client, services: Services, catalog: SkillCatalog) -> None:
    client = function_client("healthz")
    response = client.get("/")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "models": {skill: "1.0.0" for skill in catalog.names}}
    _error(client.post("/"), 405, "method_not_allowed")


def test_healthz_alone_reports_a_skill_without_a_model(function_client: Client, services: Services) -> None:
    # Only this test's registry changes: the skill's production version is withdrawn underneath.
    services.database.connection().execute(
        "UPDATE model_versions SET stage = 'archived', traffic = 0 WHERE skill = 'creativity'"
    )
    services.engine.refresh(force=True)
    response = function_client("healthz").get("/")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert "creativity" not in body["models"]
    assert body["problems"] == {"creativity": "no version is in production"}
    _error(function_client("infer").post("/", json={"student_id": "s", "skill": "creativity", "features": {}}), 503, "model_unavailable")
