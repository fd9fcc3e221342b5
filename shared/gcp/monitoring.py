"""The Cloud Monitoring metrics writer and reader: series as `create_time_series` calls, and read back."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from shared.metrics import (
    MAX_SERIES_PER_WRITE,
    Distribution,
    ExplicitBuckets,
    ExponentialBuckets,
    LinearBuckets,
    MetricSeries,
    MetricValue,
    MonitoredResource,
    TimeSeriesData,
)

if TYPE_CHECKING:
    from google.cloud import monitoring_v3

# One client per process and endpoint ("" for Google's). Keyed by process id too: a gRPC channel
# does not survive a fork, and a server forks its workers after importing.
_clients: dict[tuple[int, str], monitoring_v3.MetricServiceClient] = {}
_clients_lock = threading.Lock()


def metric_client(emulator_host: str = "") -> monitoring_v3.MetricServiceClient:
    """Returns the process's MetricService client, for Google's endpoint or a plain-gRPC emulator at host:port.

    Built on first call, so a process that never writes a metric never imports the client.
    """
    key = (os.getpid(), emulator_host)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            from google.cloud import monitoring_v3

            if emulator_host:
                import grpc
                from google.auth.credentials import AnonymousCredentials
                from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport

                # The transport ignores credentials when given a channel; anonymous ones make sure no
                # lookup of application default credentials happens in a test.
                transport = MetricServiceGrpcTransport(
                    credentials=AnonymousCredentials(),
                    channel=grpc.insecure_channel(emulator_host),
                )
                client = monitoring_v3.MetricServiceClient(transport=transport)
            else:
                client = monitoring_v3.MetricServiceClient()
            _clients[key] = client
    return client


class CloudMonitoringWriter:
    """Writes series to Cloud Monitoring (a MetricsWriter) and reads them back (a MetricsReader).

    Each `write` sends its series in `create_time_series` calls of at most 200, and raises the API's
    error if a call fails. `timeout` bounds each call, which is not retried: the recorder's next flush
    carries the same cumulative totals.
    """

    def __init__(self, project: str, *, emulator_host: str = "", timeout: float = 10.0) -> None:
        self.project = project
        self.emulator_host = emulator_host
        self.timeout = timeout

    def __repr__(self) -> str:
        where = f" via {self.emulator_host}" if self.emulator_host else ""
        return f"CloudMonitoringWriter(projects/{self.project}{where})"

    @property
    def client(self) -> monitoring_v3.MetricServiceClient:
        return metric_client(self.emulator_host)

    def write(self, series: Sequence[MetricSeries]) -> None:
        """Writes each series' point; raises google.api_core.exceptions.GoogleAPICallError if a call fails."""
        if not series:
            return
        client = self.client
        protos = [_time_series(s) for s in series]
        for start in range(0, len(protos), MAX_SERIES_PER_WRITE):
            client.create_time_series(
                name=f"projects/{self.project}", time_series=protos[start : start + MAX_SERIES_PER_WRITE], timeout=self.timeout
            )

    def list_time_series(
        self,
        metric: str,
        start_time: float,
        end_time: float,
        labels: Mapping[str, str] | None = None,
        resource_labels: Mapping[str, str] | None = None,
    ) -> list[TimeSeriesData]:
        """Returns every series of `metric` whose labels match, with its points whose end time lies in
        [start_time, end_time] (seconds since the epoch), newest first, as plain Python values."""
        from google.cloud import monitoring_v3

        terms = [f"metric.type = {_quoted(metric)}"]
        terms += [f"metric.labels.{key} = {_quoted(value)}" for key, value in sorted((labels or {}).items())]
        terms += [f"resource.labels.{key} = {_quoted(value)}" for key, value in sorted((resource_labels or {}).items())]
        request = monitoring_v3.ListTimeSeriesRequest(
            name=f"projects/{self.project}",
            filter=" AND ".join(terms),
            interval=monitoring_v3.TimeInterval(start_time=_timestamp(start_time), end_time=_timestamp(end_time)),
            view=monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL,
        )
        return [_series_data(s) for s in self.client.list_time_series(request=request)]


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- conversions ----------------------------------------------------------------------------------------


