"""The public HTTP contract over real HTTP: every answer of the local server matches functions/openapi.yaml."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer, ensure_demo_models, free_port
from shared.publishing import publish_version
from shared.services import Services
from shared.settings import Settings
from tests.openapi_contract import assert_matches_spec

pytestmark = pytest.mark.integration

TIMEOUT = 10
INFER = "/api/v1/skills/infer"
SKILLS = "/api/v1/skills"
MODELS = "/api/v1/skills/models"
HEALTHZ = "/healthz"
SKILL = "communication"  # reads two required linguistic features the validation cases break
UNSERVED_SKILL = "leadership"  # the skill left without a production version in the 503 stack
SMALL_BODY_LIMIT = 4096
ERROR_CODES = {"invalid_json", "validation_error", "unknown_skill", "not_found", "method_not_allowed",
               "payload_too_large"}
# A placeholder for a raw JSON token (NaN, Infinity, 1e400) that json.dumps cannot write.
RAW = "__raw_token__"


def call(server: LocalServer, method: str, path: str, **kwargs: Any) -> tuple[int, Any, requests.Response]:
    """Sends one request and checks the answer against the spec; returns its status, JSON body and response."""
    response = requests.request(method, server.url + path, timeout=TIMEOUT, **kwargs)
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.text[:500]
    body = response.json()
    assert_matches_spec(method, path, response.status_code, body)
    return response.status_code, body, response


def post_text(server: LocalServer, path: str, text: str | bytes) -> tuple[int, Any, requests.Response]:
    data = text.encode() if isinstance(text, str) else text
    return call(server, "POST", path, data=data, headers={"Content-Type": "application/json"})


def defaults(catalog: SkillCatalog, skill: str) -> dict[str, float]:
    return {f.name: f.default for f in catalog.skill(skill).features}


def infer_body(catalog: SkillCatalog, skill: Any = SKILL, **changes: Any) -> dict[str, Any]:
    """A valid request for the skill (every feature at its default), then `changes` applied."""
    features = defaults(catalog, skill if isinstance(skill, str) and skill in catalog else SKILL)
    body: dict[str, Any] = {"student_id": "student-001", "skill": skill, "features": features}
    body.update(changes)
    return body


def with_feature(catalog: SkillCatalog, name: str, value: Any) -> dict[str, Any]:
    body = infer_body(catalog)
    body["features"][name] = value
    return body


def without_feature(catalog: SkillCatalog, name: str) -> dict[str, Any]:
    body = infer_body(catalog)
    del body["features"][name]
    return body


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def field_names(body: dict[str, Any]) -> list[str]:
    return [problem["field"] for problem in body["error"]["details"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained_dir: Path) -> Iterator[LocalServer]:
    """One live server (gunicorn, two workers) for the module's tests that only read from it.

    Shaped like conftest's `live_server`, but shared: no test here changes the server's state, and
    a server per test would spend seconds on publishing and start-up for each of ~50 requests.
    """
    folder = tmp_path_factory.mktemp("http-contract")
    env = {
        "ARTIFACT_STORE": str(folder / "artifacts"),
        "DATABASE_URL": str(folder / "skills.sqlite3"),
        "MODEL_REFRESH_SECONDS": "30",
        "LOG_LEVEL": "WARNING",
    }
    ensure_demo_models(Services(Settings.from_env(env)), trained_dir)
    with LocalServer(env, free_port(), workers=2) as live:
        yield live


# -- 200 -----------------------------------------------------------------------------------------


def test_healthz_reports_every_skill_serving(server, catalog):
    status, body, _ = call(server, "GET", HEALTHZ)
    assert status == 200
    assert body["status"] == "ok"
    assert set(body["models"]) == set(catalog.names)


def test_infer_scores_without_contributions_unless_asked(server, catalog):
    status, body, _ = call(server, "POST", INFER, json=infer_body(catalog))
    assert status == 200
    assert (body["student_id"], body["skill"]) == ("student-001", SKILL)
    assert "contributions" not in body
    assert body["imputed"] == [] and body["ignored"] == []
    assert {item["feature"] for item in body["feature_importance"]} <= set(catalog.skill(SKILL).feature_names)


def test_infer_with_explain_adds_five_contributions(server, catalog):
    plain = call(server, "POST", INFER, json=infer_body(catalog, explain=False))[1]
    request = infer_body(catalog, explain=True)
    status, body, _ = call(server, "POST", INFER, json=request)
    assert status == 200
    assert "contributions" not in plain
    assert len(body["contributions"]) == 5
    for contribution in body["contributions"]:
        assert contribution["value"] == pytest.approx(request["features"][contribution["feature"]])
    assert body["score"] == plain["score"]  # explaining does not change the score


def test_infer_lists_imputed_and_ignored_features(server, catalog):
    optional = [f.name for f in catalog.skill(SKILL).features if not f.required]
    body = infer_body(catalog)
    del body["features"][optional[0]]
    body["features"][optional[1]] = None  # null counts as missing
    body["features"]["shoe_size"] = 42
    status, answer, _ = call(server, "POST", INFER, json=body)
    assert status == 200
    assert sorted(answer["imputed"]) == sorted(optional[:2])
    assert answer["ignored"] == ["shoe_size"]


def test_skill_catalog_lists_the_seven_skills(server, catalog):
    status, body, _ = call(server, "GET", SKILLS)
    assert status == 200
    assert [s["skill"] for s in body["skills"]] == catalog.names
    assert len(body["skills"]) == 7
    assert body == json.loads(json.dumps(catalog.to_dict()))


def test_models_listing_shows_every_skill_and_one_skill(server, catalog):
    status, body, _ = call(server, "GET", MODELS)
    assert status == 200
    assert [s["skill"] for s in body["skills"]] == catalog.names
    for entry in body["skills"]:
        production = [v["version"] for v in entry["versions"] if v["stage"] == "production"]
        assert production == [entry["deployed_version"]], entry

    status, body, _ = call(server, "GET", MODELS + "?skill=leadership")
    assert status == 200
    assert [s["skill"] for s in body["skills"]] == ["leadership"]


# -- 400 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"student_id": "s-1", "skill": ', id="truncated"),
        pytest.param(b"{'student_id': 's-1'}", id="single-quotes"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"student_id": "\xff\xfe", "skill": "communication"}', id="not-utf8"),
    ],
)
def test_infer_rejects_bodies_that_are_not_json(server, data):
    status, body, _ = post_text(server, INFER, data)
    assert status == 400
    assert body["error"]["code"] == "invalid_json"


VALIDATION_CASES: list[tuple[str, Callable[[SkillCatalog], Any], str]] = [
    ("missing-student-id", lambda c: without(infer_body(c), "student_id"), "student_id"),
    ("student-id-129-chars", lambda c: infer_body(c, student_id="s" * 129), "student_id"),
    ("student-id-empty", lambda c: infer_body(c, student_id=""), "student_id"),
    ("student-id-number", lambda c: infer_body(c, student_id=17), "student_id"),
    ("skill-empty", lambda c: infer_body(c, skill=""), "skill"),
    ("features-array", lambda c: infer_body(c, features=[1, 2]), "features"),
    ("features-missing", lambda c: without(infer_body(c), "features"), "features"),
    ("explain-string", lambda c: infer_body(c, explain="yes"), "explain"),
    ("body-array", lambda c: [infer_body(c)], "body"),
    ("body-string", lambda c: "hello", "body"),
    ("feature-string", lambda c: with_feature(c, "word_count_total", "8000"), "features.word_count_total"),
    ("feature-bool", lambda c: with_feature(c, "word_count_total", True), "features.word_count_total"),
    ("feature-nan", lambda c: with_feature(c, "word_count_total", RAW + "NaN"), "features.word_count_total"),
    ("feature-infinity", lambda c: with_feature(c, "word_count_total", RAW + "Infinity"), "features.word_count_total"),
    ("feature-minus-infinity", lambda c: with_feature(c, "word_count_total", RAW + "-Infinity"),
     "features.word_count_total"),
    ("feature-1e400", lambda c: with_feature(c, "word_count_total", RAW + "1e400"), "features.word_count_total"),
    ("feature-huge-int", lambda c: with_feature(c, "word_count_total", RAW + "1" + "0" * 400),
     "features.word_count_total"),
    ("feature-above-max", lambda c: with_feature(c, "lexical_diversity", 1.5), "features.lexical_diversity"),
    ("feature-below-min", lambda c: with_feature(c, "word_count_total", -1), "features.word_count_total"),
    ("feature-object", lambda c: with_feature(c, "word_count_total", {"n": 1}), "features.word_count_total"),
    ("required-missing", lambda c: without_feature(c, "word_count_total"), "features.word_count_total"),
    ("required-null", lambda c: with_feature(c, "word_count_total", None), "features.word_count_total"),
]


def _json_text(body: Any) -> str:
    """Writes the body as JSON, with each RAW-prefixed string replaced by the raw token after the prefix."""
    text = json.dumps(body)
    while f'"{RAW}' in text:
        start = text.index(f'"{RAW}')
        end = text.index('"', start + 1)
        text = text[:start] + text[start + 1 + len(RAW):end] + text[end + 1:]
    return text


@pytest.mark.parametrize("make_body, field", [pytest.param(m, f, id=i) for i, m, f in VALIDATION_CASES])
def test_infer_rejects_invalid_requests_naming_the_field(server, catalog, make_body, field):
    status, body, _ = post_text(server, INFER, _json_text(make_body(catalog)))
    assert status == 400
    assert body["error"]["code"] == "validation_error"
    assert field in field_names(body), body


def test_validation_error_names_every_bad_field(server, catalog):
    body = infer_body(catalog, student_id="", explain=1)
    status, answer, _ = post_text(server, INFER, _json_text(body))
    assert status == 400
    assert set(field_names(answer)) == {"student_id", "explain"}

    body = with_feature(catalog, "lexical_diversity", -0.5)
    del body["features"]["word_count_total"]
    status, answer, _ = call(server, "POST", INFER, json=body)
    assert status == 400
    assert set(field_names(answer)) == {"features.word_count_total", "features.lexical_diversity"}


def test_infer_rejects_an_unknown_skill_listing_the_valid_ones(server, catalog):
    status, body, _ = call(server, "POST", INFER, json=infer_body(catalog, skill="astrology"))
    assert status == 400
    assert body["error"]["code"] == "unknown_skill"
    assert body["error"]["details"]["valid_skills"] == catalog.names


def test_models_listing_rejects_an_unknown_or_empty_skill(server, catalog):
    status, body, _ = call(server, "GET", MODELS + "?skill=astrology")
    assert status == 400
    assert body["error"]["code"] == "unknown_skill"
    assert body["error"]["details"]["valid_skills"] == catalog.names

    status, body, _ = call(server, "GET", MODELS + "?skill=")
    assert status == 400
    assert body["error"]["code"] == "validation_error"
    assert field_names(body) == ["skill"]


# -- 404, 405 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/", "/nope", "/api/v2/skills/infer", "/api/v1/skills/", "/api/v1/skills/infer/x/y"])
def test_unknown_paths_answer_not_found(server, method, path):
    status, body, _ = call(server, method, path, json={})
    assert status == 404
    assert body["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", INFER, "POST"),
        ("PUT", INFER, "POST"),
        ("POST", MODELS, "GET"),
        ("DELETE", MODELS, "GET"),
        ("POST", SKILLS, "GET"),
        ("DELETE", SKILLS, "GET"),
        ("POST", HEALTHZ, "GET"),
        ("DELETE", HEALTHZ, "GET"),
    ],
)
def test_wrong_methods_answer_method_not_allowed_with_allow(server, method, path, allow):
    status, body, response = call(server, method, path)
    assert status == 405
    assert body["error"]["code"] == "method_not_allowed"
    assert response.headers["Allow"] == allow


# -- 413 -----------------------------------------------------------------------------------------


@pytest.fixture
def small_body_limit(env: dict[str, str]) -> dict[str, str]:
    """Lowers the server's body limit; requested before live_server, so the server starts with it."""
    env["MAX_REQUEST_BYTES"] = str(SMALL_BODY_LIMIT)
    return env


