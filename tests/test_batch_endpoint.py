"""POST /api/v1/skills/infer/batch: each item answered as /infer would answer it alone, bad items failing alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer
from shared.synthetic import generate_cohort

try:
    from tests.openapi_contract import assert_matches_spec
except ImportError:  # the contract oracle is optional: without it the answers are checked by hand only
    def assert_matches_spec(method: str, path: str, status: int, body: Any) -> None:
        return None

BATCH = "/api/v1/skills/infer/batch"
INFER = "/api/v1/skills/infer"
TIMEOUT = 30
MAX_ITEMS = 4
MAX_BODY_BYTES = 65536


def cohort_items(catalog: SkillCatalog) -> list[dict[str, Any]]:
    """One realistic item per skill, each for its own student."""
    cohort = generate_cohort(catalog, len(catalog), seed=5)
    return [
        {
            "student_id": cohort.student_ids[i],
            "skill": spec.skill,
            "features": {name: round(float(cohort.features[name][i]), 6) for name in spec.feature_names},
        }
        for i, spec in enumerate(catalog)
    ]


def mixed_items(catalog: SkillCatalog) -> tuple[list[Any], set[int]]:
    """Returns valid items for every skill interleaved with invalid ones, and the invalid items' indices."""
    valid = cohort_items(catalog)
    explained = {**valid[1], "explain": True}
    imputed_and_ignored = {**valid[2], "student_id": "student-imputed"}
    imputed_and_ignored["features"] = {
        **{k: v for k, v in valid[2]["features"].items() if k != "rare_word_ratio"},
        "made_up_signal": 3,
    }
    invalid = {
        1: {**valid[0], "skill": "juggling"},
        3: {"skill": "communication", "features": valid[0]["features"]},  # no student_id
        5: {**valid[4], "features": {**valid[4]["features"], "word_count_total": -5}},
        6: 42,
        9: {"student_id": "s-no-features", "skill": "leadership"},
    }
    good = [valid[0], valid[3], explained, valid[4], valid[5], imputed_and_ignored, valid[6], valid[0]]
    items: list[Any] = []
    for index in range(len(good) + len(invalid)):
        items.append(invalid[index] if index in invalid else good.pop(0))
    return items, set(invalid)


def post(server: LocalServer, path: str, body: Any) -> tuple[int, Any]:
    response = requests.post(server.url + path, json=body, timeout=TIMEOUT)
    payload = response.json()
    assert_matches_spec("POST", path, response.status_code, payload)
    return response.status_code, payload


@pytest.mark.integration
def test_batch_answers_each_item_as_infer_would_alone(live_server: LocalServer, catalog: SkillCatalog) -> None:
    items, invalid = mixed_items(catalog)

    status, body = post(live_server, BATCH, {"items": items})

    assert status == 200
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert (body["succeeded"], body["failed"]) == (len(items) - len(invalid), len(invalid))
    assert {r["skill"] for i, r in enumerate(results) if i not in invalid} == set(catalog.names)
    for index, (item, result) in enumerate(zip(items, results)):
        single_status, single = post(live_server, INFER, item)
        if index in invalid:
            assert single_status >= 400
            assert result == {
                "index": index,
                "student_id": item.get("student_id") if isinstance(item, dict) else None,
                "skill": item.get("skill") if isinstance(item, dict) else None,
                **single,
            }
            assert set(result["error"]) >= {"code", "message", "details"}
        else:
            assert single_status == 200, single
            assert result["score"] == pytest.approx(single["score"], abs=1e-9)
            assert result["confidence"] == pytest.approx(single["confidence"], abs=1e-9)
            same_as_single = {**single, "score": result["score"], "confidence": result["confidence"], "index": index}
            assert result == same_as_single
            assert (result["student_id"], result["skill"]) == (item["student_id"], item["skill"])

    by_kind = {r["error"]["code"]: r for r in results if "error" in r}
    assert set(by_kind) == {"unknown_skill", "validation_error"}
    assert results[1]["error"]["details"]["valid_skills"] == catalog.names
    assert results[3]["student_id"] is None and results[3]["skill"] == "communication"
    assert [p["field"] for p in results[5]["error"]["details"]] == ["features.word_count_total"]
    assert (results[6]["student_id"], results[6]["skill"]) == (None, None)
    assert [p["field"] for p in results[6]["error"]["details"]] == ["body"]
    assert [p["field"] for p in results[9]["error"]["details"]] == ["features"]
    assert len(results[4]["contributions"]) == 5 and "contributions" not in results[0]
    assert results[10]["imputed"] == ["rare_word_ratio"] and results[10]["ignored"] == ["made_up_signal"]
    assert results[0]["score"] == results[12]["score"]  # the same item twice


