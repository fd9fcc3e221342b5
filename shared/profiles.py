"""Serving profiles: what the service scored, as counts in each model's reference bins, per skill, model version and day.

A profile is kept in parts. Each process writes one part per (skill, version, day), holding its own
running counts, and replaces it at every flush; each nightly chunk writes one part of its own,
replaced if the chunk is retried. The drift check sums the parts of a window. So the cost of a
profile stays flat as traffic grows (one small write per process and flush interval, never one per
request), and no document is written more often than the flush interval.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from shared.clock import now_iso
from shared.drift_statistics import ReferenceProfile
from shared.sqlite import SqliteDatabase

if TYPE_CHECKING:
    from shared.skill_model import SkillModel

log = logging.getLogger(__name__)

PREDICTION = "__prediction__"  # the key of the prediction's counts, beside the features'


def utc_day(timestamp: datetime | None = None) -> str:
    """Returns the UTC day a profile part belongs to, as YYYY-MM-DD."""
    return (timestamp or datetime.now(timezone.utc)).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class ProfilePart:
    """One writer's counts for one skill, model version and day."""

    skill: str
    model_version: str
    day: str
    source: str  # "instance:<id>" for a serving process, "run:<run_id>:chunk:<n>" for a nightly chunk
    students: int
    counts: dict[str, list[int]] = field(default_factory=dict)  # variable -> counts per reference bin
    updated_at: str = ""


class ProfileStore(Protocol):
    def put(self, parts: Sequence[ProfilePart]) -> None:
        """Stores each part, replacing the part its source wrote earlier for the same skill, version and day."""
        ...

    def parts(self, skill: str, model_version: str, days: Sequence[str]) -> list[ProfilePart]:
        """Returns every part of a skill's version on those days."""
        ...


def sum_parts(parts: Iterable[ProfilePart]) -> tuple[int, dict[str, np.ndarray]]:
    """Returns the students and the summed counts of each variable over parts."""
    students = 0
    totals: dict[str, np.ndarray] = {}
    for part in parts:
        students += part.students
        for name, counts in part.counts.items():
            values = np.asarray(counts, dtype=np.int64)
            if name in totals and len(totals[name]) == len(values):
                totals[name] += values
            elif name not in totals:
                totals[name] = values.copy()
    return students, totals