def _padded(catalog: SkillCatalog, size: int) -> bytes:
    """A valid infer body of exactly `size` bytes, padded with one ignored feature name."""
    body = infer_body(catalog)
    body["features"]["padding"] = 0
    text = json.dumps(body)
    body["features"].pop("padding")
    body["features"]["p" * (size - len(text) + len("padding"))] = 0
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


def test_bodies_over_the_limit_answer_payload_too_large(small_body_limit, live_server, catalog):
    status, body, _ = post_text(live_server, INFER, _padded(catalog, SMALL_BODY_LIMIT))
    assert status == 200  # the limit itself is allowed

    status, body, _ = post_text(live_server, INFER, _padded(catalog, SMALL_BODY_LIMIT + 1))
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count what it reads
        data = _padded(catalog, 3 * SMALL_BODY_LIMIT)
        for start in range(0, len(data), 1024):
            yield data[start:start + 1024]

    status, body, _ = call(live_server, "POST", INFER, data=chunks(), headers={"Content-Type": "application/json"})
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"


# -- 503 -----------------------------------------------------------------------------------------


@pytest.fixture
def server_without_one_skill(settings: Settings, env: dict[str, str], trained_dir: Path) -> Iterator[LocalServer]:
    """A live server whose registry has every skill published but UNSERVED_SKILL left in staging."""
    services = Services(settings)
    for skill in services.catalog.names:
        record = publish_version(services.registry, services.artifacts, trained_dir / skill)
        if skill != UNSERVED_SKILL:
            services.registry.promote(skill, record.version, "production")
    with LocalServer(env, free_port(), workers=2) as server:
        yield server


