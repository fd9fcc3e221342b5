"""The OpenAPI spec is well-formed, and assert_matches_spec both accepts the contract and rejects breaches of it."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import jsonschema
import pytest

from tests.openapi_contract import (
    HTTP_METHODS,
    assert_matches_spec,
    json_schema_document,
    load_spec,
    resolve_pointer,
    to_json_schema,
)

ERROR_SCHEMA = "#/components/schemas/Error"
BATCH_PATHS = ("/api/v1/skills/infer/batch", "/tasks/nightly", "/tasks/batch-worker", "/api/v1/batch/runs/{run_id}")
DRIFT_PATHS = ("/tasks/drift-check", "/api/v1/drift/checks/{check_id}", "/tasks/canary-check")


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in load_spec()["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _reaches(node: Any, target: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a schema is, or is built (through $ref, allOf, oneOf, anyOf) on, the target schema."""
    spec = load_spec()
    if not isinstance(node, dict):
        return False
    ref = node.get("$ref")
    if ref is not None:
        return ref == target or (ref not in seen and _reaches(resolve_pointer(spec, ref), target, seen | {ref}))
    return any(_reaches(part, target, seen) for key in ("allOf", "oneOf", "anyOf") for part in node.get(key, []))


def _response(response: dict[str, Any]) -> dict[str, Any]:
    return resolve_pointer(load_spec(), response["$ref"]) if "$ref" in response else response


# -- the spec ------------------------------------------------------------------------------------


def test_spec_is_openapi_3_0_3_with_info_and_paths():
    spec = load_spec()
    assert spec["openapi"] == "3.0.3"
    assert spec["info"]["title"] and spec["info"]["version"]
    assert set(spec["paths"]) == {
        "/healthz",
        "/api/v1/skills/infer",
        "/api/v1/skills",
        "/api/v1/skills/models",
        *BATCH_PATHS,
        *DRIFT_PATHS,
    }


def test_every_ref_resolves():
    spec = load_spec()
    refs = set(_refs(spec))
    assert refs, "the spec uses no $ref at all"
    for ref in refs:
        resolve_pointer(spec, ref)  # raises KeyError naming the broken reference


def test_every_component_schema_is_a_valid_draft4_schema():
    for name, schema in json_schema_document()["components"]["schemas"].items():
        try:
            jsonschema.Draft4Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            pytest.fail(f"components/schemas/{name}: {exc.message}")


def test_every_operation_has_a_unique_id_a_2xx_and_quoted_status_codes():
    ids = [operation["operationId"] for _, _, operation in _operations()]
    assert len(ids) == len(set(ids)), ids
    for method, path, operation in _operations():
        statuses = list(operation["responses"])
        # Unquoted YAML status codes parse as ints, which JSON tooling reading the spec would reject.
        assert all(isinstance(s, str) for s in statuses), f"{method} {path}: quote the status codes {statuses}"
        assert any(s.startswith("2") for s in statuses), f"{method} {path} documents no 2xx"
        assert "405" in statuses, f"{method} {path} does not document 405"


def test_every_4xx_and_error_response_uses_the_error_envelope():
    for method, path, operation in _operations():
        for status, response in operation["responses"].items():
            response = _response(response)
            schema = response["content"]["application/json"]["schema"]
            if status.startswith("4"):
                assert _reaches(schema, ERROR_SCHEMA), f"{method} {path} {status} is not built on {ERROR_SCHEMA}"
    for name in ("NotFound", "MethodNotAllowed", "PayloadTooLarge", "Internal"):
        schema = load_spec()["components"]["responses"][name]["content"]["application/json"]["schema"]
        assert _reaches(schema, ERROR_SCHEMA), name


