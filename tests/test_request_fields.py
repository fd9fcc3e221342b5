"""The request field rules: what each accepts and refuses, the problems a body collects, and the limits the spec states."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from shared import request_fields as rf
from shared.batch import parse_chunk_request, parse_nightly_request
from shared.canary import parse_canary_check_request
from shared.catalog import SkillCatalog
from shared.drift import parse_drift_request
from shared.engine import parse_inference_request
from shared.errors import UnknownSkill, ValidationError
from tests.openapi_contract import HTTP_METHODS, load_spec, resolve_pointer

HUGE = 295403217208167694336  # past 64 bits: what a store cannot hold


def problems(error: pytest.ExceptionInfo[ValidationError]) -> list[dict[str, str]]:
    return error.value.problems


# -- rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 999_999])
def test_an_integer_rule_accepts_integers_in_its_range(value: int) -> None:
    assert rf.CHUNK.accepts(value)


@pytest.mark.parametrize("value", [-1, 1_000_000, HUGE, -HUGE, True, False, 1.0, "1", None, [1]])
def test_an_integer_rule_refuses_booleans_floats_and_integers_out_of_range(value: Any) -> None:
    assert not rf.CHUNK.accepts(value)
    assert rf.CHUNK.problem == "must be an integer from 0 to 999999"


def test_a_text_rule_checks_type_length_and_utf8() -> None:
    assert rf.STUDENT_ID.accepts("s") and rf.STUDENT_ID.accepts("é" * 128)
    for value in ("", "s" * 129, "s-\ud800", 7, None, b"s", ["s"]):
        assert not rf.STUDENT_ID.accepts(value), value
    assert rf.STUDENT_ID.problem == "must be a UTF-8 string of 1 to 128 characters"


def test_a_text_rule_with_a_pattern_matches_it_whole() -> None:
    assert rf.RUN_ID.accepts("nightly-2026_01") and rf.RUN_ID.accepts("x" * 100)
    for value in ("bad\n", "white space", "x" * 101, "", "a/b", "é"):
        assert not rf.RUN_ID.accepts(value), value
    assert rf.CHECK_ID.accepts("latest") and rf.CHECK_ID.accepts("drift-20260101T000000Z-a1b2c3")
    assert not rf.CHECK_ID.accepts("drift_1") and not rf.CHECK_ID.accepts("٣")  # isalnum would take the digit


def test_a_text_list_rule_checks_count_and_each_item() -> None:
    assert rf.CHUNK_STUDENT_IDS.accepts([]) and rf.CHUNK_STUDENT_IDS.accepts(["s"] * rf.MAX_CHUNK_STUDENTS)
    assert not rf.CHUNK_STUDENT_IDS.accepts(["s"] * (rf.MAX_CHUNK_STUDENTS + 1))
    assert not rf.CHUNK_STUDENT_IDS.accepts(["s", ""]) and not rf.CHUNK_STUDENT_IDS.accepts(["s", 7])
    assert not rf.CHUNK_STUDENT_IDS.accepts("s") and not rf.CHUNK_STUDENT_IDS.accepts(("s",))
    assert not rf.DRIFT_SKILLS.accepts([]) and rf.CANARY_SKILLS.accepts([])


# -- a body's fields ---------------------------------------------------------------------------------------


def test_a_body_that_is_not_an_object_is_one_problem_named_body() -> None:
    for body in ([], "x", 3, None, True):
        with pytest.raises(ValidationError) as caught:
            rf.RequestFields(body, frozenset({"a"}))
        assert problems(caught) == [{"field": "body", "problem": "must be a JSON object"}]


def test_every_problem_of_a_body_is_collected_in_field_order() -> None:
    body = {"n": True, "s": "", "b": "yes", "l": [1], "a": []}
    fields = rf.RequestFields(body, frozenset({"n", "s", "b", "l", "m", "a"}))
    assert fields.integer("n", rf.CHUNK) == 0
    assert fields.text("s", rf.STUDENT_ID) == ""
    assert fields.boolean("b") is False
    assert fields.texts("l", rf.CHUNK_STUDENT_IDS) == []
    assert fields.mapping("m", "must be an object") == {}
    assert fields.array("a", "must be a non-empty array") == []
    with pytest.raises(ValidationError) as caught:
        fields.done()
    assert [p["field"] for p in problems(caught)] == ["n", "s", "b", "l", "m", "a"]
    assert problems(caught)[2] == {"field": "b", "problem": "must be true or false"}


def test_optional_fields_read_absent_and_null_as_their_default() -> None:
    fields = rf.RequestFields({"n": None, "b": None}, frozenset({"n", "b", "s", "l"}))
    assert fields.optional_integer("n", rf.WINDOW_DAYS) is None
    assert fields.optional_text("s", rf.RUN_ID) is None
    assert fields.optional_texts("l", rf.CANARY_SKILLS) is None
    assert fields.boolean("b", default=True) is True
    fields.done()


def test_unknown_members_are_problems_and_the_error_stays_small() -> None:
    body = {"a": 1, **{f"extra-{i}" * 40: i for i in range(50)}}
    fields = rf.RequestFields(body, frozenset({"a"}))
    with pytest.raises(ValidationError) as caught:
        fields.done()
    named = problems(caught)
    assert len(named) == rf.MAX_UNKNOWN_FIELDS_NAMED
    assert all(p["problem"] == "is not a field of this request" for p in named)
    assert all(len(p["field"]) <= rf.MAX_UNKNOWN_NAME_SHOWN + 3 for p in named)


def test_a_member_with_an_empty_name_is_a_problem_of_the_body() -> None:
    # Found by tests/test_api_fuzz.py: an answer's field names are never empty (FieldProblem in the spec).
    with pytest.raises(ValidationError) as caught:
        rf.RequestFields({"": 1}, frozenset({"a"})).done()
    assert problems(caught) == [{"field": "body", "problem": rf.EMPTY_NAME_PROBLEM}]


def test_a_parameter_is_returned_or_refused_naming_it() -> None:
    assert rf.parameter("run_id", "run-1", rf.RUN_ID) == "run-1"
    with pytest.raises(ValidationError) as caught:
        rf.parameter("run_id", "run 1", rf.RUN_ID)
    assert problems(caught) == [{"field": "run_id", "problem": rf.RUN_ID.problem}]


@pytest.mark.parametrize(
    "header, attempt",
    [(None, 0), ("0", 0), ("3", 3), ("1000", 1000), ("1001", 0), ("-1", 0), ("²", 0), ("", 0), ("9" * 5000, 0)],
)
def test_a_retry_count_header_outside_its_rule_reads_as_the_default(header: str | None, attempt: int) -> None:
    assert rf.header_integer(header, rf.TASK_ATTEMPT, 0) == attempt


# -- the parse functions use them ------------------------------------------------------------------------------


def test_a_chunk_number_past_64_bits_is_a_problem_of_chunk() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_chunk_request({"run_id": "00", "chunk": HUGE, "student_ids": []})
    assert problems(caught) == [{"field": "chunk", "problem": "must be an integer from 0 to 999999"}]


def test_the_known_chunk_defect_answers_400_naming_chunk_over_http(client) -> None:  # type: ignore[no-untyped-def]
    from tests.openapi_contract import assert_matches_spec

    response = client.post("/tasks/batch-worker", json={"run_id": "00", "chunk": HUGE, "student_ids": []})
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and [p["field"] for p in error["details"]] == ["chunk"]
    assert_matches_spec("POST", "/tasks/batch-worker", 400, response.get_json())


def test_every_request_refuses_members_it_does_not_define(catalog: SkillCatalog) -> None:
    names = catalog.names
    calls = [
        lambda b: parse_inference_request({"student_id": "s", "skill": names[0], "features": {}, **b}, catalog),
        lambda b: parse_nightly_request(b),
        lambda b: parse_chunk_request({"run_id": "r", "chunk": 0, "student_ids": [], **b}),
        lambda b: parse_drift_request(b, names, 7),
        lambda b: parse_canary_check_request(b, names),
    ]
    for call in calls:
        with pytest.raises(ValidationError) as caught:
            call({"window_day": 3})
        assert problems(caught) == [{"field": "window_day", "problem": "is not a field of this request"}]


def test_an_inference_request_names_each_bad_field_before_the_skill(catalog: SkillCatalog) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_inference_request({"student_id": "s", "skill": "x" * 65, "features": {}, "explain": None}, catalog)
    assert [p["field"] for p in problems(caught)] == ["skill"]
    with pytest.raises(UnknownSkill):
        parse_inference_request({"student_id": "s", "skill": "juggling", "features": {}}, catalog)
    request = parse_inference_request({"student_id": "s", "skill": "leadership", "features": {}, "explain": None}, catalog)
    assert request.explain is False


def test_the_canary_check_refuses_skills_the_catalog_does_not_have(catalog: SkillCatalog) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_canary_check_request({"skills": ["leadership", "telepathy"]}, catalog.names)
    assert [p["field"] for p in problems(caught)] == ["skills"] and "telepathy" in problems(caught)[0]["problem"]
    assert parse_canary_check_request({"skills": ["leadership", "leadership"]}, catalog.names) == (None, None, ["leadership"])
    assert parse_canary_check_request({"window_days": 2, "skills": []}, catalog.names) == (None, 2, [])


# -- the spec states the same limits ---------------------------------------------------------------------------


def schema(pointer: str) -> dict[str, Any]:
    return resolve_pointer(load_spec(), pointer)


def text_limits(node: dict[str, Any]) -> tuple[int, int, str | None]:
    return node.get("minLength", 0), node["maxLength"], node.get("pattern")


def rule_limits(rule: rf.TextRule) -> tuple[int, int, str | None]:
    return rule.min_length, rule.max_length, f"^{rule.pattern}$" if rule.pattern else None


def test_the_spec_states_each_rules_limits() -> None:
    components = "#/components/schemas/"
    assert text_limits(schema(components + "StudentId")) == rule_limits(rf.STUDENT_ID)
    assert text_limits(schema(components + "SkillName")) == rule_limits(rf.SKILL_NAME)
    assert text_limits(schema(components + "RunId")) == rule_limits(rf.RUN_ID)
    assert text_limits(schema(components + "CheckId")) == rule_limits(rf.CHECK_ID)
    chunk = schema(components + "BatchChunk")["properties"]
    assert (chunk["chunk"]["minimum"], chunk["chunk"]["maximum"]) == (rf.CHUNK.minimum, rf.CHUNK.maximum)
    assert chunk["student_ids"]["maxItems"] == rf.CHUNK_STUDENT_IDS.max_items
    drift = schema(components + "DriftCheckRequest")["properties"]
    canary = schema(components + "CanaryCheckRequest")["properties"]
    for days in (drift["window_days"], canary["window_days"]):
        assert (days["minimum"], days["maximum"]) == (rf.WINDOW_DAYS.minimum, rf.WINDOW_DAYS.maximum)
    minutes = canary["window_minutes"]
    assert (minutes["minimum"], minutes["maximum"]) == (rf.WINDOW_MINUTES.minimum, rf.WINDOW_MINUTES.maximum)
    assert (drift["skills"]["minItems"], drift["skills"]["maxItems"]) == (rf.DRIFT_SKILLS.min_items, rf.DRIFT_SKILLS.max_items)
    assert (canary["skills"].get("minItems", 0), canary["skills"]["maxItems"]) == (
        rf.CANARY_SKILLS.min_items,
        rf.CANARY_SKILLS.max_items,
    )


def _request_schemas() -> Iterator[tuple[str, Any]]:
    """Every schema a caller fills in: request bodies and parameters, with the place each is at."""
    for path, item in load_spec()["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for parameter in operation.get("parameters", []):
                yield f"{method} {path} {parameter['name']}", parameter["schema"]
            for media in operation.get("requestBody", {}).get("content", {}).values():
                yield f"{method} {path} body", media["schema"]


def _leaves(where: str, node: Any, seen: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every typed schema under a node, through $ref, allOf/oneOf/anyOf, properties, items and additionalProperties."""
    if not isinstance(node, dict):
        return
    if "$ref" in node:
        if node["$ref"] not in seen:
            yield from _leaves(where, schema(node["$ref"]), seen | {node["$ref"]})
        return
    if "type" in node:
        yield where, node
    for key in ("allOf", "oneOf", "anyOf"):
        for part in node.get(key, []):
            yield from _leaves(where, part, seen)
    for name, member in node.get("properties", {}).items():
        yield from _leaves(f"{where}.{name}", member, seen)
    for key in ("items", "additionalProperties"):
        yield from _leaves(f"{where}[{key}]", node.get(key), seen)