def test_a_skill_without_production_model_answers_unavailable(server_without_one_skill, catalog):
    server = server_without_one_skill
    status, body, _ = call(server, "GET", HEALTHZ)
    assert status == 503
    assert body["status"] == "unavailable"
    assert list(body["problems"]) == [UNSERVED_SKILL]
    assert set(body["models"]) == set(catalog.names) - {UNSERVED_SKILL}

    status, body, _ = call(server, "POST", INFER, json=infer_body(catalog, skill=UNSERVED_SKILL))
    assert status == 503
    assert body["error"]["code"] == "model_unavailable"

    status, body, _ = call(server, "POST", INFER, json=infer_body(catalog))
    assert status == 200  # the other skills keep serving

    status, body, _ = call(server, "GET", MODELS + f"?skill={UNSERVED_SKILL}")
    assert status == 200
    assert body["skills"][0]["deployed_version"] is None
    assert [v["stage"] for v in body["skills"][0]["versions"]] == ["staging"]


# -- robustness ----------------------------------------------------------------------------------


def _malformed_requests(catalog: SkillCatalog) -> list[tuple[str, str, dict[str, Any]]]:
    """About forty malformed requests of assorted kinds, the same ones on every run."""
    rng = random.Random(20240601)
    valid = json.dumps(infer_body(catalog)).encode()
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for cut in sorted(rng.sample(range(1, len(valid) - 1), 8)):
        cases.append(("POST", INFER, {"data": valid[:cut]}))
    for _ in range(8):
        data = bytearray(valid)
        for position in rng.sample(range(len(data)), 3):
            data[position] = rng.randrange(256)
        cases.append(("POST", INFER, {"data": bytes(data)}))
    for key in ("student_id", "skill", "features", "explain"):
        for value in (None, 0, -1.5, [], {}, "", True, "x" * 300):
            if rng.random() < 0.5:
                cases.append(("POST", INFER, {"data": json.dumps(infer_body(catalog, **{key: value})).encode()}))
    cases += [
        ("POST", INFER, {"data": b"null"}),
        ("POST", INFER, {"data": b"\x00" * 64}),
        ("POST", INFER, {"data": b"\xef\xbb\xbf{}"}),
        ("POST", INFER, {"data": b'{"student_id": "\\ud800", "skill": "communication", "features": {}}'}),
        ("POST", INFER, {"data": b'{"features": {"word_count_total": 1e999999}}'}),
        ("POST", INFER, {"data": valid, "headers": {"Content-Type": "text/plain"}}),
        ("POST", INFER + "?skill=communication", {"data": b"{}"}),
        ("GET", MODELS + "?skill=%ff%fe", {}),
        ("GET", MODELS + "?skill=" + "x" * 2000, {}),
        ("GET", MODELS + "?skill=communication&skill=", {}),
        ("PATCH", SKILLS, {"data": valid}),
        ("DELETE", INFER, {"data": valid}),
        ("GET", "/%00", {}),
    ]
    return cases


