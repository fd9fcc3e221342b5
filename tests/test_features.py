"""Feature preparation: ordering, imputation, ignored names, and every way a value can be rejected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from shared.catalog import FeatureSpec, SkillCatalog, SkillSpec
from shared.errors import ValidationError
from shared.features import FeatureSchema


@pytest.fixture(scope="module")
def spec(catalog: SkillCatalog) -> SkillSpec:
    return catalog.skill("communication")


@pytest.fixture(scope="module")
def schema(spec: SkillSpec) -> FeatureSchema:
    return FeatureSchema(spec)


@pytest.fixture(scope="module")
def required(spec: SkillSpec) -> FeatureSpec:
    return next(f for f in spec.features if f.required)


@pytest.fixture(scope="module")
def imputable(spec: SkillSpec) -> list[FeatureSpec]:
    found = [f for f in spec.features if not f.required]
    assert len(found) >= 2
    return found


def _valid_row(spec: SkillSpec) -> dict[str, float]:
    """Every feature at a value inside its range but distinct from its default, so order is observable."""
    return {f.name: f.min + (f.max - f.min) * (i + 1) / (len(spec.features) + 2) for i, f in enumerate(spec.features)}


def _problems(schema: FeatureSchema, features: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as caught:
        schema.prepare(features)
    return caught.value.problems


def test_values_come_back_in_catalog_order(spec: SkillSpec, schema: FeatureSchema) -> None:
    row = _valid_row(spec)
    shuffled = dict(reversed(list(row.items())))
    prepared = schema.prepare(shuffled)
    assert prepared.values == [row[name] for name in spec.feature_names]
    assert prepared.imputed == []
    assert prepared.ignored == []


def test_missing_imputable_features_take_their_default_and_are_listed(
    spec: SkillSpec, schema: FeatureSchema, imputable: list[FeatureSpec]
) -> None:
    row = _valid_row(spec)
    dropped = [imputable[0].name, imputable[-1].name]
    for name in dropped:
        del row[name]
    prepared = schema.prepare(row)
    by_name = dict(zip(spec.feature_names, prepared.values))
    assert by_name[imputable[0].name] == imputable[0].default
    assert by_name[imputable[-1].name] == imputable[-1].default
    # imputed follows the model's order.
    assert prepared.imputed == [n for n in spec.feature_names if n in dropped]


def test_none_counts_as_missing(spec: SkillSpec, schema: FeatureSchema, imputable: list[FeatureSpec]) -> None:
    row = _valid_row(spec)
    row[imputable[0].name] = None  # type: ignore[assignment]
    prepared = schema.prepare(row)
    assert prepared.imputed == [imputable[0].name]
    assert prepared.values[spec.feature_names.index(imputable[0].name)] == imputable[0].default
    assert prepared.ignored == []


def test_none_for_a_required_feature_is_a_missing_required_feature(
    spec: SkillSpec, schema: FeatureSchema, required: FeatureSpec
) -> None:
    row = _valid_row(spec)
    row[required.name] = None  # type: ignore[assignment]
    assert _problems(schema, row) == [{"field": f"features.{required.name}", "problem": "is required"}]


def test_unknown_names_are_ignored_in_request_order(spec: SkillSpec, schema: FeatureSchema) -> None:
    row = _valid_row(spec)
    features: dict[str, Any] = {"zeta_signal": 1.0}
    features.update(row)
    features["alpha_signal"] = "not even a number"
    prepared = schema.prepare(features)
    assert prepared.ignored == ["zeta_signal", "alpha_signal"]
    assert prepared.values == [row[name] for name in spec.feature_names]


def test_unknown_names_are_ignored_alongside_imputed_ones(
    spec: SkillSpec, schema: FeatureSchema, imputable: list[FeatureSpec]
) -> None:
    row = _valid_row(spec)
    del row[imputable[0].name]
    row[imputable[1].name] = None  # type: ignore[assignment]
    row["extra"] = 3.0
    prepared = schema.prepare(row)
    assert prepared.ignored == ["extra"]
    assert prepared.imputed == [n for n in spec.feature_names if n in {imputable[0].name, imputable[1].name}]


def test_only_required_features_is_enough(spec: SkillSpec, schema: FeatureSchema) -> None:
    row = {f.name: f.default for f in spec.features if f.required}
    prepared = schema.prepare(row)
    assert prepared.values == [f.default for f in spec.features]
    assert prepared.imputed == [f.name for f in spec.features if not f.required]


def test_integers_and_range_bounds_are_accepted(spec: SkillSpec, schema: FeatureSchema) -> None:
    row: dict[str, Any] = _valid_row(spec)
    first, second = spec.features[0], spec.features[1]
    row[first.name] = first.min
    row[second.name] = second.max
    prepared = schema.prepare(row)
    assert prepared.values[0] == first.min
    assert prepared.values[1] == second.max
    assert all(isinstance(v, float) for v in prepared.values)


def test_missing_required_feature(spec: SkillSpec, schema: FeatureSchema, required: FeatureSpec) -> None:
    row = _valid_row(spec)
    del row[required.name]
    assert _problems(schema, row) == [{"field": f"features.{required.name}", "problem": "is required"}]


@pytest.mark.parametrize(
    "value, problem",
    [
        ("0.5", "must be a number"),
        (True, "must be a number"),
        (False, "must be a number"),
        ([1.0], "must be a number"),
        ({"v": 1}, "must be a number"),
        (math.nan, "must be a finite number"),
        (math.inf, "must be a finite number"),
        (-math.inf, "must be a finite number"),
        (10**400, "must be a finite number"),
        (-(10**400), "must be a finite number"),
    ],
    ids=["string", "true", "false", "list", "object", "nan", "inf", "-inf", "int-overflow", "negative-int-overflow"],
)
def test_a_bad_value_is_named(spec: SkillSpec, schema: FeatureSchema, value: Any, problem: str) -> None:
    name = spec.feature_names[2]
    row: dict[str, Any] = _valid_row(spec)
    row[name] = value
    assert _problems(schema, row) == [{"field": f"features.{name}", "problem": problem}]


def test_below_min_and_above_max(spec: SkillSpec, schema: FeatureSchema) -> None:
    low, high = spec.features[0], spec.features[1]
    row: dict[str, Any] = _valid_row(spec)
    row[low.name] = low.min - 0.001
    problems = _problems(schema, row)
    assert [p["field"] for p in problems] == [f"features.{low.name}"]
    assert problems[0]["problem"].startswith("must be between")

    row = _valid_row(spec)
    row[high.name] = high.max + 1
    problems = _problems(schema, row)
    assert [p["field"] for p in problems] == [f"features.{high.name}"]
    assert problems[0]["problem"] == f"must be between {high.min:g} and {high.max:g}"


def test_every_problem_is_reported_together(spec: SkillSpec, schema: FeatureSchema, required: FeatureSpec) -> None:
    row: dict[str, Any] = _valid_row(spec)
    others = [f for f in spec.features if f.name != required.name]
    del row[required.name]
    row[others[0].name] = "high"
    row[others[1].name] = math.nan
    row[others[2].name] = others[2].max * 10 + 10
    with pytest.raises(ValidationError) as caught:
        schema.prepare(row)
    fields = {p["field"] for p in caught.value.problems}
    assert fields == {f"features.{n}" for n in (required.name, others[0].name, others[1].name, others[2].name)}
    assert len(caught.value.problems) == 4
    assert "4 invalid field(s)" in caught.value.message
    body = caught.value.to_dict()["error"]
    assert body["code"] == "validation_error"
    assert body["details"] == caught.value.problems


@pytest.mark.parametrize("features", [[1.0, 2.0], "a=1", 3.0, None])
def test_non_mapping_features_are_rejected(schema: FeatureSchema, features: Any) -> None:
    problems = _problems(schema, features)
    assert problems == [{"field": "features", "problem": "must be an object of feature name to number"}]


def test_the_field_prefix_is_the_callers(spec: SkillSpec, schema: FeatureSchema, required: FeatureSpec) -> None:
    row = _valid_row(spec)
    del row[required.name]
    with pytest.raises(ValidationError) as caught:
        schema.prepare(row, field="items[3].features")
    assert caught.value.problems[0]["field"] == f"items[3].features.{required.name}"


def test_matrix_stacks_rows_as_float64(spec: SkillSpec, schema: FeatureSchema) -> None:
    rows = [schema.prepare(_valid_row(spec)), schema.prepare({f.name: f.default for f in spec.features})]
    X = schema.matrix(rows)
    assert X.dtype == np.float64
    assert X.shape == (2, len(spec.features))
    assert X[1].tolist() == [f.default for f in spec.features]
    empty = schema.matrix([])
    assert empty.shape == (0, len(spec.features))
