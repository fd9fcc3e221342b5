"""A local Cloud Monitoring MetricService (which has no emulator): a gRPC server that records every call,
checks the documented rules of CreateTimeSeries, and answers ListTimeSeries from what was written.

Rules it enforces, as the real API documents them (a rejected series fails the call with
INVALID_ARGUMENT naming it, while the call's valid series are still written, as the API does):
at most 200 series per call, one point per series, no series twice in one call; custom metric types
only, of kind GAUGE or CUMULATIVE (user-defined metrics may not be DELTA); a series' kind, value type
and label keys fixed by its first write (the auto-created descriptor); a point at least 5 s after the
series' previous one; a CUMULATIVE point's start before its end and equal to the series' earlier start
(or after its last end: a reset); a GAUGE point's start unset or equal to its end; a distribution's
bucket counts summing to its count; the five labels of a `generic_task` resource.

ListTimeSeries understands filters made of `metric.type`, `metric.labels.K`, `resource.type` and
`resource.labels.K` equalities joined by AND, the interval, and paging; it answers UNIMPLEMENTED to
an aggregation (a reader here aggregates what it reads).
"""

from __future__ import annotations

import re
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc
import pytest
from google.api import metric_pb2
from google.cloud import monitoring_v3
from google.protobuf import empty_pb2

SERVICE = "google.monitoring.v3.MetricService"
MAX_SERIES_PER_CALL = 200
MIN_POINT_INTERVAL_SECONDS = 5.0
GENERIC_TASK_LABELS = {"project_id", "location", "namespace", "job", "task_id"}
CUSTOM_PREFIXES = ("custom.googleapis.com/", "external.googleapis.com/", "workload.googleapis.com/")
_KIND = metric_pb2.MetricDescriptor.MetricKind
_VALUE_TYPE = metric_pb2.MetricDescriptor.ValueType
_VALUE_FIELDS = {
    _VALUE_TYPE.BOOL: "bool_value",
    _VALUE_TYPE.INT64: "int64_value",
    _VALUE_TYPE.DOUBLE: "double_value",
    _VALUE_TYPE.STRING: "string_value",
    _VALUE_TYPE.DISTRIBUTION: "distribution_value",
}
_TERM = re.compile(r'\s*([a-z_.]+[A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*')

SeriesKey = tuple[str, tuple[tuple[str, str], ...], str, tuple[tuple[str, str], ...]]


@dataclass
class Call:
    """One call the service received: the method, the request (proto-plus), and the status it answered."""

    method: str
    request: Any
    status: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


@dataclass
class WrittenSeries:
    """A series as written: its identity, kind and value type, and its accepted points, oldest first,
    each as (start seconds, end seconds, monitoring_v3.Point)."""

    metric_type: str
    metric_labels: dict[str, str]
    resource_type: str
    resource_labels: dict[str, str]
    metric_kind: int
    value_type: int
    unit: str
    points: list[tuple[float, float, Any]] = field(default_factory=list)