def test_malformed_requests_never_answer_5xx(server, catalog):
    cases = _malformed_requests(catalog)
    assert 35 <= len(cases) <= 60
    for method, path, kwargs in cases:
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        response = requests.request(method, server.url + path, timeout=TIMEOUT, headers=headers, **kwargs)
        where = f"{method} {path} {kwargs.get('data', b'')[:80]!r}"
        assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
        body = response.json()
        assert_matches_spec(method, path, response.status_code, body)
        if response.status_code >= 400:
            assert body["error"]["code"] in ERROR_CODES, where


def test_deeply_nested_json_is_invalid_json_not_a_crash(server):
    response = requests.post(server.url + INFER, data=b"[" * 100_000, timeout=TIMEOUT)
    assert response.status_code == 400, response.text[:300]
    assert_matches_spec("POST", INFER, response.status_code, response.json())
    assert response.json()["error"]["code"] == "invalid_json"


# -- found by trying the service as a user and as an attacker would ---------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/api/v1/skills", "/api/v1/skills/models"])
def test_head_is_get_without_the_body(client, path: str) -> None:  # type: ignore[no-untyped-def]
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.data == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]


def test_head_on_a_post_endpoint_is_still_method_not_allowed(client) -> None:  # type: ignore[no-untyped-def]
    response = client.head("/api/v1/skills/infer")
    assert response.status_code == 405 and response.headers["Allow"] == "POST"


