"""The model registry: every version of every skill's model, its stage, and which versions serve."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol

from shared.clock import now_iso
from shared.errors import Conflict, NotFound, ValidationError
from shared.sqlite import SqliteDatabase

# The stages promote can move a version to.
STAGES = ("staging", "production", "canary", "archived")
# A version being published: its number is taken and its record complete, but its files may not all
# be uploaded yet. Nothing serves it, and promote refuses it; publishing moves it on to staging (or,
# if the upload failed, to archived). The model listing shows it like any stage.
RESERVED = "reserved"
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
    promoted_at: str | None = None  # when it last became production
    promotion_seq: int = 0  # order of promotions within the skill; 0 once rolled back from (rollback skips it)

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
    promotion_seq: int


# Given a skill's versions as stored, returns the stage changes to apply (or raises to change nothing).
Decide = Callable[[list[ModelVersion]], Mapping[str, StageChange]]


def _keep(version: ModelVersion, stage: str, traffic: float) -> StageChange:
    return StageChange(stage, traffic, version.promoted_at, version.promotion_seq)


class RegistryBackend(Protocol):
    """Storage of model versions; the registry's rules live in ModelRegistry, not here."""

    def insert(self, version: ModelVersion) -> None:
        """Adds a version; raises Conflict if the skill already has that version."""
        ...

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        """Returns the versions of one skill, or of all skills, oldest first."""
        ...

    def update(self, skill: str, decide: Decide) -> None:
        """Reads the skill's versions and applies the changes `decide` returns, in one transaction, so
        two operators promoting at once cannot both win; if decide raises, nothing changes."""
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
        return self._insert(skill, version, "staging", trained_at, metrics, artifact_uri, sha256, checksums)

    def reserve(
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
        """Records a version's complete record in stage `reserved`, before its files are uploaded.

        The insert is one transaction, so of two publishers of one version exactly one gets it;
        the other gets Conflict, having written nothing. Returns the reserved record.
        """
        return self._insert(skill, version, RESERVED, trained_at, metrics, artifact_uri, sha256, checksums)

    def complete(self, skill: str, version: str) -> ModelVersion:
        """Moves a reserved version, its files now uploaded, to `staging`; returns it.

        Raises Conflict if it is no longer reserved (an operator archived it meanwhile).
        """

        def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
            target = next((v for v in stored if v.version == version), None)
            if target is None:
                raise NotFound(f"Skill {skill!r} has no version {version!r}.")
            if target.stage != RESERVED:
                raise Conflict(f"{skill} {version} is no longer reserved (it is {target.stage}); its publishing was abandoned.")
            return {version: _keep(target, "staging", 0.0)}

        self.backend.update(skill, decide)
        return self.get(skill, version)

    def abandon(self, skill: str, version: str) -> None:
        """Archives a reserved version whose upload failed, so its number is never reused with other
        files; a version in any other stage is left as it is."""

        def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
            target = next((v for v in stored if v.version == version), None)
            if target is None or target.stage != RESERVED:
                return {}
            return {version: _keep(target, "archived", 0.0)}

        self.backend.update(skill, decide)

    def _insert(
        self,
        skill: str,
        version: str,
        stage: str,
        trained_at: str,
        metrics: dict[str, Any],
        artifact_uri: str,
        sha256: str,
        checksums: dict[str, str],
    ) -> ModelVersion:
        parse_semver(version)
        record = ModelVersion(
            skill=skill,
            version=version,
            stage=stage,
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
        A reserved version (still being published) can only be archived, which abandons its publishing.
        Raises NotFound, ValidationError, or Conflict when the move would leave no production version
        or the version is still being published.
        """
        if stage not in STAGES:
            raise ValidationError([{"field": "stage", "problem": f"must be one of {', '.join(STAGES)}"}])
        if stage == "canary" and (traffic is None or not 0.0 < traffic < 1.0):
            raise ValidationError([{"field": "traffic", "problem": "a canary needs traffic between 0 and 1"}])
        share = traffic or 0.0

        def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
            versions = {v.version: v for v in stored}
            if version not in versions:
                raise NotFound(f"Skill {skill!r} has no version {version!r}.")
            target = versions[version]
            if target.stage == RESERVED and stage != "archived":
                raise Conflict(
                    f"{skill} {version} is still being published (stage {RESERVED}); promote it once its upload has finished."
                )
            production = next((v for v in stored if v.stage == "production"), None)
            canary = next((v for v in stored if v.stage == "canary"), None)
            changes: dict[str, StageChange] = {}
            if stage == "production":
                if production and production.version != version:
                    changes[production.version] = _keep(production, "archived", 0.0)
                canary_traffic = canary.traffic if canary and canary.version != version else 0.0
                next_seq = max(v.promotion_seq for v in stored) + 1
                changes[version] = StageChange("production", round(1.0 - canary_traffic, 6), now_iso(), next_seq)
            elif stage == "canary":
                if production is None or production.version == version:
                    raise Conflict(f"Skill {skill!r} needs another version in production before a canary.")
                if canary and canary.version != version:
                    changes[canary.version] = _keep(canary, "archived", 0.0)
                changes[version] = _keep(target, "canary", share)
                changes[production.version] = _keep(production, "production", round(1.0 - share, 6))
            else:
                if target.stage == "production":
                    raise Conflict(f"{skill} {version} is in production; promote or roll back another version instead.")
                changes[version] = _keep(target, stage, 0.0)
                if target.stage == "canary" and production:
                    changes[production.version] = _keep(production, "production", 1.0)
            return changes

        self.backend.update(skill, decide)
        return self.get(skill, version)

    def rollback(self, skill: str) -> ModelVersion:
        """Archives the production version and restores the one promoted before it; returns that one.

        The version rolled back from is never a rollback target again, so rolling back twice walks
        further back. Raises Conflict if there is no production version or none earlier.
        """
        restored: list[str] = []

        def decide(stored: list[ModelVersion]) -> dict[str, StageChange]:
            production = next((v for v in stored if v.stage == "production"), None)
            if production is None:
                raise Conflict(f"Skill {skill!r} has no version in production to roll back.")
            earlier = [
                v for v in stored
                if v.version != production.version and v.promotion_seq > 0 and v.stage in ("archived", "staging")
            ]
            if not earlier:
                raise Conflict(f"Skill {skill!r} has no earlier production version to roll back to.")
            previous = max(earlier, key=lambda v: v.promotion_seq)
            canary = next((v for v in stored if v.stage == "canary"), None)
            canary_traffic = canary.traffic if canary else 0.0
            restored[:] = [previous.version]  # decide may run again when a transaction retries
            return {
                production.version: StageChange("archived", 0.0, production.promoted_at, 0),
                previous.version: StageChange(
                    "production", round(1.0 - canary_traffic, 6), now_iso(), max(v.promotion_seq for v in stored) + 1
                ),
            }

        self.backend.update(skill, decide)
        return self.get(skill, restored[0])

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
    promotion_seq INTEGER NOT NULL DEFAULT 0,
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

    def update(self, skill: str, decide: Decide) -> None:
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM model_versions WHERE skill = ? ORDER BY created_at, rowid", (skill,)
            ).fetchall()
            changes = decide([_version_from_row(dict(r)) for r in rows])
            for version, change in changes.items():
                conn.execute(
                    "UPDATE model_versions SET stage = ?, traffic = ?, promoted_at = ?, promotion_seq = ? "
                    "WHERE skill = ? AND version = ?",
                    (change.stage, change.traffic, change.promoted_at, change.promotion_seq, skill, version),
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