class MetricServiceEmulator:
    """The MetricService on a free port of 127.0.0.1. Use as a context manager, or start() and stop().

    `host` is what MONITORING_EMULATOR_HOST takes; `calls` lists every call received; `fail_with`
    makes every call answer an error (e.g. UNAVAILABLE) until it is set back to None.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.fail_with: grpc.StatusCode | None = None
        self.port = 0
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, WrittenSeries] = {}
        # What the first write of a metric type fixed, as the auto-created descriptor would.
        self._descriptors: dict[str, tuple[int, int, frozenset[str]]] = {}

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> MetricServiceEmulator:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "CreateTimeSeries": grpc.unary_unary_rpc_method_handler(
                self._create_time_series,
                request_deserializer=monitoring_v3.CreateTimeSeriesRequest.deserialize,
                response_serializer=lambda _: empty_pb2.Empty().SerializeToString(),
            ),
            "ListTimeSeries": grpc.unary_unary_rpc_method_handler(
                self._list_time_series,
                request_deserializer=monitoring_v3.ListTimeSeriesRequest.deserialize,
                response_serializer=monitoring_v3.ListTimeSeriesResponse.serialize,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        # Port 0: the system picks a free port, so there is no race with another process picking it.
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> MetricServiceEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests read ------------------------------------------------------------------------

    def create_calls(self, ok_only: bool = False) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == "CreateTimeSeries" and (c.status == grpc.StatusCode.OK or not ok_only)]

    def written(self, metric_type: str) -> list[WrittenSeries]:
        """Every series of a metric type that was written, with its accepted points."""
        with self._lock:
            return [s for s in self._series.values() if s.metric_type == metric_type]

    # -- CreateTimeSeries ---------------------------------------------------------------------------

    def _create_time_series(self, request: monitoring_v3.CreateTimeSeriesRequest, context: grpc.ServicerContext) -> Any:
        call = Call("CreateTimeSeries", request)
        with self._lock:
            self.calls.append(call)
            status, details = self._check_and_write(request)
        call.status, call.details = status, details
        if status != grpc.StatusCode.OK:
            context.abort(status, details)
        return empty_pb2.Empty()

    def _check_and_write(self, request: monitoring_v3.CreateTimeSeriesRequest) -> tuple[grpc.StatusCode, str]:
        if self.fail_with is not None:
            return self.fail_with, "failure injected by the test"
        if not re.fullmatch(r"projects/[^/]+", request.name):
            return grpc.StatusCode.INVALID_ARGUMENT, f"Name {request.name!r} is not projects/PROJECT."
        count = len(request.time_series)
        if not 1 <= count <= MAX_SERIES_PER_CALL:
            return grpc.StatusCode.INVALID_ARGUMENT, f"A request must hold 1 to 200 TimeSeries; this one has {count}."
        errors: list[str] = []
        seen: set[SeriesKey] = set()
        for index, series in enumerate(request.time_series):
            key = _key(series)
            problem = "Duplicate TimeSeries encountered." if key in seen else self._write(key, series)
            seen.add(key)
            if problem:
                errors.append(f"timeSeries[{index}]: {problem}")
        if errors:
            return grpc.StatusCode.INVALID_ARGUMENT, "One or more TimeSeries could not be written: " + "; ".join(errors)
        return grpc.StatusCode.OK, ""

    def _write(self, key: SeriesKey, series: monitoring_v3.TimeSeries) -> str:
        """Stores the series' point, or returns why the real API would refuse it."""
        metric_type = series.metric.type
        if not metric_type.startswith(CUSTOM_PREFIXES):
            return f"Metric type {metric_type!r} is not a user-defined metric type."
        if series.resource.type == "generic_task" and set(series.resource.labels) != GENERIC_TASK_LABELS:
            return f"generic_task needs exactly the labels {sorted(GENERIC_TASK_LABELS)}; got {sorted(series.resource.labels)}."
        if len(series.points) != 1:
            return f"A TimeSeries must hold exactly one point; this one has {len(series.points)}."
        kind = int(series.metric_kind) or _KIND.GAUGE
        if kind not in (_KIND.GAUGE, _KIND.CUMULATIVE):
            return f"A user-defined metric must be GAUGE or CUMULATIVE, not {_KIND.Name(kind)}."
        point = series.points[0]
        typed = monitoring_v3.TypedValue.pb(point.value)
        which = typed.WhichOneof("value")
        value_type = int(series.value_type) or next((t for t, f in _VALUE_FIELDS.items() if f == which), 0)
        if _VALUE_FIELDS.get(value_type) != which:
            return f"The point holds {which}, but the value type is {_VALUE_TYPE.Name(value_type)}."
        labels = frozenset(series.metric.labels)
        descriptor = self._descriptors.setdefault(metric_type, (kind, value_type, labels))
        if descriptor != (kind, value_type, labels):
            return (
                f"{metric_type} was created as {_KIND.Name(descriptor[0])} {_VALUE_TYPE.Name(descriptor[1])} with labels "
                f"{sorted(descriptor[2])}; this point is {_KIND.Name(kind)} {_VALUE_TYPE.Name(value_type)} with {sorted(labels)}."
            )
        if which == "distribution_value":
            distribution = typed.distribution_value
            if sum(distribution.bucket_counts) != distribution.count:
                return f"The distribution's bucket counts sum to {sum(distribution.bucket_counts)}, not its count {distribution.count}."
        end = _seconds(point.interval.end_time) if "end_time" in point.interval else 0.0
        has_start = "start_time" in point.interval
        start = _seconds(point.interval.start_time) if has_start else end
        if end <= 0:
            return "The point has no end time."
        if kind == _KIND.GAUGE and has_start and start != end:
            return "A GAUGE point's start time, if given, must equal its end time."
        if kind == _KIND.CUMULATIVE and not start < end:
            return "A CUMULATIVE point needs a start time before its end time."
        stored = self._series.get(key)
        if stored is not None:
            last_start, last_end, _ = stored.points[-1]
            if end <= last_end:
                return "Points must be written in order: this point is not newer than the series' last one."
            if end - last_end < MIN_POINT_INTERVAL_SECONDS:
                return (
                    "One or more points were written more frequently than the maximum sampling period configured "
                    f"for the metric ({end - last_end:.3f} s after the last point; the minimum is 5 s)."
                )
            if kind == _KIND.CUMULATIVE and start != last_start and start < last_end:
                return "A CUMULATIVE point must keep its series' start time, or start after its last point (a reset)."
        else:
            stored = self._series[key] = WrittenSeries(
                metric_type, dict(series.metric.labels), series.resource.type, dict(series.resource.labels),
                kind, value_type, series.unit,
            )
        stored.points.append((start, end, point))
        return ""

    # -- ListTimeSeries -----------------------------------------------------------------------------

    def _list_time_series(self, request: monitoring_v3.ListTimeSeriesRequest, context: grpc.ServicerContext) -> Any:
        call = Call("ListTimeSeries", request)
        with self._lock:
            self.calls.append(call)
            try:
                found = self._find(request)
            except _Refused as refused:
                call.status, call.details = refused.status, refused.details
        if call.status != grpc.StatusCode.OK:
            context.abort(call.status, call.details)
        offset = int(request.page_token or 0)
        size = request.page_size or 1000
        token = str(offset + size) if offset + size < len(found) else ""
        return monitoring_v3.ListTimeSeriesResponse(time_series=found[offset : offset + size], next_page_token=token)

    def _find(self, request: monitoring_v3.ListTimeSeriesRequest) -> list[monitoring_v3.TimeSeries]:
        if self.fail_with is not None:
            raise _Refused(self.fail_with, "failure injected by the test")
        if "aggregation" in request and request.aggregation.per_series_aligner:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED, "This emulator does not aggregate.")
        try:
            matches = _filter(request.filter)
        except ValueError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        end = _seconds(request.interval.end_time)
        start = _seconds(request.interval.start_time) if "start_time" in request.interval else end
        found = []
        for stored in self._series.values():
            points = [p for s, e, p in reversed(stored.points) if start <= e <= end]
            if points and matches(stored):
                found.append(
                    monitoring_v3.TimeSeries(
                        metric={"type": stored.metric_type, "labels": stored.metric_labels},
                        resource={"type": stored.resource_type, "labels": stored.resource_labels},
                        metric_kind=stored.metric_kind,
                        value_type=stored.value_type,
                        unit=stored.unit,
                        points=points,
                    )
                )
        return found