def test_a_chunk_number_past_64_bits_is_a_validation_error_not_a_500(client) -> None:  # type: ignore[no-untyped-def]
    body = {"run_id": "00", "chunk": 295403217208167694336, "student_ids": []}
    response = client.post("/tasks/batch-worker", json=body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and error["details"][0]["field"] == "chunk"
    assert_matches_spec("POST", "/tasks/batch-worker", 400, response.get_json())


def test_a_canary_that_fails_to_load_is_named_by_healthz(services, client, trained_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from shared.artifacts import ONNX_FILE

    skill = "creativity"
    production = services.registry.serving()[skill][0]
    # The same trained files again (force: publishing refuses identical artifacts otherwise).
    record = publish_version(services.registry, services.artifacts, trained_dir / skill, force=True)
    # Corrupt the canary's ONNX file in the store: its sha256 no longer matches the registry's record.
    onnx = Path(record.artifact_uri.removeprefix("file://")) / ONNX_FILE
    onnx.write_bytes(onnx.read_bytes() + b"corrupt")
    services.registry.promote(skill, record.version, "canary", 0.2)
    services.engine.refresh(force=True)
    response = client.get("/healthz")
    body = response.get_json()
    assert response.status_code == 200 and body["status"] == "degraded"
    assert body["models"][skill] == production.version
    assert record.version in body["canary_problems"][skill] and "sha256" in body["canary_problems"][skill]
    assert_matches_spec("GET", "/healthz", 200, body)