def test_every_integer_a_caller_sends_has_a_range_and_every_string_a_length_limit() -> None:
    checked = {"integer": 0, "string": 0, "array": 0}
    for where, root in _request_schemas():
        for place, node in _leaves(where, root):
            kind = node["type"]
            if kind == "integer":
                assert "minimum" in node and "maximum" in node, f"{place}: an integer without a range"
            elif kind == "string":
                assert "maxLength" in node or "enum" in node, f"{place}: a string without maxLength"
            elif kind == "array":
                assert "maxItems" in node, f"{place}: an array without maxItems"
            if kind in checked:
                checked[kind] += 1
    assert all(checked.values()), checked


def test_the_spec_names_the_catalogs_skills_and_their_required_features(catalog: SkillCatalog) -> None:
    assert schema("#/components/schemas/SkillName")["enum"] == catalog.names
    assert all(rf.SKILL_NAME.accepts(name) for name in catalog.names)
    variants = [schema(v["$ref"]) for v in schema("#/components/schemas/InferRequest")["oneOf"]]
    assert [v["properties"]["skill"]["enum"] for v in variants] == [[name] for name in catalog.names]
    for variant in variants:
        spec = catalog.skill(variant["properties"]["skill"]["enum"][0])
        features = variant["properties"]["features"]
        assert features["required"] == [f.name for f in spec.features if f.required], spec.skill
        for feature in spec.features:
            if feature.required:
                stated = schema(features["properties"][feature.name]["$ref"])
                assert (stated["minimum"], stated["maximum"]) == (feature.min, feature.max), feature.name
