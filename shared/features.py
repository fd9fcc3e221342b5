"""Feature preparation: a caller's feature mapping becomes the ordered vector a skill's model reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from shared.catalog import SkillSpec
from shared.errors import ValidationError

_MISSING = object()


@dataclass(frozen=True)
class PreparedFeatures:
    """One validated row: values in model order, and what was imputed or ignored on the way."""

    values: list[float]
    imputed: list[str]
    ignored: list[str]


class FeatureSchema:
    """One skill's feature contract, precomputed so preparing a row costs one pass over its features."""

    def __init__(self, spec: SkillSpec) -> None:
        self.skill = spec.skill
        self.names: tuple[str, ...] = spec.feature_names
        self._index = {name: i for i, name in enumerate(self.names)}
        self._rules = [(f.name, f.required, f.default, f.min, f.max) for f in spec.features]
        self.defaults = np.array([f.default for f in spec.features], dtype=np.float64)
        self.minimums = np.array([f.min for f in spec.features], dtype=np.float64)
        self.maximums = np.array([f.max for f in spec.features], dtype=np.float64)
        self.required = np.array([f.required for f in spec.features], dtype=bool)
        self._minimums = [f.min for f in spec.features]
        self._maximums = [f.max for f in spec.features]

    def prepare(self, features: Mapping[str, Any], field: str = "features") -> PreparedFeatures:
        """Returns the row in model order.

        Missing imputable features take their default and are listed in `imputed`; names the skill
        does not read are listed in `ignored`. Raises ValidationError naming every bad field
        (`{field}.{name}`): a missing required feature, a non-number, NaN or infinity, a value out of range.
        """
        if not isinstance(features, Mapping):
            raise ValidationError([{"field": field, "problem": "must be an object of feature name to number"}])
        # Fast path for the common request (every feature present, every value a plain in-range number);
        # anything else takes the full pass below, which names each problem.
        values: list[Any] = [features.get(name) for name in self.names]
        if all(type(v) is float or type(v) is int for v in values) and all(
            low <= v <= high for v, low, high in zip(values, self._minimums, self._maximums)
        ):
            ignored = [name for name in features if name not in self._index] if len(features) != len(values) else []
            return PreparedFeatures(values, [], ignored)
        return self._prepare_each(features, field)

    def _prepare_each(self, features: Mapping[str, Any], field: str) -> PreparedFeatures:
        values: list[float] = []
        imputed: list[str] = []
        problems: list[dict[str, str]] = []
        for name, required, default, low, high in self._rules:
            raw = features.get(name, _MISSING)
            if raw is _MISSING or raw is None:
                if required:
                    problems.append({"field": f"{field}.{name}", "problem": "is required"})
                else:
                    imputed.append(name)
                values.append(default)
                continue
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                problems.append({"field": f"{field}.{name}", "problem": "must be a number"})
                values.append(default)
                continue
            try:
                value = float(raw)
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                problems.append({"field": f"{field}.{name}", "problem": "must be a finite number"})
            elif value < low or value > high:
                problems.append(
                    {"field": f"{field}.{name}", "problem": f"must be between {low:g} and {high:g}"}
                )
            values.append(value)
        if problems:
            raise ValidationError(problems)
        index = self._index
        ignored = [name for name in features if name not in index] if len(features) != len(values) - len(imputed) else []
        return PreparedFeatures(values, imputed, ignored)

    def matrix(self, rows: Sequence[PreparedFeatures]) -> np.ndarray:
        """Stacks prepared rows into one float64 matrix, one row per input."""
        if not rows:
            return np.empty((0, len(self.names)), dtype=np.float64)
        return np.array([r.values for r in rows], dtype=np.float64)

    def prepare_matrix(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Vectorized preparation of many rows in model order, NaN marking a missing value.

        Returns the rows with defaults imputed, a mask of the valid rows, and for each invalid row
        the first problem found (a missing required feature, infinity, or a value out of range).
        """
        missing = np.isnan(X)
        with np.errstate(invalid="ignore"):
            out_of_range = ~missing & ((X < self.minimums) | (X > self.maximums))
        bad = (missing & self.required) | out_of_range
        valid = ~bad.any(axis=1)
        problems: dict[int, str] = {}
        for row in np.flatnonzero(~valid):
            column = int(np.flatnonzero(bad[row])[0])
            name = self.names[column]
            if missing[row, column]:
                problems[int(row)] = f"features.{name}: is required"
            elif not np.isfinite(X[row, column]):
                problems[int(row)] = f"features.{name}: must be a finite number"
            else:
                problems[int(row)] = (
                    f"features.{name}: must be between {self.minimums[column]:g} and {self.maximums[column]:g}"
                )
        return np.where(missing, self.defaults, X), valid, problems