def _timestamp(seconds: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    whole = int(seconds // 1)
    return Timestamp(seconds=whole, nanos=min(999_999_999, int(round((seconds - whole) * 1e9))))


def _time_series(s: MetricSeries) -> monitoring_v3.TimeSeries:
    from google.api import metric_pb2
    from google.cloud import monitoring_v3

    kind = metric_pb2.MetricDescriptor.MetricKind
    value_type = metric_pb2.MetricDescriptor.ValueType
    value: dict[str, Any]
    if isinstance(s.value, Distribution):
        value, typed = {"distribution_value": _distribution_proto(s.value)}, value_type.DISTRIBUTION
    elif isinstance(s.value, int):
        value, typed = {"int64_value": s.value}, value_type.INT64
    else:
        value, typed = {"double_value": float(s.value)}, value_type.DOUBLE
    interval = {"end_time": _timestamp(s.end_time)}
    if s.kind != "GAUGE":
        interval["start_time"] = _timestamp(s.start_time)
    return monitoring_v3.TimeSeries(
        metric={"type": s.metric, "labels": dict(s.labels)},
        resource={"type": s.resource.type, "labels": dict(s.resource.labels)},
        metric_kind=kind.GAUGE if s.kind == "GAUGE" else kind.CUMULATIVE,
        value_type=typed,
        unit=s.unit,
        points=[monitoring_v3.Point(interval=monitoring_v3.TimeInterval(**interval), value=monitoring_v3.TypedValue(**value))],
    )


def _distribution_proto(d: Distribution) -> Any:
    from google.api import distribution_pb2

    options = distribution_pb2.Distribution.BucketOptions
    buckets = d.buckets
    if isinstance(buckets, ExponentialBuckets):
        bucket_options = options(
            exponential_buckets=options.Exponential(
                num_finite_buckets=buckets.num_finite_buckets, growth_factor=buckets.growth_factor, scale=buckets.scale
            )
        )
    elif isinstance(buckets, LinearBuckets):
        bucket_options = options(
            linear_buckets=options.Linear(num_finite_buckets=buckets.num_finite_buckets, width=buckets.width, offset=buckets.offset)
        )
    else:
        bucket_options = options(explicit_buckets=options.Explicit(bounds=list(buckets.boundaries)))
    return distribution_pb2.Distribution(
        count=d.count,
        mean=d.mean,
        sum_of_squared_deviation=d.sum_of_squared_deviation,
        bucket_options=bucket_options,
        bucket_counts=list(d.bucket_counts),
    )


def _seconds(timestamp: Any) -> float:
    # proto-plus answers a Timestamp field as a datetime (DatetimeWithNanoseconds).
    return float(timestamp.timestamp()) if timestamp is not None else 0.0


def _series_data(series: monitoring_v3.TimeSeries) -> TimeSeriesData:
    from google.api import metric_pb2
    from google.cloud import monitoring_v3

    kind = metric_pb2.MetricDescriptor.MetricKind.Name(series.metric_kind)
    points = []
    for point in series.points:
        end = _seconds(point.interval.end_time)
        start = _seconds(point.interval.start_time) if "start_time" in point.interval else end
        points.append((start, end, _value(monitoring_v3.TypedValue.pb(point.value))))
    return TimeSeriesData(
        metric=series.metric.type,
        labels=dict(series.metric.labels),
        resource=MonitoredResource(series.resource.type, dict(series.resource.labels)),
        kind=kind,
        points=tuple(points),
    )


def _value(typed: Any) -> MetricValue:
    which = typed.WhichOneof("value")
    if which == "int64_value":
        return int(typed.int64_value)
    if which == "double_value":
        return float(typed.double_value)
    if which == "distribution_value":
        return _distribution(typed.distribution_value)
    if which == "bool_value":
        return int(typed.bool_value)
    raise ValueError(f"A point of type {which!r} has no plain numeric value.")


def _distribution(proto: Any) -> Distribution:
    options = proto.bucket_options
    which = options.WhichOneof("options")
    buckets: ExponentialBuckets | LinearBuckets | ExplicitBuckets
    if which == "exponential_buckets":
        e = options.exponential_buckets
        buckets = ExponentialBuckets(e.num_finite_buckets, e.growth_factor, e.scale)
    elif which == "linear_buckets":
        lin = options.linear_buckets
        buckets = LinearBuckets(lin.num_finite_buckets, lin.width, lin.offset)
    else:
        buckets = ExplicitBuckets(tuple(options.explicit_buckets.bounds))
    counts = tuple(int(c) for c in proto.bucket_counts)
    # The API may drop trailing empty buckets; give every bucket its count.
    counts += (0,) * (len(buckets.bounds()) + 1 - len(counts))
    return Distribution(buckets, counts, int(proto.count), float(proto.mean), float(proto.sum_of_squared_deviation))
