"""The metrics recorder and its writers: requests through the real app end as series in a local
MetricService (which enforces Cloud Monitoring's rules), written in calls of at most 200 series, never
the same series from two instances nor twice within 5 s, never failing a request, and flushed at exit."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import requests

from functions.local_server import create_app
from shared.catalog import SkillCatalog
from shared.gcp.monitoring import CloudMonitoringWriter
from shared.local_stack import LocalServer, ensure_demo_models, free_port
from shared.logs import JsonFormatter
from shared.metrics import (
    BATCH_STUDENTS,
    BATCH_STUDENTS_PER_SECOND,
    ERROR_COUNT,
    LATENCY_BUCKETS,
    MAX_SERIES,
    MAX_SERIES_PER_WRITE,
    METRIC_PREFIX,
    REQUEST_COUNT,
    REQUEST_LATENCY,
    SCORE,
    Distribution,
    LogMetricsWriter,
    MetricSeries,
    MetricsRecorder,
    MonitoredResource,
    open_metrics,
)
from shared.services import Services, use_services
from shared.settings import Settings
from shared.synthetic import generate_cohort
from tests.emulators.metric_service import MetricServiceEmulator, metric_service  # noqa: F401 (a fixture)

PROJECT = "test-project"
SKILL = "leadership"


class SteppedClock:
    """Wall-clock time that moves only when the test says so (the 5 s rule and the log interval read it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


def _resource(task_id: str = "task-a") -> MonitoredResource:
    return MonitoredResource(
        "generic_task", {"project_id": PROJECT, "location": "global", "namespace": "skills-test", "job": "skills-test", "task_id": task_id}
    )


def _monitored_settings(env: dict[str, str], emulator: MetricServiceEmulator, **more: str) -> Settings:
    return Settings.from_env(
        {**env, "METRICS": f"monitoring://{PROJECT}", "MONITORING_EMULATOR_HOST": emulator.host, "METRICS_FLUSH_SECONDS": "60", **more}
    )


@pytest.fixture
def monitored(env: dict[str, str], trained_dir: Path, metric_service: MetricServiceEmulator) -> Iterator[Services]:
    """The process's services on the embedded stores, writing metrics to the local MetricService."""
    services = Services(_monitored_settings(env, metric_service))
    ensure_demo_models(services, trained_dir)
    use_services(services)
    yield services
    use_services(None)
    services.metrics.close()


def _infer_body(catalog: SkillCatalog, skill: str, index: int) -> dict[str, Any]:
    spec = catalog.skill(skill)
    cohort = generate_cohort(catalog, 1, seed=index)
    return {"student_id": f"s-{index}", "skill": skill, "features": dict(zip(spec.feature_names, map(float, cohort.matrix(spec)[0])))}


def _latest(series: Any) -> Any:
    """The value of a written series' newest point (monitoring_v3.TypedValue)."""
    return series.points[-1][2].value


# -- through the real app -------------------------------------------------------------------------


def test_a_thousand_requests_leave_one_latency_distribution_of_count_1000(
    monitored: Services, metric_service: MetricServiceEmulator, catalog: SkillCatalog
) -> None:
    client = create_app().test_client()
    bodies = [_infer_body(catalog, SKILL, i) for i in range(20)]
    for i in range(1000):
        response = client.post("/api/v1/skills/infer", json=bodies[i % len(bodies)])
        assert response.status_code == 200, response.get_data(as_text=True)
    assert client.post("/api/v1/skills/infer", json={**bodies[0], "skill": "juggling"}).status_code == 400

    written = monitored.metrics.flush()

    calls = metric_service.create_calls()
    assert all(c.status == grpc.StatusCode.OK for c in calls), [c.details for c in calls]
    assert len(calls) == math.ceil(written / MAX_SERIES_PER_WRITE) == 1
    assert sum(len(c.request.time_series) for c in calls) == written
    (latency,) = [s for s in metric_service.written(REQUEST_LATENCY) if s.metric_labels["skill"] == SKILL]
    assert latency.metric_labels == {"function": "infer", "skill": SKILL, "model_version": "1.0.0"}
    distribution = _latest(latency).distribution_value
    assert distribution.count == 1000
    assert sum(distribution.bucket_counts) == 1000
    assert 0.1 < distribution.mean < 10_000  # milliseconds
    assert distribution.bucket_options.exponential_buckets.scale == LATENCY_BUCKETS.scale
    assert latency.resource_type == "generic_task"
    assert latency.resource_labels["project_id"] == PROJECT and latency.resource_labels["namespace"] == "skills-local"

    requests_by_status = {s.metric_labels["status"]: _latest(s).int64_value for s in metric_service.written(REQUEST_COUNT)}
    assert requests_by_status == {"200": 1000, "400": 1}
    (errors,) = metric_service.written(ERROR_COUNT)
    assert errors.metric_labels == {"function": "infer", "error_code": "unknown_skill"}
    (scores,) = metric_service.written(SCORE)
    assert scores.metric_labels == {"skill": SKILL, "model_version": "1.0.0"}
    assert _latest(scores).distribution_value.count == 1000


def test_the_batch_endpoint_records_the_score_of_each_successful_item(
    monitored: Services, metric_service: MetricServiceEmulator, catalog: SkillCatalog
) -> None:
    items = [_infer_body(catalog, skill, i) for i, skill in enumerate(["leadership"] * 120 + ["creativity"] * 3)]
    items.append({"student_id": "bad", "skill": "juggling", "features": {}})
    response = create_app().test_client().post("/api/v1/skills/infer/batch", json={"items": items})
    assert response.status_code == 200 and response.get_json()["failed"] == 1

    monitored.metrics.flush()

    counts = {s.metric_labels["skill"]: _latest(s).distribution_value.count for s in metric_service.written(SCORE)}
    assert counts == {"leadership": 120, "creativity": 3}
    (latency,) = metric_service.written(REQUEST_LATENCY)
    assert latency.metric_labels == {"function": "infer_batch", "skill": "none", "model_version": "none"}


def test_a_failing_write_fails_no_request_and_is_logged_once_per_interval(
    monitored: Services, metric_service: MetricServiceEmulator, catalog: SkillCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    metric_service.stop()  # the MetricService is gone: every write fails
    client = create_app().test_client()
    with caplog.at_level(logging.WARNING, logger="skills.metrics"):
        for i in range(50):
            assert client.post("/api/v1/skills/infer", json=_infer_body(catalog, SKILL, i)).status_code == 200
        for _ in range(3):  # three flushes within one interval
            assert monitored.metrics.flush() == 0
            assert client.get("/healthz").status_code == 200
    failures = [r for r in caplog.records if r.name == "skills.metrics" and "write failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert "UNAVAILABLE" in failures[0].__dict__["error"] or "Unavailable" in failures[0].__dict__["error"]


def test_a_failed_write_loses_nothing_and_is_logged_again_only_after_an_interval(
    metric_service: MetricServiceEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    clock = SteppedClock()
    recorder = MetricsRecorder(CloudMonitoringWriter(PROJECT, emulator_host=metric_service.host), _resource(), 60.0, clock)
    metric_service.fail_with = grpc.StatusCode.UNAVAILABLE
    with caplog.at_level(logging.WARNING, logger="skills.metrics"):
        for _ in range(0, 120, 10):  # a flush every 10 s of stepped time, for two minutes
            recorder.record_request("infer", 200, 0.002, SKILL, "1.0.0")
            clock.step(10)
            assert recorder.flush() == 0
    assert len([r for r in caplog.records if "write failed" in r.getMessage()]) == 2  # at 0 s and at 60 s

    metric_service.fail_with = None
    clock.step(10)
    assert recorder.flush() == 2
    (latency,) = metric_service.written(REQUEST_LATENCY)
    assert _latest(latency).distribution_value.count == 12  # every request recorded while writes failed
    recorder.close()


# -- the rules of the API ---------------------------------------------------------------------------


def test_more_than_200_series_are_written_in_calls_of_at_most_200(metric_service: MetricServiceEmulator) -> None:
    recorder = MetricsRecorder(CloudMonitoringWriter(PROJECT, emulator_host=metric_service.host), _resource(), 60.0)
    for i in range(450):
        recorder.gauge("test_gauge", float(i), {"item": f"i{i:03d}"})

    assert recorder.flush() == 450

    calls = metric_service.create_calls()
    assert [len(c.request.time_series) for c in calls] == [200, 200, 50]
    assert all(c.status == grpc.StatusCode.OK for c in calls)
    assert len(metric_service.written(METRIC_PREFIX + "test_gauge")) == 450
    recorder.close()


def test_the_local_metric_service_refuses_what_cloud_monitoring_refuses(metric_service: MetricServiceEmulator) -> None:
    from google.api_core import exceptions
    from google.cloud import monitoring_v3

    writer = CloudMonitoringWriter(PROJECT, emulator_host=metric_service.host)
    now = time.time()

    def series(i: int, end: float, kind: str = "GAUGE", value: float | int = 1.0) -> MetricSeries:
        return MetricSeries(METRIC_PREFIX + "rule", {"item": str(i)}, kind, value, "", _resource(), end if kind == "GAUGE" else now - 60, end)

    too_many = [
        monitoring_v3.TimeSeries(
            metric={"type": METRIC_PREFIX + "many", "labels": {"item": str(i)}},
            resource={"type": "global", "labels": {"project_id": PROJECT}},
            points=[{"interval": {"end_time": {"seconds": int(now)}}, "value": {"double_value": 1.0}}],
        )
        for i in range(MAX_SERIES_PER_WRITE + 1)
    ]
    with pytest.raises(exceptions.InvalidArgument, match="1 to 200"):
        writer.client.create_time_series(name=f"projects/{PROJECT}", time_series=too_many)
    writer.client.create_time_series(name=f"projects/{PROJECT}", time_series=too_many[:MAX_SERIES_PER_WRITE])
    writer.write([series(1, now)])
    with pytest.raises(exceptions.InvalidArgument, match="more frequently"):
        writer.write([series(1, now + 1)])  # the same series 1 s later
    writer.write([series(1, now + 5)])
    with pytest.raises(exceptions.InvalidArgument, match="created as GAUGE DOUBLE"):
        writer.write([series(2, now, "CUMULATIVE", 3)])  # the descriptor was fixed by the first write
    with pytest.raises(exceptions.InvalidArgument, match="Duplicate"):
        writer.write([series(3, now), series(3, now)])


def test_a_second_flush_within_5s_writes_nothing_until_5s_have_passed(metric_service: MetricServiceEmulator) -> None:
    clock = SteppedClock()
    recorder = MetricsRecorder(CloudMonitoringWriter(PROJECT, emulator_host=metric_service.host), _resource(), 60.0, clock)
    recorder.record_request("infer", 200, 0.001, SKILL, "1.0.0")
    recorder.record_score(SKILL, "1.0.0", 0.7)
    clock.step(1)
    assert recorder.flush() == 3  # latency, requests, score

    clock.step(1)
    assert recorder.flush() == 0  # nothing changed: no call at all
    recorder.record_request("infer", 200, 0.001, SKILL, "1.0.0")
    clock.step(1)
    assert recorder.flush() == 0  # latency and requests changed, but were written 2 s ago
    assert len(metric_service.create_calls()) == 1

    clock.step(3)
    assert recorder.flush() == 2  # 5 s after their last write: the changed ones, not the score
    calls = metric_service.create_calls()
    assert len(calls) == 2 and all(c.status == grpc.StatusCode.OK for c in calls)
    assert {s.metric.type for s in calls[1].request.time_series} == {REQUEST_LATENCY, REQUEST_COUNT}
    recorder.close()


def test_two_instances_never_write_the_same_series(
    env: dict[str, str], metric_service: MetricServiceEmulator
) -> None:
    settings = _monitored_settings(env, metric_service)
    first, second = open_metrics(settings), open_metrics(settings)
    for recorder in (first, second):
        recorder.record_request("infer", 200, 0.003, SKILL, "1.0.0")
        recorder.observe_batch_chunk(200, 0.5)
    assert first.flush() == 4 and second.flush() == 4  # the same labels, at once: both accepted

    assert all(c.status == grpc.StatusCode.OK for c in metric_service.create_calls())
    latency = metric_service.written(REQUEST_LATENCY)
    assert len(latency) == 2
    assert latency[0].metric_labels == latency[1].metric_labels
    assert latency[0].resource_labels["task_id"] != latency[1].resource_labels["task_id"]
    assert {s.resource_labels["task_id"] for s in metric_service.written(BATCH_STUDENTS)} == {
        first.resource.labels["task_id"], second.resource.labels["task_id"]
    }
    (rate, _) = metric_service.written(BATCH_STUDENTS_PER_SECOND)
    assert _latest(rate).double_value == pytest.approx(400.0)
    first.close()
    second.close()


def test_a_forked_worker_is_a_new_instance_whose_flush_thread_starts_on_its_first_record(tmp_path: Path) -> None:
    recorder = MetricsRecorder(LogMetricsWriter(), _resource(), 60.0)
    recorder.record_request("infer", 200, 0.001, SKILL, "1.0.0")  # the parent's: stays the parent's
    output = tmp_path / "child.jsonl"
    pid = os.fork()
    if pid == 0:  # the child: report facts to the file, then leave without running pytest's exit
        status = 1
        try:
            handler = logging.FileHandler(output)
            handler.setFormatter(JsonFormatter())
            logging.getLogger("skills.metrics.series").addHandler(handler)
            before = [t.name for t in threading.enumerate()]
            recorder.record_request("infer", 200, 0.001, SKILL, "1.0.0")
            after = [t.name for t in threading.enumerate()]
            recorder.flush()
            handler.close()
            with open(output, "a") as facts:
                facts.write(json.dumps({"before": before, "after": after, "task_id": recorder.resource.labels["task_id"]}) + "\n")
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    *lines, facts = [json.loads(line) for line in output.read_text().splitlines()]
    assert "metrics-flush" not in facts["before"] and "metrics-flush" in facts["after"]
    assert facts["task_id"] != recorder.resource.labels["task_id"]
    latency = next(line for line in lines if line["metric"] == REQUEST_LATENCY)
    assert latency["value"]["count"] == 1  # the child's request only
    assert latency["resource"]["task_id"] == facts["task_id"]
    recorder.close()


def test_the_flush_thread_writes_without_being_asked(metric_service: MetricServiceEmulator) -> None:
    recorder = MetricsRecorder(CloudMonitoringWriter(PROJECT, emulator_host=metric_service.host), _resource(), flush_seconds=0.2)
    recorder.record_score(SKILL, "1.0.0", 0.4)
    deadline = time.monotonic() + 10
    while not metric_service.written(SCORE) and time.monotonic() < deadline:
        time.sleep(0.05)
    (scores,) = metric_service.written(SCORE)
    assert _latest(scores).distribution_value.count == 1
    recorder.close()


def test_a_process_tracks_at_most_max_series_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    recorder = MetricsRecorder(LogMetricsWriter(), _resource(), 60.0)
    for i in range(MAX_SERIES + 10):
        recorder.gauge("unbounded", 1.0, {"student_id": f"s{i}"})  # a label fed an unbounded value
    with caplog.at_level(logging.WARNING, logger="skills.metrics"):
        assert recorder.flush() == MAX_SERIES
    (warning,) = [r for r in caplog.records if "series limit" in r.getMessage()]
    assert warning.__dict__["dropped_records"] == 10
    recorder.close()


def test_metrics_off_records_nothing(env: dict[str, str]) -> None:
    recorder = open_metrics(Settings.from_env({**env, "METRICS": "off"}))
    assert recorder.enabled is False
    recorder.record_request("infer", 200, 0.001, SKILL, "1.0.0")
    recorder.gauge("drift_psi", 0.3, {"skill": SKILL})
    assert recorder.flush() == 0


# -- the local writer, and at exit ----------------------------------------------------------------------


def test_the_log_writer_emits_one_json_line_per_series(env: dict[str, str]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("skills.metrics.series")
    logger.addHandler(handler)
    try:
        recorder = open_metrics(Settings.from_env({**env, "METRICS": "log", "LOG_LEVEL": "WARNING"}))
        for latency in (0.001, 0.002, 0.004):
            recorder.record_request("infer", 200, latency, SKILL, "1.0.0")
        recorder.record_score(SKILL, "1.0.0", 0.42)
        recorder.gauge("drift_psi_prediction", 0.08, {"skill": SKILL, "model_version": "1.0.0"})
        assert recorder.flush() == 4
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_metric = {line["metric"]: line for line in lines}
    assert len(lines) == len(by_metric) == 4
    assert all(line["severity"] == "INFO" and line["message"].startswith("metric ") for line in lines)
    latency = by_metric[REQUEST_LATENCY]
    assert latency["labels"] == {"function": "infer", "skill": SKILL, "model_version": "1.0.0"}
    assert latency["kind"] == "CUMULATIVE" and latency["unit"] == "ms"
    assert latency["value"]["count"] == 3 and latency["value"]["mean"] == pytest.approx(7 / 3, rel=1e-6)
    assert 1.0 <= latency["value"]["p50"] <= 2.5
    assert by_metric[REQUEST_COUNT]["value"] == 3
    assert by_metric[SCORE]["value"]["count"] == 1
    gauge = by_metric[METRIC_PREFIX + "drift_psi_prediction"]
    assert gauge["kind"] == "GAUGE" and gauge["value"] == 0.08 and gauge["start_time"] == gauge["end_time"]
    assert latency["resource"]["type"] == "generic_task" and latency["resource"]["task_id"]
    recorder.close()


@pytest.mark.integration
def test_buffered_metrics_are_written_when_the_server_stops(
    services: Services, env: dict[str, str], catalog: SkillCatalog
) -> None:
    # gunicorn's sync worker leaves through sys.exit on SIGTERM, so the atexit flush runs: no signal handler.
    server_env = {**env, "METRICS": "log", "METRICS_FLUSH_SECONDS": "3600", "LOG_LEVEL": "WARNING"}
    with LocalServer(server_env, free_port(), workers=1) as server:
        for i in range(7):
            response = requests.post(server.url + "/api/v1/skills/infer", json=_infer_body(catalog, SKILL, i), timeout=30)
            assert response.status_code == 200
        assert '"metric' not in server.log()  # nothing written yet: the interval is an hour
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    metrics = {(line["metric"], line["labels"].get("skill")): line for line in lines if "metric" in line}
    assert metrics[(REQUEST_LATENCY, SKILL)]["value"]["count"] == 7
    assert metrics[(SCORE, SKILL)]["value"]["count"] == 7
    assert metrics[(REQUEST_COUNT, SKILL)]["value"] == 7


def test_list_time_series_reads_back_what_was_written(metric_service: MetricServiceEmulator) -> None:
    writer = CloudMonitoringWriter(PROJECT, emulator_host=metric_service.host)
    clock = SteppedClock()
    recorders = [MetricsRecorder(writer, _resource(task), 60.0, clock) for task in ("task-a", "task-b")]
    started = clock.now
    for recorder, version in zip(recorders, ("1.0.0", "1.1.0")):
        for latency in (0.001, 0.002, 0.003, 0.010):
            recorder.record_request("infer", 200, latency, SKILL, version)
        recorder.record_request("infer", 503, 0.001, SKILL, version, "model_unavailable")
        recorder.flush()
    clock.step(30)
    recorders[0].record_request("infer", 200, 0.001, SKILL, "1.0.0")
    recorders[0].flush()

    canary = writer.list_time_series(REQUEST_LATENCY, started, clock.now + 1, labels={"skill": SKILL, "model_version": "1.1.0"})
    assert len(canary) == 1 and canary[0].resource.labels["task_id"] == "task-b" and canary[0].kind == "CUMULATIVE"
    (start, end, value), = canary[0].points
    assert isinstance(value, Distribution) and value.count == 5
    assert start == pytest.approx(started, abs=1e-3) and end > start
    assert 1.0 <= value.quantile(0.5) <= 3.0 and 8.0 <= value.quantile(0.99) <= 12.0

    (production,) = writer.list_time_series(REQUEST_LATENCY, started, clock.now + 1, labels={"model_version": "1.0.0"})
    newest, oldest = production.points  # newest first, as the API answers
    assert isinstance(newest[2], Distribution) and isinstance(oldest[2], Distribution)
    assert (newest[2].count, oldest[2].count) == (6, 5) and newest[2].minus(oldest[2]).count == 1

    errors = writer.list_time_series(ERROR_COUNT, started, clock.now + 1, resource_labels={"task_id": "task-a"})
    assert [(s.labels["error_code"], s.points[0][2]) for s in errors] == [("model_unavailable", 1)]
    assert writer.list_time_series(ERROR_COUNT, clock.now + 100, clock.now + 200) == []
    for recorder in recorders:
        recorder.close()
