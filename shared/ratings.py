"""Teacher ratings: a teacher's judgement of a student on a skill, the yardstick the drift check holds scores against.

Ratings use a five-point rubric: 1 (rarely shows the skill) to 5 (consistently shows it), decimals
allowed for averaged rubrics. A student rated by several teachers on a skill counts with the mean
of their ratings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from shared.catalog import SkillCatalog
from shared.clock import now_iso
from shared.feature_store import MAX_STUDENT_ID_LENGTH, is_student_id, read_rows
from shared.sqlite import SqliteDatabase

RATING_MIN, RATING_MAX = 1.0, 5.0
MAX_RATER_LENGTH = 128
DEMO_RATER = "demo-teacher"


@dataclass(frozen=True)
class TeacherRating:
    student_id: str
    skill: str
    rating: float
    rated_at: str
    rater: str


class TeacherRatingStore(Protocol):
    def put_many(self, ratings: Sequence[TeacherRating]) -> int:
        """Stores ratings, one per (student, skill, rater): a later rating by the same rater replaces the
        earlier one. Returns how many were stored."""
        ...

    def for_skill(self, skill: str) -> dict[str, float]:
        """Returns each rated student's mean rating on the skill."""
        ...


_RATINGS_DDL = """
CREATE TABLE IF NOT EXISTS teacher_ratings (
    student_id TEXT NOT NULL,
    skill TEXT NOT NULL,
    rater TEXT NOT NULL,
    rating REAL NOT NULL,
    rated_at TEXT NOT NULL,
    PRIMARY KEY (skill, student_id, rater)
)
"""


class SqliteTeacherRatingStore:
    """Teacher ratings in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("teacher_ratings", _RATINGS_DDL)

    def put_many(self, ratings: Sequence[TeacherRating]) -> int:
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO teacher_ratings (student_id, skill, rater, rating, rated_at) VALUES (?, ?, ?, ?, ?)",
                [(r.student_id, r.skill, r.rater, r.rating, r.rated_at) for r in ratings],
            )
        return len(ratings)

    def for_skill(self, skill: str) -> dict[str, float]:
        rows = self.db.query(
            "SELECT student_id, AVG(rating) AS rating FROM teacher_ratings WHERE skill = ? GROUP BY student_id", (skill,)
        )
        return {r["student_id"]: float(r["rating"]) for r in rows}


# -- loading files --------------------------------------------------------------------------------


@dataclass
class RatingsLoadReport:
    rows: int = 0
    accepted: int = 0
    bad_rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "accepted": self.accepted, "rejected": len(self.bad_rows), "bad_rows": self.bad_rows}


def _check(catalog: SkillCatalog, student_id: Any, skill: Any, rating: Any, rater: Any, rated_at: str) -> tuple[TeacherRating | None, list[str]]:
    problems: list[str] = []
    student_id = student_id.strip() if isinstance(student_id, str) else student_id
    if not is_student_id(student_id):
        problems.append(f"student_id: must be 1 to {MAX_STUDENT_ID_LENGTH} characters")
    if not isinstance(skill, str) or skill not in catalog:
        problems.append(f"skill: must be one of {', '.join(catalog.names)}")
    value = math.nan
    if not isinstance(rating, bool):
        try:
            value = float(rating)
        except (TypeError, ValueError, OverflowError):
            pass
    if not (math.isfinite(value) and RATING_MIN <= value <= RATING_MAX):
        problems.append(f"{skill}: rating must be a number from {RATING_MIN:g} to {RATING_MAX:g}, got {str(rating)[:40]!r}")
    rater = (rater.strip() if isinstance(rater, str) else "") or "unknown"
    if len(rater) > MAX_RATER_LENGTH:
        problems.append(f"rater: must be at most {MAX_RATER_LENGTH} characters")
    if problems:
        return None, problems
    return TeacherRating(student_id, skill, value, rated_at, rater), []


def _ratings_of(row: dict[str, Any], catalog: SkillCatalog, loaded_at: str) -> Iterator[tuple[TeacherRating | None, list[str]]]:
    rated_at = row.get("rated_at") if isinstance(row.get("rated_at"), str) and row.get("rated_at") else loaded_at
    nested = row.get("teacher_ratings")
    if isinstance(nested, dict):
        # The cohort form the demo generator writes: one row per student, a rating per skill.
        for skill, rating in nested.items():
            yield _check(catalog, row.get("student_id"), skill, rating, row.get("rater") or DEMO_RATER, str(rated_at))
        return
    yield _check(catalog, row.get("student_id"), row.get("skill"), row.get("rating"), row.get("rater"), str(rated_at))


def load_ratings_file(store: TeacherRatingStore, catalog: SkillCatalog, path: Path, batch_size: int = 1000) -> RatingsLoadReport:
    """Loads teacher ratings from CSV (`student_id, skill, rating[, rated_at, rater]`) or JSON Lines (the same
    keys, or the generator's `{"student_id", "teacher_ratings": {skill: rating}}`). A bad row is reported with
    its line number and skipped; the rest load."""
    report = RatingsLoadReport()
    pending: list[TeacherRating] = []
    loaded_at = now_iso()
    for line, row, problem in read_rows(Path(path), flatten_features=False):
        report.rows += 1
        if row is None:
            report.bad_rows.append({"line": line, "problems": [problem]})
            continue
        checked = list(_ratings_of(row, catalog, loaded_at))
        problems = [p for _, found in checked for p in found]
        if problems:
            report.bad_rows.append({"line": line, "problems": problems})
            continue
        pending.extend(r for r, _ in checked if r is not None)
        report.accepted += 1
        if len(pending) >= batch_size:
            store.put_many(pending)
            pending = []
    if pending:
        store.put_many(pending)
    return report
