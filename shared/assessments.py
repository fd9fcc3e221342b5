"""Skill assessments: every score a nightly run stored, per run (history) and the latest per student and skill."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from shared.sqlite import SqliteDatabase


def assessment_id(run_id: str, student_id: str, skill: str) -> str:
    """Returns the deterministic document id of one assessment, so a retried write overwrites itself."""
    return hashlib.sha256(f"{run_id}\x1f{student_id}\x1f{skill}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Assessment:
    """One student's score on one skill in one run."""

    run_id: str
    student_id: str
    skill: str
    score: float
    confidence: float
    model_version: str
    features_hash: str
    assessed_at: str
    contributions: list[dict[str, Any]] | None = None

    @property
    def id(self) -> str:
        return assessment_id(self.run_id, self.student_id, self.skill)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run_id": self.run_id,
            "student_id": self.student_id,
            "skill": self.skill,
            "score": self.score,
            "confidence": self.confidence,
            "model_version": self.model_version,
            "features_hash": self.features_hash,
            "assessed_at": self.assessed_at,
            "contributions": self.contributions,
        }


class AssessmentStore(Protocol):
    """The `skill_assessments` collection and its latest-per-student-and-skill view."""

    def write(self, assessments: Sequence[Assessment]) -> None:
        """Writes a batch atomically; an id already stored is overwritten (never duplicated), and the
        latest view moves only forward in assessed_at."""
        ...

    def latest(self, student_id: str) -> list[Assessment]:
        """Returns the student's latest assessment per skill."""
        ...

    def history(self, student_id: str, skill: str) -> list[Assessment]:
        """Returns every run's assessment of one student and skill, oldest first."""
        ...

    def count(self, run_id: str | None = None) -> int:
        """Returns how many assessments are stored (for one run, or in all)."""
        ...


_ASSESSMENTS_DDL = """
CREATE TABLE IF NOT EXISTS skill_assessments (
    id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    student_id TEXT NOT NULL,
    skill TEXT NOT NULL,
    score REAL NOT NULL,
    confidence REAL NOT NULL,
    model_version TEXT NOT NULL,
    features_hash TEXT NOT NULL,
    assessed_at TEXT NOT NULL,
    contributions TEXT,
    -- Keyed by what the id hashes, clustered by run: a chunk's writes land together (3-5x faster than a random key).
    PRIMARY KEY (run_id, student_id, skill)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS skill_assessments_student ON skill_assessments (student_id, skill, assessed_at);
CREATE TABLE IF NOT EXISTS latest_assessments (
    student_id TEXT NOT NULL,
    skill TEXT NOT NULL,
    run_id TEXT NOT NULL,
    assessed_at TEXT NOT NULL,
    PRIMARY KEY (student_id, skill)
)
"""

_COLUMNS = ("id", "run_id", "student_id", "skill", "score", "confidence", "model_version", "features_hash", "assessed_at", "contributions")


class SqliteAssessmentStore:
    """Assessments in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("skill_assessments", _ASSESSMENTS_DDL)

    def write(self, assessments: Sequence[Assessment]) -> None:
        rows = [
            (
                a.id, a.run_id, a.student_id, a.skill, a.score, a.confidence, a.model_version,
                a.features_hash, a.assessed_at, json.dumps(a.contributions) if a.contributions is not None else None,
            )
            for a in assessments
        ]
        with self.db.transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO skill_assessments ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                rows,
            )
            conn.executemany(
                "INSERT INTO latest_assessments (student_id, skill, run_id, assessed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(student_id, skill) DO UPDATE SET run_id = excluded.run_id, "
                "assessed_at = excluded.assessed_at WHERE excluded.assessed_at >= latest_assessments.assessed_at",
                [(a.student_id, a.skill, a.run_id, a.assessed_at) for a in assessments],
            )

    def latest(self, student_id: str) -> list[Assessment]:
        rows = self.db.query(
            "SELECT a.* FROM latest_assessments l JOIN skill_assessments a "
            "ON a.run_id = l.run_id AND a.student_id = l.student_id AND a.skill = l.skill "
            "WHERE l.student_id = ? ORDER BY a.skill",
            (student_id,),
        )
        return [_assessment(r) for r in rows]

    def history(self, student_id: str, skill: str) -> list[Assessment]:
        rows = self.db.query(
            "SELECT * FROM skill_assessments WHERE student_id = ? AND skill = ? ORDER BY assessed_at, id",
            (student_id, skill),
        )
        return [_assessment(r) for r in rows]

    def count(self, run_id: str | None = None) -> int:
        if run_id is None:
            rows = self.db.query("SELECT COUNT(*) AS n FROM skill_assessments")
        else:
            rows = self.db.query("SELECT COUNT(*) AS n FROM skill_assessments WHERE run_id = ?", (run_id,))
        return int(rows[0]["n"])


def _assessment(row: Any) -> Assessment:
    return Assessment(
        run_id=row["run_id"],
        student_id=row["student_id"],
        skill=row["skill"],
        score=row["score"],
        confidence=row["confidence"],
        model_version=row["model_version"],
        features_hash=row["features_hash"],
        assessed_at=row["assessed_at"],
        contributions=json.loads(row["contributions"]) if row["contributions"] else None,
    )
