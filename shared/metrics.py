"""Service metrics: recorded in process, aggregated per series, and written in the background by a MetricsWriter."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import weakref
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union

from shared.errors import ConfigError
from shared.settings import Settings
from shared.sqlite import SqliteDatabase, open_database, sqlite_path

log = logging.getLogger("skills.metrics")

# -- the metrics, named once: dashboards and alert policies name these types exactly --------------

METRIC_PREFIX = "custom.googleapis.com/skills/"
REQUEST_LATENCY = METRIC_PREFIX + "request_latency"
REQUEST_COUNT = METRIC_PREFIX + "request_count"
ERROR_COUNT = METRIC_PREFIX + "error_count"
SCORE = METRIC_PREFIX + "score"
BATCH_STUDENTS = METRIC_PREFIX + "batch_students"
BATCH_STUDENTS_PER_SECOND = METRIC_PREFIX + "batch_students_per_second"

# The label a series gets when a request did not reach that far (no skill parsed, no model chosen):
# every series of a metric carries the same label keys, as an auto-created descriptor expects.
NO_VALUE = "none"

# Cloud Monitoring's limits: at most 200 series per CreateTimeSeries call, one point per series every 5 s.
MAX_SERIES_PER_WRITE = 200
MIN_WRITE_INTERVAL_SECONDS = 5.0
# A bound on what one process tracks, so a label fed an unbounded value cannot grow memory and cost.
MAX_SERIES = 2_000

_GAUGE_NAME = re.compile(r"[a-z][a-z0-9_/]{0,99}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_]{0,99}")


# -- what a flush writes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExponentialBuckets:
    """Cloud Monitoring's exponential buckets: underflow below scale, then bounds scale * growth_factor**i."""

    num_finite_buckets: int
    growth_factor: float
    scale: float

    def bounds(self) -> tuple[float, ...]:
        return tuple(self.scale * self.growth_factor**i for i in range(self.num_finite_buckets + 1))


@dataclass(frozen=True)
class LinearBuckets:
    """Cloud Monitoring's linear buckets: underflow below offset, then width-wide buckets."""

    num_finite_buckets: int
    width: float
    offset: float

    def bounds(self) -> tuple[float, ...]:
        # Rounded so that 0.05 * 3 is the 0.15 a reader expects, not 0.15000000000000002.
        return tuple(round(self.offset + self.width * i, 12) for i in range(self.num_finite_buckets + 1))


@dataclass(frozen=True)
class ExplicitBuckets:
    """Cloud Monitoring's explicit buckets (only read back, never written by this service)."""

    boundaries: tuple[float, ...]

    def bounds(self) -> tuple[float, ...]:
        return self.boundaries


BucketOptions = Union[ExponentialBuckets, LinearBuckets, ExplicitBuckets]

# Latency in milliseconds: 0.1 ms to 11 s in 52 buckets 25 % wide (a percentile read from them is
# within about 12 % of the true value); faster answers fall in the underflow bucket, slower in the overflow.
LATENCY_BUCKETS = ExponentialBuckets(num_finite_buckets=52, growth_factor=1.25, scale=0.1)
# Scores in twentieths of [0, 1]; a score of exactly 1.0 falls in the overflow bucket [1, inf).
SCORE_BUCKETS = LinearBuckets(num_finite_buckets=20, width=0.05, offset=0.0)