class ModelProfile:
    """A model version's reference profiles, ready to bin what that version scores."""

    def __init__(self, metadata: Mapping[str, Any], feature_names: Sequence[str]) -> None:
        reference = metadata["reference"]
        n = int(reference.get("n", 0))
        self.feature_names = list(feature_names)
        self.features = {name: ReferenceProfile.from_metadata(reference["features"][name], n) for name in feature_names}
        self.prediction = ReferenceProfile.from_metadata(reference["prediction"], n)
        # All features' inner edges in one sorted array, each feature shifted into a range of its own,
        # so that one searchsorted bins every feature of a matrix at once.
        inner = [self.features[name].edges[1:-1] for name in self.feature_names]
        self._low = np.array([e[0] - 1.0 if len(e) else -1.0 for e in inner])
        self._high = np.array([e[-1] + 1.0 if len(e) else 1.0 for e in inner])
        width = float((self._high - self._low).max()) * 2.0
        self._shift = np.arange(len(inner)) * width - self._low
        self._keys = np.concatenate([e + shift for e, shift in zip(inner, self._shift)])
        self._bins = np.array([len(self.features[name].counts) for name in self.feature_names])
        self._first_key = np.concatenate([[0], np.cumsum(self._bins - 1)[:-1]])  # keys before each feature's
        self._first_bin = np.concatenate([[0], np.cumsum(self._bins)[:-1]])  # bins before each feature's
        self._total_bins = int(self._bins.sum())

    def reference(self, name: str) -> ReferenceProfile:
        return self.prediction if name == PREDICTION else self.features[name]

    def counts(self, X: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
        """Bins rows of raw features (in the model's order) and their scores; values that are not finite are left out."""
        # Clipping keeps each value inside its feature's range of keys without changing its bin.
        shifted = np.clip(X, self._low, self._high)
        shifted += self._shift
        position = np.searchsorted(self._keys, shifted, side="right")
        index = position + (self._first_bin - self._first_key)  # key position -> the feature's own bins
        finite = np.isfinite(X)
        table = np.bincount(index.ravel() if finite.all() else index[finite], minlength=self._total_bins)
        result = {name: table[start : start + size] for name, start, size in zip(self.feature_names, self._first_bin, self._bins)}
        result[PREDICTION] = self.prediction.bin_counts(scores)
        return result


_profiles: dict[tuple[str, str, str], ModelProfile] = {}
_profiles_lock = threading.Lock()


def model_profile(model: SkillModel) -> ModelProfile:
    """Returns the model's reference profiles, built once per process and version."""
    key = (model.skill, model.version, model.record.sha256)
    profile = _profiles.get(key)
    if profile is None:
        with _profiles_lock:
            profile = _profiles.get(key) or ModelProfile(model.metadata, model.feature_names)
            _profiles[key] = profile
    return profile


def chunk_parts(
    run_id: str, chunk: int, day: str, scored: Sequence[tuple[SkillModel, np.ndarray, np.ndarray]]
) -> list[ProfilePart]:
    """Returns a nightly chunk's profile parts: per model, the counts of the rows it scored."""
    now = now_iso()
    parts = []
    for model, X, scores in scored:
        counts = model_profile(model).counts(X, scores)
        parts.append(
            ProfilePart(
                model.skill, model.version, day, f"run:{run_id}:chunk:{chunk}", len(scores),
                {name: c.tolist() for name, c in counts.items()}, now,
            )
        )
    return parts


class _RowBuffer:
    """Rows one model version scored since the last fold, in preallocated arrays: appending a row
    creates no Python object for the garbage collector to walk, whatever the traffic."""

    def __init__(self, model: SkillModel, capacity: int) -> None:
        self.model = model
        self.rows = np.empty((capacity, len(model.feature_names)), dtype=np.float64)
        self.scores = np.empty(capacity, dtype=np.float64)
        self.size = 0


class ServingProfiler:
    """Accumulates what this process scores online and writes its running counts in the background.

    `observe` only copies the row into a preallocated buffer (it runs on the request path); binning
    happens when a buffer fills or at a flush, and writing in `flush`, which a daemon thread calls every
    `flush_seconds` and which runs at exit too.
    """

    def __init__(self, store: Callable[[], ProfileStore], flush_seconds: float, buffer_rows: int = 4096) -> None:
        self._store = store
        self._flush_seconds = flush_seconds
        self._buffer_rows = buffer_rows
        self.source = f"instance:{uuid.uuid4().hex[:16]}"
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._buffers: dict[int, _RowBuffer] = {}
        self._pending: list[tuple[SkillModel, Sequence[float] | np.ndarray, float]] = []
        self._totals: dict[tuple[str, str, str], tuple[int, dict[str, np.ndarray]]] = {}
        self._thread: threading.Thread | None = None
        self._thread_pid = 0
        self._failing = False

    def observe(self, model: SkillModel, values: Sequence[float] | np.ndarray, score: float) -> None:
        """Records one scored row (raw feature values in the model's order, and its score).

        On the request path this is one list append (atomic under the GIL, so no lock): the rows are
        copied into arrays and binned later, by the flush thread or once the list is long.
        """
        pending = self._pending
        pending.append((model, values, score))
        if len(pending) >= self._buffer_rows:
            self._drain()
        if self._thread_pid != os.getpid():
            self._start_thread()

    def _drain(self) -> None:
        """Moves the pending rows into the per-model buffers (folding those that fill)."""
        with self._lock:
            pending, self._pending = self._pending, []
            for model, values, score in pending:
                buffer = self._buffers.get(id(model))
                if buffer is None or buffer.model is not model:
                    buffer = self._buffers[id(model)] = _RowBuffer(model, self._buffer_rows)
                buffer.rows[buffer.size] = values
                buffer.scores[buffer.size] = score
                buffer.size += 1
                if buffer.size == len(buffer.scores):
                    self._fold(buffer)

    def observe_many(self, model: SkillModel, X: np.ndarray, scores: np.ndarray) -> None:
        """Records a batch of scored rows (binned at once: a batch is already a matrix)."""
        with self._lock:
            self._add(model, utc_day(), model_profile(model).counts(X, scores), len(scores))
        if self._thread_pid != os.getpid():
            self._start_thread()

    def _start_thread(self) -> None:
        # A server forks its workers after import: each worker process needs a flusher of its own.
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            atexit.register(self.flush)  # gunicorn's workers leave through sys.exit: atexit runs
            self._thread_pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="serving-profile-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self._flush_seconds):
            self.flush()

    def _fold(self, buffer: _RowBuffer) -> None:
        """Bins a buffer's rows into today's totals and empties it; the caller holds the lock."""
        if buffer.size:
            counts = model_profile(buffer.model).counts(buffer.rows[: buffer.size], buffer.scores[: buffer.size])
            self._add(buffer.model, utc_day(), counts, buffer.size)
            buffer.size = 0

    def _add(self, model: SkillModel, day: str, counts: dict[str, np.ndarray], students: int) -> None:
        key = (model.skill, model.version, day)
        before, totals = self._totals.get(key, (0, {}))
        for name, binned in counts.items():
            totals[name] = totals[name] + binned if name in totals else binned
        self._totals[key] = (before + students, totals)

    def flush(self) -> None:
        """Bins what is buffered and writes this process's running counts; a failure is logged, never raised."""
        with self._flush_lock:
            self._drain()
            with self._lock:
                for buffer in self._buffers.values():
                    self._fold(buffer)
                snapshot = [(key, students, dict(totals)) for key, (students, totals) in self._totals.items()]
                # Days before today are final: written once more now, then forgotten.
                today = utc_day()
                self._totals = {k: v for k, v in self._totals.items() if k[2] >= today}
            if not snapshot:
                return
            now = now_iso()
            parts = [
                ProfilePart(skill, version, day, self.source, students, {n: c.tolist() for n, c in totals.items()}, now)
                for (skill, version, day), students, totals in snapshot
            ]
            try:
                self._store().put(parts)
                self._failing = False
            except Exception as exc:  # a profile must never fail serving; it is written again next flush
                if not self._failing:
                    log.warning("serving profile not written; retrying at the next flush", extra={"reason": str(exc)})
                self._failing = True


# -- the embedded store ------------------------------------------------------------------------------

_PROFILES_DDL = """
CREATE TABLE IF NOT EXISTS serving_profiles (
    skill TEXT NOT NULL,
    model_version TEXT NOT NULL,
    day TEXT NOT NULL,
    source TEXT NOT NULL,
    students INTEGER NOT NULL,
    counts TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (skill, model_version, day, source)
)
"""


class SqliteProfileStore:
    """Serving profile parts in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("serving_profiles", _PROFILES_DDL)

    def put(self, parts: Sequence[ProfilePart]) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO serving_profiles (skill, model_version, day, source, students, counts, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(p.skill, p.model_version, p.day, p.source, p.students, json.dumps(p.counts, separators=(",", ":")), p.updated_at) for p in parts],
            )

    def parts(self, skill: str, model_version: str, days: Sequence[str]) -> list[ProfilePart]:
        if not days:
            return []
        rows = self.db.query(
            f"SELECT * FROM serving_profiles WHERE skill = ? AND model_version = ? AND day IN ({','.join('?' * len(days))}) "  # nosec B608 # only ? placeholders are formatted in; the days are bound
            "ORDER BY day, source",
            [skill, model_version, *days],
        )
        return [
            ProfilePart(r["skill"], r["model_version"], r["day"], r["source"], r["students"], json.loads(r["counts"]), r["updated_at"])
            for r in rows
        ]