def test_405_documents_the_allow_header():
    allow = load_spec()["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]
    assert allow["required"] is True


def test_path_parameters_are_declared():
    for method, path, operation in _operations():
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        templated = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        assert declared == templated, f"{method} {path}"


def test_nullable_becomes_a_json_schema_type_list():
    assert to_json_schema({"type": "string", "nullable": True}) == {"type": ["string", "null"]}
    assert to_json_schema({"type": "string", "enum": ["a"], "nullable": True}) == {
        "type": ["string", "null"],
        "enum": ["a", None],
    }
    assert to_json_schema({"type": "integer", "nullable": False}) == {"type": "integer"}
    with pytest.raises(ValueError):
        to_json_schema({"nullable": True})


# -- the contract check accepts the contract ---------------------------------------------------------------


def _infer_response(**changes: Any) -> dict[str, Any]:
    body = {
        "student_id": "s-1",
        "skill": "leadership",
        "score": 0.73,
        "confidence": 0.46,
        "model_version": "1.0.0",
        "feature_importance": [{"feature": f"f{i}", "importance": 0.1} for i in range(5)],
        "imputed": ["question_ratio"],
        "ignored": [],
    }
    body.update(changes)
    return body


def _run(**changes: Any) -> dict[str, Any]:
    body = {
        "run_id": "2026-01-01",
        "status": "succeeded",
        "students_total": 3,
        "students_scored": 3,
        "students_failed": 0,
        "tasks_total": 1,
        "tasks_done": 1,
        "started_at": "2026-01-01T02:00:00.000Z",
        "finished_at": "2026-01-01T02:03:00.000Z",
    }
    body.update(changes)
    return body


def test_helper_accepts_documented_answers():
    assert_matches_spec("POST", "/api/v1/skills/infer", 200, _infer_response())
    contributions = [{"feature": f"f{i}", "value": 1.0, "contribution": -0.2} for i in range(5)]
    assert_matches_spec("POST", "/api/v1/skills/infer", 200, _infer_response(contributions=contributions))
    assert_matches_spec(
        "POST",
        "/api/v1/skills/infer",
        400,
        {"error": {"code": "unknown_skill", "message": "Unknown skill 'x'.", "details": {"valid_skills": ["a"]}}},
    )
    assert_matches_spec("GET", "/api/v1/batch/runs/abc", 200, _run())
    assert_matches_spec("GET", "/api/v1/batch/runs/abc", 200, _run(status="running", finished_at=None))
    assert_matches_spec("GET", "/api/v1/skills/models?skill=leadership", 200, {"skills": [
        {"skill": "leadership", "deployed_version": None, "versions": []}
    ]})
    assert_matches_spec("GET", "/no/such/path", 404, {"error": {"code": "not_found", "message": "No endpoint."}})
    assert_matches_spec(
        "DELETE", "/healthz", 405, {"error": {"code": "method_not_allowed", "message": "Use GET.", "details": {}}}
    )
    scored = {**_infer_response(), "index": 0}
    failed = {"index": 1, "student_id": None, "skill": None, "error": {"code": "validation_error", "message": "Bad."}}
    assert_matches_spec(
        "POST", "/api/v1/skills/infer/batch", 200, {"results": [scored, failed], "succeeded": 1, "failed": 1}
    )


# -- the contract check rejects breaches -------------------------------------------------------------------


def _without(body: dict[str, Any], key: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    del body[key]
    return body


@pytest.mark.parametrize(
    "method, path, status, body, says",
    [
        ("POST", "/api/v1/skills/infer", 200, _infer_response(score=2), "greater than the maximum"),
        ("POST", "/api/v1/skills/infer", 200, _without(_infer_response(), "model_version"), "model_version"),
        ("POST", "/api/v1/skills/infer", 200, _infer_response(extra=1), "extra"),
        ("POST", "/api/v1/skills/infer", 200, _infer_response(feature_importance=[]), "feature_importance"),
        ("POST", "/api/v1/skills/infer", 200, _infer_response(
            contributions=[{"feature": "a", "value": 1, "contribution": 1}] * 4), "contributions"),
        ("POST", "/api/v1/skills/infer", 400, {"error": {"code": "validation_error", "message": "Bad."}}, "details"),
        ("POST", "/api/v1/skills/infer", 400, {"error": {"code": "unknown_skill", "message": "x", "details": {}}},
         "valid_skills"),
        ("POST", "/api/v1/skills/infer", 400, {"error": {"code": "Bad Code", "message": "x"}}, "error"),
        ("POST", "/api/v1/skills/infer", 400, {"error": {"code": "invalid_json", "message": "x"}, "more": 1}, "more"),
        ("POST", "/api/v1/skills/infer", 418, {"error": {"code": "teapot", "message": "x"}}, "not documented"),
        ("GET", "/healthz", 200, {"status": "ok"}, "models"),
        ("GET", "/healthz", 503, {"status": "ok", "models": {}, "problems": {"a": "b"}}, "unavailable"),
        ("GET", "/api/v1/batch/runs/abc", 200, _run(started_at=None), "started_at"),
        ("GET", "/api/v1/batch/runs/abc", 200, _run(status="done"), "done"),
        ("GET", "/api/v1/skills/models", 200, {"skills": [{"skill": "a", "versions": []}]}, "deployed_version"),
        ("GET", "/no/such/path", 200, {}, "must be 404"),
        ("GET", "/no/such/path", 404, {"error": {"code": "oops", "message": "x"}}, "not_found"),
        ("DELETE", "/healthz", 404, {"error": {"code": "not_found", "message": "x"}}, "must be 405"),
    ],
)
def test_helper_rejects_breaches(method, path, status, body, says):
    with pytest.raises(AssertionError) as caught:
        assert_matches_spec(method, path, status, body)
    assert says in str(caught.value)