class _Refused(Exception):
    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def _filter(text: str) -> Callable[[WrittenSeries], bool]:
    """Returns a predicate for a filter of `field = "value"` terms joined by AND; raises ValueError otherwise."""
    wanted: list[tuple[str, str]] = []
    for term in re.split(r"\s+AND\s+", text.strip()):
        match = _TERM.fullmatch(term)
        if not match:
            raise ValueError(f"This emulator understands `field = \"value\"` terms joined by AND; not {term!r}.")
        wanted.append((match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))))
    if not any(name == "metric.type" for name, _ in wanted):
        raise ValueError("A filter must name a metric.type.")

    def field_value(stored: WrittenSeries, name: str) -> str | None:
        if name == "metric.type":
            return stored.metric_type
        if name == "resource.type":
            return stored.resource_type
        if name.startswith("metric.labels."):
            return stored.metric_labels.get(name.removeprefix("metric.labels."))
        if name.startswith("resource.labels."):
            return stored.resource_labels.get(name.removeprefix("resource.labels."))
        raise ValueError(f"This emulator cannot filter on {name!r}.")

    for name, _ in wanted:
        field_value(WrittenSeries("", {}, "", {}, 0, 0, ""), name)  # rejects an unknown field before any match
    return lambda stored: all(field_value(stored, name) == value for name, value in wanted)


def _key(series: monitoring_v3.TimeSeries) -> SeriesKey:
    return (
        series.metric.type,
        tuple(sorted(series.metric.labels.items())),
        series.resource.type,
        tuple(sorted(series.resource.labels.items())),
    )


def _seconds(timestamp: Any) -> float:
    return float(timestamp.timestamp())


@pytest.fixture
def metric_service() -> Iterator[MetricServiceEmulator]:
    """A MetricService emulator on a free port of 127.0.0.1, stopped after the test."""
    with MetricServiceEmulator() as emulator:
        yield emulator
