"""The skill catalog: which skills exist and the ordered, typed features each one reads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shared.errors import ConfigError, UnknownSkill

CATALOG_SCHEMA_VERSION = 1
FEATURE_GROUPS = ("linguistic", "behavioral")


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
    def from_dict(cls, raw: dict[str, Any], source: str = "catalog") -> SkillCatalog:
        if raw.get("schema_version") != CATALOG_SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: schema_version must be {CATALOG_SCHEMA_VERSION}, got {raw.get('schema_version')!r}."
            )
        features: dict[str, FeatureSpec] = {}
        for name, spec in raw.get("features", {}).items():
            features[name] = _feature(name, spec, source)
        skills: list[SkillSpec] = []
        for entry in raw.get("skills", []):
            name = entry.get("skill")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{source}: every skill needs a name.")
            listed = entry.get("features", [])
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


def _feature(name: str, spec: dict[str, Any], source: str) -> FeatureSpec:
    where = f"{source}: feature {name!r}"
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
        required=bool(spec.get("required", False)),
        default=default,
        min=low,
        max=high,
    )