@dataclass(frozen=True)
class Distribution:
    """A distribution value: counts per bucket (underflow first, overflow last), with count, mean and
    the sum of squared deviations from the mean, as Cloud Monitoring stores them."""

    buckets: BucketOptions
    bucket_counts: tuple[int, ...]
    count: int
    mean: float
    sum_of_squared_deviation: float

    def quantile(self, q: float) -> float:
        """Returns the q-quantile (q in [0, 1]) interpolated within its bucket; NaN when empty.

        Values in the underflow bucket read as its upper bound, in the overflow bucket as its lower bound.
        """
        if self.count <= 0:
            return math.nan
        bounds = self.buckets.bounds()
        rank = q * self.count
        seen = 0
        for index, count in enumerate(self.bucket_counts):
            if count and seen + count >= rank:
                if index == 0:
                    return bounds[0]
                if index > len(bounds) - 1:
                    return bounds[-1]
                lower, upper = bounds[index - 1], bounds[index]
                return lower + (upper - lower) * max(0.0, rank - seen) / count
            seen += count
        return bounds[-1]

    def minus(self, earlier: Distribution) -> Distribution:
        """Returns what was added between an earlier cumulative value of the same series and this one."""
        counts = _padded(self.bucket_counts, len(earlier.bucket_counts))
        before = _padded(earlier.bucket_counts, len(counts))
        count = self.count - earlier.count
        if count <= 0:
            return Distribution(self.buckets, tuple(0 for _ in counts), 0, 0.0, 0.0)
        total = self.mean * self.count - earlier.mean * earlier.count
        squares = (self.sum_of_squared_deviation + self.count * self.mean**2) - (
            earlier.sum_of_squared_deviation + earlier.count * earlier.mean**2
        )
        mean = total / count
        return Distribution(
            self.buckets, tuple(a - b for a, b in zip(counts, before)), count, mean, max(0.0, squares - count * mean**2)
        )


def _padded(counts: tuple[int, ...], length: int) -> tuple[int, ...]:
    return counts + (0,) * max(0, length - len(counts))


MetricValue = Union[int, float, Distribution]


@dataclass(frozen=True)
class MonitoredResource:
    """Where a series comes from; `generic_task` labels make each process (instance) a series of its own."""

    type: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class MetricSeries:
    """One point of one series, as a flush writes it: kind CUMULATIVE (counts since start_time) or GAUGE."""

    metric: str
    labels: Mapping[str, str]
    kind: str
    value: MetricValue
    unit: str
    resource: MonitoredResource
    start_time: float  # seconds since the epoch; equal to end_time for a gauge
    end_time: float


@dataclass(frozen=True)
class TimeSeriesData:
    """A series read back from a MetricsReader: its identity and points (newest first), in plain values."""

    metric: str
    labels: Mapping[str, str]
    resource: MonitoredResource
    kind: str
    points: tuple[tuple[float, float, MetricValue], ...]  # (start_time, end_time, value)


class MetricsWriter(Protocol):
    """Where flushed series go. `write` gets at most MAX_SERIES_PER_WRITE series, each at most once, and
    raises if they could not be written (the recorder keeps them and retries at its next flush)."""

    def write(self, series: Sequence[MetricSeries]) -> None: ...


class MetricsReader(Protocol):
    """Reads series back (Cloud Monitoring): for checks that judge a version by what the service wrote."""

    def list_time_series(
        self,
        metric: str,
        start_time: float,
        end_time: float,
        labels: Mapping[str, str] | None = None,
        resource_labels: Mapping[str, str] | None = None,
    ) -> list[TimeSeriesData]: ...


# -- the local writer ---------------------------------------------------------------------------------


class LogMetricsWriter:
    """Writes each series as one JSON log line (logger `skills.metrics.series`, message `metric ...`)."""

    def __init__(self) -> None:
        self._log = logging.getLogger("skills.metrics.series")
        # METRICS=log chose logs as the metrics' destination: LOG_LEVEL=WARNING (quieter request logs)
        # must not drop them; METRICS=off is how to turn them off.
        self._log.setLevel(logging.INFO)

    def write(self, series: Sequence[MetricSeries]) -> None:
        for s in series:
            fields: dict[str, Any] = {
                "metric": s.metric,
                "kind": s.kind,
                "unit": s.unit,
                "labels": dict(s.labels),
                "value": _loggable(s.value),
                "resource": {"type": s.resource.type, **s.resource.labels},
                "start_time": _iso(s.start_time),
                "end_time": _iso(s.end_time),
            }
            self._log.info(f"metric {s.metric.removeprefix(METRIC_PREFIX)}", extra={"fields": fields})


