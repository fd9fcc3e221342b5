"""The skill catalog: which skills exist and the ordered, typed features each one reads."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shared.errors import ConfigError, UnknownSkill

CATALOG_SCHEMA_VERSION = 1
FEATURE_GROUPS = ("linguistic", "behavioral")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class FeatureSpec:
    """One input signal: its valid range, and the default (the training median) used when it is missing."""

    name: str
    group: str
    description: str
    required: bool
    default: float
    min: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "description": self.description,
            "required": self.required,
            "default": self.default,
            "min": self.min,
            "max": self.max,
        }


@dataclass(frozen=True)
class SkillSpec:
    """One skill and its features, in the order the skill's model reads them."""

    skill: str
    description: str
    features: tuple[FeatureSpec, ...]

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "skill": self.skill,
            "description": self.description,
            "features": [f.to_dict() for f in self.features],
        }


class SkillCatalog:
    """The ordered set of skills; everything downstream reads skills and features from here."""

    def __init__(self, skills: list[SkillSpec]) -> None:
        self._skills = {s.skill: s for s in skills}

    @classmethod
    def load(cls, path: Path) -> SkillCatalog:
        """Reads and checks a catalog file; raises ConfigError naming what is wrong."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"Skill catalog {path} does not exist (setting SKILL_CATALOG).") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Skill catalog {path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "catalog") -> SkillCatalog:
        """Builds a catalog from its JSON form; raises ConfigError naming what is wrong."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the catalog must be a JSON object.")
        if raw.get("schema_version") != CATALOG_SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: schema_version must be {CATALOG_SCHEMA_VERSION}, got {raw.get('schema_version')!r}."
            )
        raw_features = raw.get("features", {})
        raw_skills = raw.get("skills", [])
        if not isinstance(raw_features, dict) or not isinstance(raw_skills, list):
            raise ConfigError(f"{source}: features must be an object and skills an array.")
        features: dict[str, FeatureSpec] = {}
        for name, spec in raw_features.items():
            features[name] = _feature(name, spec, source)
        skills: list[SkillSpec] = []
        for entry in raw_skills:
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: every skill must be an object.")
            name = entry.get("skill")
            # Skill names become URL parts and artifact folder names.
            if not isinstance(name, str) or not NAME.match(name):
                raise ConfigError(f"{source}: skill name {name!r} must be snake_case (a-z, 0-9, _).")
            listed = entry.get("features", [])
            if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
                raise ConfigError(f"{source}: skill {name!r} must list its features as an array of names.")
            missing = [f for f in listed if f not in features]
            if missing:
                raise ConfigError(f"{source}: skill {name!r} lists undefined features {missing}.")
            if len(set(listed)) != len(listed) or not listed:
                raise ConfigError(f"{source}: skill {name!r} must list distinct features.")
            skills.append(
                SkillSpec(name, str(entry.get("description", "")), tuple(features[f] for f in listed))
            )
        if not skills:
            raise ConfigError(f"{source}: the catalog defines no skill.")
        if len({s.skill for s in skills}) != len(skills):
            raise ConfigError(f"{source}: skill names must be unique.")
        return cls(skills)

    @property
    def names(self) -> list[str]:
        return list(self._skills)

    def __iter__(self) -> Iterator[SkillSpec]:
        return iter(self._skills.values())

    def __len__(self) -> int:
        return len(self._skills)

    def __contains__(self, skill: object) -> bool:
        return skill in self._skills

    def skill(self, name: str) -> SkillSpec:
        """Returns the skill; raises UnknownSkill listing the valid names."""
        try:
            return self._skills[name]
        except (KeyError, TypeError):
            raise UnknownSkill(str(name), self.names) from None

    def to_dict(self) -> dict[str, Any]:
        return {"skills": [s.to_dict() for s in self._skills.values()]}


def _feature(name: str, spec: Any, source: str) -> FeatureSpec:
    where = f"{source}: feature {name!r}"
    if not NAME.match(name):
        raise ConfigError(f"{where}: the name must be snake_case (a-z, 0-9, _).")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be an object.")
    if not isinstance(spec.get("required", False), bool):
        raise ConfigError(f"{where}: required must be true or false.")
    if spec.get("group") not in FEATURE_GROUPS:
        raise ConfigError(f"{where}: group must be one of {FEATURE_GROUPS}.")
    try:
        low, high, default = float(spec["min"]), float(spec["max"]), float(spec["default"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: min, max and default must be numbers.") from None
    if not all(math.isfinite(v) for v in (low, high, default)) or not low <= default <= high or low >= high:
        raise ConfigError(f"{where}: needs finite min < max with min <= default <= max.")
    return FeatureSpec(
        name=name,
        group=spec["group"],
        description=str(spec.get("description", "")),
        required=spec.get("required", False),
        default=default,
        min=low,
        max=high,
    )
