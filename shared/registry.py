"""The model registry: every version of every skill's model, its stage, and which versions serve."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol

from shared.clock import now_iso
from shared.errors import Conflict, NotFound, ValidationError
from shared.sqlite import SqliteDatabase

STAGES = ("staging", "production", "canary", "archived")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a skill's model and where its verified artifacts live."""

    skill: str
    version: str
    stage: str
    traffic: float
    created_at: str
    trained_at: str
    metrics: dict[str, Any]
    artifact_uri: str
    sha256: str  # digest of the whole version folder (artifacts.manifest_digest)
    checksums: dict[str, str] = field(default_factory=dict)  # sha256 of each artifact file
    promoted_at: str | None = None  # when it last became production; rollback goes back along this

    def to_dict(self) -> dict[str, Any]:
        """Returns the version as the model-listing API shows it."""
        return {
            "version": self.version,
            "stage": self.stage,
            "traffic": self.traffic,
            "created_at": self.created_at,
            "trained_at": self.trained_at,
            "metrics": self.metrics,
            "artifact_uri": self.artifact_uri,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class StageChange:
    stage: str
    traffic: float
    promoted_at: str | None


class RegistryBackend(Protocol):
    """Storage of model versions; the registry's rules live in ModelRegistry, not here."""

    def insert(self, version: ModelVersion) -> None:
        """Adds a version; raises Conflict if the skill already has that version."""
        ...

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        """Returns the versions of one skill, or of all skills, oldest first."""
        ...

    def apply(self, skill: str, changes: Mapping[str, StageChange]) -> None:
        """Sets stage, traffic and promoted_at of several versions of one skill in one atomic write."""
        ...


def parse_semver(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if not match:
        raise ValidationError([{"field": "version", "problem": "must be a semantic version MAJOR.MINOR.PATCH"}])
    return int(match[1]), int(match[2]), int(match[3])


class ModelRegistry:
    """Registers, promotes and rolls back versions; answers which versions serve each skill."""

    def __init__(self, backend: RegistryBackend) -> None:
        self.backend = backend

    def versions(self, skill: str | None = None) -> list[ModelVersion]:
        return self.backend.list(skill)

    def get(self, skill: str, version: str) -> ModelVersion:
        for candidate in self.backend.list(skill):
            if candidate.version == version:
                return candidate
        raise NotFound(f"Skill {skill!r} has no version {version!r}.")

    def next_version(self, skill: str, bump: str = "minor") -> str:
        """Returns the version after the skill's highest one (1.0.0 for the first)."""
        existing = [parse_semver(v.version) for v in self.backend.list(skill)]
        if not existing:
            return "1.0.0"
        major, minor, patch = max(existing)
        if bump == "major":
            return f"{major + 1}.0.0"
        if bump == "patch":
            return f"{major}.{minor}.{patch + 1}"
        return f"{major}.{minor + 1}.0"

    def register(
        self,
        skill: str,
        version: str,
        *,
        trained_at: str,
        metrics: dict[str, Any],
        artifact_uri: str,
        sha256: str,
        checksums: dict[str, str],
    ) -> ModelVersion:
        """Records a new version in stage `staging`; raises Conflict if it exists."""
        parse_semver(version)
        record = ModelVersion(
            skill=skill,
            version=version,
            stage="staging",
            traffic=0.0,
            created_at=now_iso(),
            trained_at=trained_at,
            metrics=metrics,
            artifact_uri=artifact_uri,
            sha256=sha256,
            checksums=checksums,
        )
        self.backend.insert(record)
        return record

    def promote(self, skill: str, version: str, stage: str = "production", traffic: float | None = None) -> ModelVersion:
        """Moves a version to a stage and returns it.

        To production: the previous production version is archived and the new one takes all
        traffic not held by a canary. To canary: it takes `traffic` (0 < traffic < 1) from production,
        replacing any earlier canary. To staging or archived: it serves nothing.
        """
        if stage not in STAGES:
            raise ValidationError([{"field": "stage", "problem": f"must be one of {', '.join(STAGES)}"}])
        versions = {v.version: v for v in self.backend.list(skill)}
        if version not in versions:
            raise NotFound(f"Skill {skill!r} has no version {version!r}.")
        target = versions[version]
        changes: dict[str, StageChange] = {}
        production = next((v for v in versions.values() if v.stage == "production"), None)
        canary = next((v for v in versions.values() if v.stage == "canary"), None)
        if stage == "production":
            if production and production.version != version:
                changes[production.version] = StageChange("archived", 0.0, production.promoted_at)
            canary_traffic = canary.traffic if canary and canary.version != version else 0.0
            changes[version] = StageChange("production", round(1.0 - canary_traffic, 6), now_iso())
        elif stage == "canary":
            if production is None or production.version == version:
                raise Conflict(f"Skill {skill!r} needs another version in production before a canary.")
            if traffic is None or not 0.0 < traffic < 1.0:
                raise ValidationError([{"field": "traffic", "problem": "a canary needs traffic between 0 and 1"}])
            if canary and canary.version != version:
                changes[canary.version] = StageChange("archived", 0.0, canary.promoted_at)
            changes[version] = StageChange("canary", traffic, target.promoted_at)
            changes[production.version] = StageChange("production", round(1.0 - traffic, 6), production.promoted_at)
        else:
            if target.stage == "production":
                raise Conflict(f"{skill} {version} is in production; promote or roll back another version instead.")
            changes[version] = StageChange(stage, 0.0, target.promoted_at)
            if target.stage == "canary" and production:
                changes[production.version] = StageChange("production", 1.0, production.promoted_at)
        self.backend.apply(skill, changes)
        return self.get(skill, version)

    def rollback(self, skill: str) -> ModelVersion:
        """Archives the production version and restores the one that was in production before it."""
        versions = self.backend.list(skill)
        production = next((v for v in versions if v.stage == "production"), None)
        if production is None:
            raise Conflict(f"Skill {skill!r} has no version in production to roll back.")
        earlier = [
            v for v in versions
            if v.version != production.version and v.promoted_at and v.stage in ("archived", "staging")
        ]
        if not earlier:
            raise Conflict(f"Skill {skill!r} has no earlier production version to roll back to.")
        previous = max(earlier, key=lambda v: v.promoted_at or "")
        canary = next((v for v in versions if v.stage == "canary"), None)
        canary_traffic = canary.traffic if canary else 0.0
        self.backend.apply(
            skill,
            {
                production.version: StageChange("archived", 0.0, production.promoted_at),
                previous.version: StageChange("production", round(1.0 - canary_traffic, 6), now_iso()),
            },
        )
        return self.get(skill, previous.version)

    def serving(self) -> dict[str, list[ModelVersion]]:
        """Returns, per skill with any, the versions that serve traffic: production first, then a canary."""
        result: dict[str, list[ModelVersion]] = {}
        for version in self.backend.list():
            if version.stage in ("production", "canary"):
                result.setdefault(version.skill, []).append(version)
        for versions in result.values():
            versions.sort(key=lambda v: v.stage != "production")
        return result


_REGISTRY_DDL = """
CREATE TABLE IF NOT EXISTS model_versions (
    skill TEXT NOT NULL,
    version TEXT NOT NULL,
    stage TEXT NOT NULL,
    traffic REAL NOT NULL,
    created_at TEXT NOT NULL,
    trained_at TEXT NOT NULL,
    metrics TEXT NOT NULL,
    artifact_uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    checksums TEXT NOT NULL,
    promoted_at TEXT,
    PRIMARY KEY (skill, version)
)
"""


class SqliteRegistryBackend:
    """Model versions in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("model_versions", _REGISTRY_DDL)

    def insert(self, version: ModelVersion) -> None:
        row = asdict(version)
        row["metrics"] = json.dumps(version.metrics)
        row["checksums"] = json.dumps(version.checksums)
        with self.db.transaction() as conn:
            exists = conn.execute(
                "SELECT 1 FROM model_versions WHERE skill = ? AND version = ?", (version.skill, version.version)
            ).fetchone()
            if exists:
                raise Conflict(f"Skill {version.skill!r} already has version {version.version!r}.")
            columns = ", ".join(row)
            conn.execute(
                f"INSERT INTO model_versions ({columns}) VALUES ({', '.join('?' for _ in row)})", list(row.values())
            )

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        if skill is None:
            rows = self.db.query("SELECT * FROM model_versions ORDER BY skill, created_at, rowid")
        else:
            rows = self.db.query("SELECT * FROM model_versions WHERE skill = ? ORDER BY created_at, rowid", (skill,))
        return [_version_from_row(dict(r)) for r in rows]

    def apply(self, skill: str, changes: Mapping[str, StageChange]) -> None:
        with self.db.transaction() as conn:
            for version, change in changes.items():
                conn.execute(
                    "UPDATE model_versions SET stage = ?, traffic = ?, promoted_at = ? WHERE skill = ? AND version = ?",
                    (change.stage, change.traffic, change.promoted_at, skill, version),
                )


def _version_from_row(row: dict[str, Any]) -> ModelVersion:
    row["metrics"] = json.loads(row["metrics"])
    row["checksums"] = json.loads(row["checksums"])
    return ModelVersion(**row)



def listing(registry: ModelRegistry, skills: list[str]) -> list[dict[str, Any]]:
    """Returns the model-listing API's view of the named skills, from the registry alone."""
    by_skill: dict[str, list[ModelVersion]] = {skill: [] for skill in skills}
    for version in registry.versions(skills[0] if len(skills) == 1 else None):
        if version.skill in by_skill:
            by_skill[version.skill].append(version)
    return [
        {
            "skill": skill,
            "deployed_version": next((v.version for v in versions if v.stage == "production"), None),
            "versions": [v.to_dict() for v in versions],
        }
        for skill, versions in by_skill.items()
    ]