# -- the envelope, in process -------------------------------------------------------------------------


@pytest.fixture
def small_batch_env(env: dict[str, str]) -> dict[str, str]:
    env.update({"MAX_BATCH_ITEMS": str(MAX_ITEMS), "MAX_BATCH_REQUEST_BYTES": str(MAX_BODY_BYTES)})
    return env


def problem_fields(body: dict[str, Any]) -> list[str]:
    return [p["field"] for p in body["error"]["details"]]


def client_post(client: FlaskClient, data: bytes) -> tuple[int, Any]:
    response = client.post(BATCH, data=data, content_type="application/json")
    body = response.get_json()
    assert_matches_spec("POST", BATCH, response.status_code, body)
    return response.status_code, body


@pytest.mark.parametrize(
    "body, field",
    [
        pytest.param([], "body", id="array"),
        pytest.param("items", "body", id="string"),
        pytest.param(None, "body", id="null"),
        pytest.param({}, "items", id="no-items"),
        pytest.param({"items": {"student_id": "s"}}, "items", id="items-not-array"),
        pytest.param({"items": []}, "items", id="empty-items"),
    ],
)
def test_a_malformed_envelope_is_a_validation_error_naming_the_field(
    small_batch_env: dict[str, str], client: FlaskClient, body: Any, field: str
) -> None:
    status, answer = client_post(client, json.dumps(body).encode())

    assert status == 400
    assert answer["error"]["code"] == "validation_error"
    assert problem_fields(answer) == [field]


def test_the_item_limit_itself_is_accepted(
    small_batch_env: dict[str, str], client: FlaskClient, catalog: SkillCatalog
) -> None:
    items = cohort_items(catalog)[:MAX_ITEMS]
    status, answer = client_post(client, json.dumps({"items": items}).encode())

    assert status == 200, answer
    assert (answer["succeeded"], answer["failed"]) == (MAX_ITEMS, 0)


def test_one_item_over_the_limit_is_payload_too_large(
    small_batch_env: dict[str, str], client: FlaskClient, catalog: SkillCatalog
) -> None:
    items = (cohort_items(catalog) * 2)[: MAX_ITEMS + 1]
    status, answer = client_post(client, json.dumps({"items": items}).encode())

    assert status == 413
    assert answer["error"]["code"] == "payload_too_large"
    assert answer["error"]["details"] == {"field": "items", "limit_items": MAX_ITEMS}


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe"], ids=["broken", "empty", "not-utf8"])
def test_a_body_that_is_not_json_is_invalid_json(
    small_batch_env: dict[str, str], client: FlaskClient, data: bytes
) -> None:
    status, answer = client_post(client, data)

    assert status == 400
    assert answer["error"]["code"] == "invalid_json"


def test_a_body_over_the_limit_is_payload_too_large(small_batch_env: dict[str, str], client: FlaskClient) -> None:
    status, answer = client_post(client, b'{"items": [' + b" " * MAX_BODY_BYTES + b"]}")

    assert status == 413
    assert answer["error"]["code"] == "payload_too_large"


def test_get_is_method_not_allowed(client: FlaskClient) -> None:
    response = client.get(BATCH)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert_matches_spec("GET", BATCH, 405, response.get_json())
