"""Batch runs: what a nightly (or ad-hoc) run set out to score, and the progress its chunks report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from shared.clock import now_iso
from shared.errors import NotFound
from shared.sqlite import SqliteDatabase


@dataclass(frozen=True)
class Chunk:
    """One task's share of a run: its students, and once done, what it scored and who failed why."""

    run_id: str
    chunk: int
    student_ids: list[str]
    done: bool = False
    scored: int = 0
    # [{"student_id", "reason", "skills": {skill: reason}}]: a student with at least one skill failed
    failed: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    run_id: str
    full: bool
    models: str  # the model versions the run scores with (feature_store models signature)
    started_at: str
    students_total: int
    tasks_total: int
    tasks_done: int = 0
    students_scored: int = 0
    students_failed: int = 0
    finished_at: str | None = None

    @property
    def status(self) -> str:
        """running until every chunk reported; then succeeded, partial (some students failed on some skill)
        or failed (none scored). students_scored counts students with at least one assessment,
        students_failed those with at least one failed skill: a student can be in both."""
        if self.tasks_done < self.tasks_total:
            return "running"
        if self.students_failed == 0:
            return "succeeded"
        return "partial" if self.students_scored > 0 else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "students_total": self.students_total,
            "students_scored": self.students_scored,
            "students_failed": self.students_failed,
            "tasks_total": self.tasks_total,
            "tasks_done": self.tasks_done,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class RunStore(Protocol):
    """Runs and their chunks; a chunk's result is recorded idempotently, so retries never double-count."""

    def create(self, run: Run, chunks: Sequence[Chunk]) -> bool:
        """Stores a new run and its chunks atomically; returns False (changing nothing) if the run exists."""
        ...

    def get(self, run_id: str) -> Run | None:
        ...

    def chunks(self, run_id: str) -> list[Chunk]:
        ...

    def chunk(self, run_id: str, chunk: int) -> Chunk | None:
        """Returns one chunk of the run (done or not), or None if the run has no such chunk."""
        ...

    def record_chunk(self, run_id: str, chunk: int, scored: int, failed: Sequence[dict[str, Any]]) -> Run:
        """Sets a chunk's result (replacing an earlier attempt's) and returns the run's updated totals."""
        ...


_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS batch_runs (
    run_id TEXT PRIMARY KEY,
    full INTEGER NOT NULL,
    models TEXT NOT NULL,
    started_at TEXT NOT NULL,
    students_total INTEGER NOT NULL,
    tasks_total INTEGER NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS batch_run_chunks (
    run_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    student_ids TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    scored INTEGER NOT NULL DEFAULT 0,
    failed TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (run_id, chunk)
)
"""


class SqliteRunStore:
    """Runs in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("batch_runs", _RUNS_DDL)

    def create(self, run: Run, chunks: Sequence[Chunk]) -> bool:
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM batch_runs WHERE run_id = ?", (run.run_id,)).fetchone():
                return False
            conn.execute(
                "INSERT INTO batch_runs (run_id, full, models, started_at, students_total, tasks_total, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, int(run.full), run.models, run.started_at, run.students_total, run.tasks_total,
                 run.finished_at),
            )
            conn.executemany(
                "INSERT INTO batch_run_chunks (run_id, chunk, student_ids) VALUES (?, ?, ?)",
                [(run.run_id, c.chunk, json.dumps(c.student_ids)) for c in chunks],
            )
        return True

    def get(self, run_id: str) -> Run | None:
        rows = self.db.query(
            "SELECT r.*, COALESCE(SUM(c.done), 0) AS tasks_done, COALESCE(SUM(c.scored), 0) AS students_scored, "
            "COALESCE(SUM(json_array_length(c.failed)), 0) AS students_failed "
            "FROM batch_runs r LEFT JOIN batch_run_chunks c ON c.run_id = r.run_id WHERE r.run_id = ? GROUP BY r.run_id",
            (run_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return Run(
            run_id=r["run_id"],
            full=bool(r["full"]),
            models=r["models"],
            started_at=r["started_at"],
            students_total=r["students_total"],
            tasks_total=r["tasks_total"],
            tasks_done=int(r["tasks_done"]),
            students_scored=int(r["students_scored"]),
            students_failed=int(r["students_failed"]),
            finished_at=r["finished_at"],
        )

    def chunks(self, run_id: str) -> list[Chunk]:
        rows = self.db.query("SELECT * FROM batch_run_chunks WHERE run_id = ? ORDER BY chunk", (run_id,))
        return [_chunk_from_row(r) for r in rows]

    def chunk(self, run_id: str, chunk: int) -> Chunk | None:
        rows = self.db.query("SELECT * FROM batch_run_chunks WHERE run_id = ? AND chunk = ?", (run_id, chunk))
        return _chunk_from_row(rows[0]) if rows else None

    def record_chunk(self, run_id: str, chunk: int, scored: int, failed: Sequence[dict[str, Any]]) -> Run:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE batch_run_chunks SET done = 1, scored = ?, failed = ? WHERE run_id = ? AND chunk = ?",
                (scored, json.dumps(list(failed)), run_id, chunk),
            )
            pending = conn.execute(
                "SELECT COUNT(*) FROM batch_run_chunks WHERE run_id = ? AND done = 0", (run_id,)
            ).fetchone()[0]
            if pending == 0:
                conn.execute(
                    "UPDATE batch_runs SET finished_at = COALESCE(finished_at, ?) WHERE run_id = ?", (now_iso(), run_id)
                )
        run = self.get(run_id)
        if run is None:
            raise NotFound(f"No batch run {run_id!r}.")
        return run


def _chunk_from_row(r: Any) -> Chunk:
    return Chunk(r["run_id"], r["chunk"], json.loads(r["student_ids"]), bool(r["done"]), r["scored"], json.loads(r["failed"]))