def _loggable(value: MetricValue) -> Any:
    if not isinstance(value, Distribution):
        return value
    counts = list(value.bucket_counts)
    while counts and counts[-1] == 0:
        counts.pop()  # trailing zeros say nothing, as in Cloud Monitoring's own encoding
    return {
        "count": value.count,
        "mean": round(value.mean, 6),
        "p50": round(value.quantile(0.5), 6),
        "p95": round(value.quantile(0.95), 6),
        "p99": round(value.quantile(0.99), 6),
        "sum_of_squared_deviation": round(value.sum_of_squared_deviation, 6),
        "bucket_counts": counts,
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the local queryable store ------------------------------------------------------------------------

_POINTS_DDL = """
CREATE TABLE IF NOT EXISTS metric_points (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    resource TEXT NOT NULL,
    kind TEXT NOT NULL,
    unit TEXT NOT NULL,
    start_time REAL NOT NULL,
    end_time REAL NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metric_points_by_time ON metric_points (metric, end_time)
"""

# Points older than this are deleted as new ones are written: the local store answers checks over recent
# windows, it is not an archive.
LOCAL_RETENTION_SECONDS = 35 * 86_400


class SqliteMetricsStore:
    """Keeps every written point in the embedded SQLite database and reads series back: the local
    MetricsWriter and MetricsReader, so checks that judge versions by their metrics work without Google."""

    def __init__(self, db: SqliteDatabase, retention_seconds: float = LOCAL_RETENTION_SECONDS) -> None:
        self.db = db
        self.retention_seconds = retention_seconds
        db.ensure_schema("metric_points", _POINTS_DDL)

    def write(self, series: Sequence[MetricSeries]) -> None:
        if not series:
            return
        rows = [
            (
                s.metric, json.dumps(dict(sorted(s.labels.items()))),
                json.dumps({"type": s.resource.type, "labels": dict(sorted(s.resource.labels.items()))}),
                s.kind, s.unit, s.start_time, s.end_time, json.dumps(_stored_value(s.value)),
            )
            for s in series
        ]
        newest = max(s.end_time for s in series)
        with self.db.transaction() as conn:
            conn.executemany("INSERT INTO metric_points VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("DELETE FROM metric_points WHERE end_time < ?", (newest - self.retention_seconds,))

    def list_time_series(
        self,
        metric: str,
        start_time: float,
        end_time: float,
        labels: Mapping[str, str] | None = None,
        resource_labels: Mapping[str, str] | None = None,
    ) -> list[TimeSeriesData]:
        """Returns every series of `metric` whose labels match, with its points whose end time lies in
        [start_time, end_time], newest first (as CloudMonitoringWriter.list_time_series does)."""
        rows = self.db.query(
            "SELECT * FROM metric_points WHERE metric = ? AND end_time >= ? AND end_time <= ? ORDER BY end_time DESC",
            (metric, start_time, end_time),
        )
        found: dict[tuple[str, str], TimeSeriesData] = {}
        for row in rows:
            series_labels = json.loads(row["labels"])
            resource = json.loads(row["resource"])
            if any(series_labels.get(k) != v for k, v in (labels or {}).items()):
                continue
            if any(resource["labels"].get(k) != v for k, v in (resource_labels or {}).items()):
                continue
            point = (float(row["start_time"]), float(row["end_time"]), _read_value(json.loads(row["value"])))
            key = (row["labels"], row["resource"])
            if key in found:
                previous = found[key]
                found[key] = TimeSeriesData(previous.metric, previous.labels, previous.resource, previous.kind, previous.points + (point,))
            else:
                found[key] = TimeSeriesData(
                    metric, series_labels, MonitoredResource(resource["type"], resource["labels"]), row["kind"], (point,)
                )
        return list(found.values())


class FanOutMetricsWriter:
    """Writes each flush to several writers in turn (the log lines, and the local store); raises the first failure."""

    def __init__(self, writers: Sequence[MetricsWriter]) -> None:
        self.writers = list(writers)

    def write(self, series: Sequence[MetricSeries]) -> None:
        for writer in self.writers:
            writer.write(series)


def _stored_value(value: MetricValue) -> Any:
    if not isinstance(value, Distribution):
        return value
    buckets = value.buckets
    if isinstance(buckets, ExponentialBuckets):
        options: dict[str, Any] = {"exponential": [buckets.num_finite_buckets, buckets.growth_factor, buckets.scale]}
    elif isinstance(buckets, LinearBuckets):
        options = {"linear": [buckets.num_finite_buckets, buckets.width, buckets.offset]}
    else:
        options = {"explicit": list(buckets.boundaries)}
    return {
        "buckets": options, "bucket_counts": list(value.bucket_counts), "count": value.count, "mean": value.mean,
        "sum_of_squared_deviation": value.sum_of_squared_deviation,
    }


def _read_value(stored: Any) -> MetricValue:
    if not isinstance(stored, dict):
        return stored
    options = stored["buckets"]
    buckets: BucketOptions
    if "exponential" in options:
        n, growth, scale = options["exponential"]
        buckets = ExponentialBuckets(int(n), float(growth), float(scale))
    elif "linear" in options:
        n, width, offset = options["linear"]
        buckets = LinearBuckets(int(n), float(width), float(offset))
    else:
        buckets = ExplicitBuckets(tuple(options["explicit"]))
    return Distribution(
        buckets, tuple(int(c) for c in stored["bucket_counts"]), int(stored["count"]), float(stored["mean"]),
        float(stored["sum_of_squared_deviation"]),
    )


# -- the recorder -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    metric: str
    kind: str
    unit: str
    label_keys: tuple[str, ...]


_LATENCY = _Spec(REQUEST_LATENCY, "CUMULATIVE", "ms", ("function", "skill", "model_version"))
# skill and model_version make a version's error rate readable (its 5xx over all its requests), as a canary check needs.
_REQUESTS = _Spec(REQUEST_COUNT, "CUMULATIVE", "1", ("function", "status", "skill", "model_version"))
_ERRORS = _Spec(ERROR_COUNT, "CUMULATIVE", "1", ("function", "error_code"))
_SCORES = _Spec(SCORE, "CUMULATIVE", "1", ("skill", "model_version"))
_BATCH_STUDENTS = _Spec(BATCH_STUDENTS, "CUMULATIVE", "1", ())
_BATCH_RATE = _Spec(BATCH_STUDENTS_PER_SECOND, "GAUGE", "1/s", ())
_RECORDED = {spec.metric for spec in (_LATENCY, _REQUESTS, _ERRORS, _SCORES, _BATCH_STUDENTS, _BATCH_RATE)}


class _Histogram:
    __slots__ = ("counts", "count", "total", "squares", "changed", "written_at")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0
        self.squares = 0.0
        self.changed = False
        self.written_at = -math.inf

    def value(self, buckets: BucketOptions) -> Distribution:
        mean = self.total / self.count if self.count else 0.0
        deviation = max(0.0, self.squares - self.total * mean) if self.count else 0.0
        return Distribution(buckets, tuple(self.counts), self.count, mean, deviation)


class _Number:
    __slots__ = ("number", "changed", "written_at")

    def __init__(self, number: float) -> None:
        self.number = number
        self.changed = False
        self.written_at = -math.inf


_Cell = Union[_Histogram, _Number]


class MetricsRecorder:
    """Aggregates the process's metrics in memory and writes the changed series every flush interval
    from a background thread, never on a request's path.

    Recording costs a lock and a dict lookup (a bisect for a distribution): a few microseconds. Every
    series is CUMULATIVE from the recorder's start (or a GAUGE), labelled with this process's own
    `generic_task` resource, so instances never write the same series and a late or failed write loses
    nothing: the next one carries the totals. What is buffered is written at process exit.
    """

    def __init__(
        self,
        writer: MetricsWriter | None,
        resource: MonitoredResource,
        flush_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`writer` None records nothing (METRICS=off). `clock` gives wall-clock seconds (tests step it)."""
        self.enabled = writer is not None
        self.writer = writer
        self.resource = resource
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._reset()
        if self.enabled:
            _recorders.add(self)

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child (a new process is a new instance)."""
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self.started_at = self._clock()
        self._latency: dict[tuple[str, str, str], _Histogram] = {}
        self._requests: dict[tuple[str, int, str, str], _Number] = {}
        self._errors: dict[tuple[str, str], _Number] = {}
        self._scores: dict[tuple[str, str], _Histogram] = {}
        self._batch_students: dict[tuple[()], _Number] = {}
        self._batch_rate: dict[tuple[()], _Number] = {}
        self._batch_window = [0, 0.0]  # students and seconds observed since the rate was last written
        self._gauges: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Number] = {}
        self._series = 0
        self._dropped = 0
        self._failure_logged_at = -math.inf
        self._failures_unlogged = 0

    # -- recording (request path: no I/O, no allocation beyond a new series) -----------------------

    def record_request(
        self,
        function: str,
        status: int,
        seconds: float,
        skill: str | None = None,
        model_version: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Counts one request of a function target, its latency, and its error code if it failed."""
        if not self.enabled:
            return
        if not self._started:
            self._start()
        milliseconds = seconds * 1000.0
        index = bisect_right(_LATENCY_BOUNDS, milliseconds)
        key = (function, skill or NO_VALUE, model_version or NO_VALUE)
        with self._lock:
            histogram = self._latency.get(key) or self._new_histogram(self._latency, key, _LATENCY_BOUNDS)
            if histogram is not None:
                # Inlined _Histogram.add: this runs on every request.
                histogram.counts[index] += 1
                histogram.count += 1
                histogram.total += milliseconds
                histogram.squares += milliseconds * milliseconds
                histogram.changed = True
            counted = (function, status, key[1], key[2])
            counter = self._requests.get(counted) or self._new_number(self._requests, counted)
            if counter is not None:
                counter.number += 1
                counter.changed = True
            if error_code is not None:
                errors = self._errors.get((function, error_code)) or self._new_number(self._errors, (function, error_code))
                if errors is not None:
                    errors.number += 1
                    errors.changed = True

    def record_score(self, skill: str, model_version: str, score: float) -> None:
        """Adds one served score to its skill and model version's score distribution."""
        if not self.enabled:
            return
        if not self._started:
            self._start()
        index = bisect_right(_SCORE_BOUNDS, score)
        with self._lock:
            histogram = self._scores.get((skill, model_version)) or self._new_histogram(
                self._scores, (skill, model_version), _SCORE_BOUNDS
            )
            if histogram is not None:
                histogram.counts[index] += 1
                histogram.count += 1
                histogram.total += score
                histogram.squares += score * score
                histogram.changed = True

    def record_results(self, results: Iterable[Mapping[str, Any]]) -> None:
        """Adds the score of every successful inference result (items with skill, model_version, score;
        failed items, which carry an error instead, are skipped): one update per skill and version."""
        if not self.enabled:
            return
        groups: dict[tuple[str, str], list[float]] = {}
        for result in results:
            score = result.get("score")
            if score is not None:
                groups.setdefault((result["skill"], result["model_version"]), []).append(score)
        if not groups:
            return
        if not self._started:
            self._start()
        for (skill, version), scores in groups.items():
            counts, total, squares = _bucketed(scores, _SCORE_BOUNDS)
            with self._lock:
                histogram = self._scores.get((skill, version)) or self._new_histogram(self._scores, (skill, version), _SCORE_BOUNDS)
                if histogram is None:
                    continue
                histogram.counts = [a + b for a, b in zip(histogram.counts, counts)]
                histogram.count += len(scores)
                histogram.total += total
                histogram.squares += squares
                histogram.changed = True

    def observe_batch_chunk(self, students: int, seconds: float) -> None:
        """Counts a scored batch chunk; the students-per-second gauge is students over seconds of the
        chunks observed since it was last written."""
        if not self.enabled:
            return
        if not self._started:
            self._start()
        with self._lock:
            total = self._batch_students.get(()) or self._new_number(self._batch_students, ())
            rate = self._batch_rate.get(()) or self._new_number(self._batch_rate, ())
            if total is None or rate is None:
                return
            total.number += students
            total.changed = True
            self._batch_window[0] += students
            self._batch_window[1] += seconds
            if self._batch_window[1] > 0:
                rate.number = self._batch_window[0] / self._batch_window[1]
                rate.changed = True

    def gauge(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        """Sets the gauge `custom.googleapis.com/skills/<name>` for these labels (written at the next flush).

        A name is lowercase letters, digits, `_` and `/`; label keys lowercase letters, digits and `_`.
        Every write of one name must use the same label keys. Raises ValueError for a bad name or key.
        """
        if not self.enabled:
            return
        if not _GAUGE_NAME.fullmatch(name) or METRIC_PREFIX + name in _RECORDED:
            raise ValueError(f"Gauge name {name!r} must match {_GAUGE_NAME.pattern} and name no recorded metric.")
        items = sorted((labels or {}).items())
        for label, _ in items:
            if not _LABEL_KEY.fullmatch(label):
                raise ValueError(f"Label key {label!r} of metric {name!r} must match {_LABEL_KEY.pattern}.")
        key = (name, tuple(k for k, _ in items), tuple(str(v) for _, v in items))
        if not self._started:
            self._start()
        with self._lock:
            cell = self._gauges.get(key) or self._new_number(self._gauges, key)
            if cell is not None:
                cell.number = float(value)
                cell.changed = True

    def _new_histogram(self, cells: dict[Any, _Histogram], key: Any, bounds: Sequence[float]) -> _Histogram | None:
        if self._series >= MAX_SERIES:
            self._dropped += 1
            return None
        self._series += 1
        cell = cells[key] = _Histogram(bounds)
        return cell

    def _new_number(self, cells: dict[Any, _Number], key: Any) -> _Number | None:
        if self._series >= MAX_SERIES:
            self._dropped += 1
            return None
        self._series += 1
        cell = cells[key] = _Number(0)
        return cell

    # -- flushing -----------------------------------------------------------------------------------

    def _start(self) -> None:
        """Starts the flush thread on the first record in this process (not at import: a server forks
        its workers after importing, and a thread does not survive a fork)."""
        with self._lock:
            if self._started:
                return
            thread = threading.Thread(
                target=_flush_loop, args=(weakref.ref(self), self._stop, self.flush_seconds), name="metrics-flush", daemon=True
            )
            thread.start()
            # The thread would keep waiting after the recorder is gone; wake it so it ends.
            weakref.finalize(self, self._stop.set)
            self._started = True
        _register_exit_flush()

    def flush(self, final: bool = False) -> int:
        """Writes every series that changed since its last write and was last written at least 5 s ago;
        returns how many were written. A failed write is logged (once per flush interval) and its series
        are kept for the next flush; it never raises. `final` (at exit) waits out the 5 s instead of
        leaving a series for a flush that will never come."""
        if not self.enabled:
            return 0
        with self._flush_lock:
            written, waiting = self._flush_due()
            if final and waiting is not None:
                time.sleep(min(MIN_WRITE_INTERVAL_SECONDS, max(0.0, waiting - self._clock())))
                more, _ = self._flush_due()
                written += more
            return written

    def close(self) -> None:
        """Stops the flush thread and writes what is buffered (at process exit, or when a test is done)."""
        if not self.enabled:
            return
        self._stop.set()
        self.flush(final=True)

    def _flush_due(self) -> tuple[int, float | None]:
        """Writes the due series; returns how many were written and when the earliest held-back one is due."""
        due, cells, waiting = self._snapshot()
        written = 0
        for start in range(0, len(due), MAX_SERIES_PER_WRITE):
            chunk = due[start : start + MAX_SERIES_PER_WRITE]
            try:
                assert self.writer is not None
                self.writer.write(chunk)
            except Exception as exc:
                with self._lock:
                    for cell in cells[start:]:
                        cell.changed = True
                self._report_failure(exc, len(due) - start)
                break
            for cell, series in zip(cells[start : start + MAX_SERIES_PER_WRITE], chunk):
                cell.written_at = series.end_time
            written += len(chunk)
        return written, waiting

    def _snapshot(self) -> tuple[list[MetricSeries], list[_Cell], float | None]:
        now = self._clock()
        # A CUMULATIVE point needs an interval longer than zero.
        end = max(now, self.started_at + 0.001)
        due: list[MetricSeries] = []
        cells: list[_Cell] = []
        waiting: float | None = None
        with self._lock:
            dropped, self._dropped = self._dropped, 0
            for spec, table in self._tables():
                for key, cell in table.items():
                    if not cell.changed:
                        continue
                    if end - cell.written_at < MIN_WRITE_INTERVAL_SECONDS:
                        due_at = cell.written_at + MIN_WRITE_INTERVAL_SECONDS
                        waiting = due_at if waiting is None else min(waiting, due_at)
                        continue
                    cell.changed = False
                    due.append(self._series_of(spec, key, cell, end))
                    cells.append(cell)
                    if spec is _BATCH_RATE:
                        self._batch_window = [0, 0.0]
        if dropped:
            log.warning(
                "metrics series limit reached; records of new series are dropped",
                extra={"max_series": MAX_SERIES, "dropped_records": dropped},
            )
        return due, cells, waiting

    def _tables(self) -> Iterable[tuple[_Spec, Mapping[Any, _Cell]]]:
        yield _LATENCY, self._latency
        yield _REQUESTS, self._requests
        yield _ERRORS, self._errors
        yield _SCORES, self._scores
        yield _BATCH_STUDENTS, self._batch_students
        yield _BATCH_RATE, self._batch_rate
        for (name, keys, values), cell in self._gauges.items():
            yield _Spec(METRIC_PREFIX + name, "GAUGE", "", keys), {values: cell}

    def _series_of(self, spec: _Spec, key: Any, cell: _Cell, end: float) -> MetricSeries:
        value: MetricValue
        if isinstance(cell, _Histogram):
            value = cell.value(LATENCY_BUCKETS if spec is _LATENCY else SCORE_BUCKETS)
        elif spec.kind == "CUMULATIVE":
            value = int(cell.number)
        else:
            value = float(cell.number)
        labels = {label: str(part) for label, part in zip(spec.label_keys, key)}
        start = self.started_at if spec.kind == "CUMULATIVE" else end
        return MetricSeries(spec.metric, labels, spec.kind, value, spec.unit, self.resource, start, end)

    def _report_failure(self, exc: Exception, pending: int) -> None:
        """Logs a failed write at most once per flush interval, with how many failed since the last log."""
        self._failures_unlogged += 1
        now = self._clock()
        if now - self._failure_logged_at < self.flush_seconds:
            return
        log.warning(
            "metrics write failed; the series are kept for the next flush",
            extra={
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "series_pending": pending,
                "failed_writes": self._failures_unlogged,
            },
        )
        self._failure_logged_at = now
        self._failures_unlogged = 0

    def _after_fork(self) -> None:
        # What the parent recorded is the parent's to write; the child is a new instance with its own task id.
        self.resource = MonitoredResource(self.resource.type, {**self.resource.labels, "task_id": new_task_id()})
        self._reset()


_LATENCY_BOUNDS = LATENCY_BUCKETS.bounds()
_SCORE_BOUNDS = SCORE_BUCKETS.bounds()
_NUMPY_FROM = 64  # below this many values a Python loop beats numpy's call overheads


def _bucketed(values: Sequence[float], bounds: Sequence[float]) -> tuple[list[int], float, float]:
    """Returns the count per bucket (underflow first), the sum and the sum of squares of values."""
    if len(values) < _NUMPY_FROM:
        counts = [0] * (len(bounds) + 1)
        for value in values:
            counts[bisect_right(bounds, value)] += 1
        return counts, math.fsum(values), math.fsum(v * v for v in values)
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    indices = np.searchsorted(np.asarray(bounds), array, side="right")
    counts_array = np.bincount(indices, minlength=len(bounds) + 1)
    return [int(c) for c in counts_array], float(array.sum()), float(np.dot(array, array))


def _flush_loop(ref: weakref.ref[MetricsRecorder], stop: threading.Event, interval: float) -> None:
    """The flush thread: holds the recorder only while flushing, so a dropped recorder ends it."""
    while not stop.wait(interval):
        recorder = ref()
        if recorder is None:
            return
        try:
            recorder.flush()
        except Exception:  # flush itself never raises; this keeps the thread alive if it ever does
            log.exception("metrics flush failed")
        del recorder


# Recorders that may hold unwritten series: flushed at exit, reset in a forked child.
_recorders: weakref.WeakSet[MetricsRecorder] = weakref.WeakSet()
_exit_flush_registered = False


def _register_exit_flush() -> None:
    global _exit_flush_registered
    if not _exit_flush_registered:
        _exit_flush_registered = True
        # gunicorn's workers leave through sys.exit on SIGTERM, Cloud Run's shutdown signal, so atexit runs.
        atexit.register(_close_all)


def _close_all() -> None:
    for recorder in list(_recorders):
        recorder.close()


def _reset_after_fork() -> None:
    for recorder in list(_recorders):
        recorder._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def new_task_id() -> str:
    """A random id for this process: the `task_id` of its resource, so no two instances share a series."""
    return secrets.token_hex(8)


def instance_resource(settings: Settings, project_id: str) -> MonitoredResource:
    """This process's `generic_task` resource: project, METRICS_LOCATION, the service (K_SERVICE) as
    namespace and job, and a random task id."""
    return MonitoredResource(
        "generic_task",
        {
            "project_id": project_id,
            "location": settings.metrics_location,
            "namespace": settings.service_name,
            "job": settings.service_name,
            "task_id": new_task_id(),
        },
    )


def local_metrics_store(settings: Settings) -> SqliteMetricsStore | None:
    """Returns the local store METRICS=log also keeps points in: the SQLite database of DATABASE_URL
    (None when DATABASE_URL names Firestore: a deployment reads its metrics from Cloud Monitoring)."""
    path = sqlite_path(settings.database_url)
    return SqliteMetricsStore(open_database(path)) if path is not None else None


def open_metrics_reader(settings: Settings) -> MetricsReader | None:
    """Returns where the metrics METRICS writes can be read back: Cloud Monitoring for `monitoring://PROJECT`,
    the local SQLite store for `log` on a SQLite database; None when nothing can be read (`off`)."""
    if settings.metrics.startswith("monitoring://"):
        from shared.gcp.monitoring import CloudMonitoringWriter

        return CloudMonitoringWriter(settings.metrics.removeprefix("monitoring://"), emulator_host=settings.monitoring_emulator_host)
    if settings.metrics == "log":
        return local_metrics_store(settings)
    return None


def open_metrics(settings: Settings) -> MetricsRecorder:
    """Returns the recorder METRICS asks for: `log` (log lines, and on a SQLite database also its
    `metric_points` table, which open_metrics_reader reads), `off`, or `monitoring://PROJECT` (Cloud Monitoring).

    Raises ConfigError for any other value.
    """
    if settings.metrics == "off":
        return MetricsRecorder(None, MonitoredResource("generic_task", {}))
    if settings.metrics == "log":
        store = local_metrics_store(settings)
        writer: MetricsWriter = LogMetricsWriter() if store is None else FanOutMetricsWriter([LogMetricsWriter(), store])
        project = "local"
    elif settings.metrics.startswith("monitoring://"):
        from shared.gcp.monitoring import CloudMonitoringWriter

        project = settings.metrics.removeprefix("monitoring://")
        writer = CloudMonitoringWriter(project, emulator_host=settings.monitoring_emulator_host)
    else:
        raise ConfigError(f"Config 'METRICS' must be log, off or monitoring://PROJECT; got {settings.metrics!r}.")
    return MetricsRecorder(writer, instance_resource(settings, project), settings.metrics_flush_seconds)
