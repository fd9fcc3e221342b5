"""The inference benchmark runs end to end (--quick) and reports every figure; its targets are not asserted here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from shared.settings import PROJECT_ROOT

FIGURES = {
    "inproc_onnx_all7_p50_ms",
    "inproc_onnx_all7_p99_ms",
    "inproc_onnx_model_all7_p50_ms",
    "inproc_onnx_model_all7_p99_ms",
    "inproc_xgb_model_all7_p50_ms",
    "inproc_xgb_model_all7_p99_ms",
    "inproc_xgb_over_onnx_p50",
    "inproc_unprofiled_all7_p50_ms",
    "inproc_profiles_on_over_off_p50",
    "http_infer_p50_ms",
    "http_infer_p99_ms",
    "http_floor_p50_ms",
    "http_floor_p99_ms",
    "http_ratio_p50",
    "http_ratio_p99",
    "load_infer_rps",
    "load_infer_p50_ms",
    "load_infer_p99_ms",
    "load_infer_server_cores",
    "load_infer_generator_cores",
    "load_infer_generator_cpu_us_per_request",
    "load_infer_requests",
    "load_infer_server_cpu_us_per_request",
    "load_floor_rps",
    "load_floor_p50_ms",
    "load_floor_p99_ms",
    "load_floor_server_cores",
    "load_floor_generator_cores",
    "load_floor_generator_cpu_us_per_request",
    "load_floor_requests",
    "load_floor_server_cpu_us_per_request",
    "load_ratio_rps",
    "cold_start_median_s",
    "cold_start_max_s",
    "cold_start_model_load_ms",
    "import_serving_modules_s",
    "worker_rss_mb",
    "worker_uss_mb",
    "master_rss_mb",
    "loaded_worker_rss_max_mb",
    "inproc_metrics_on_p50_ms",
    "inproc_metrics_off_p50_ms",
    "inproc_metrics_on_over_off_p50",
    "metrics_record_us_per_request",
    "metrics_record_share_of_engine_infer",
    "http_metrics_on_p50_ms",
    "http_metrics_off_p50_ms",
    "http_metrics_on_over_off_p50",
}
TARGETS = {
    "inproc_onnx_all7_p50_ms",
    "http_ratio_p50",
    "load_infer_rps",
    "cold_start_median_s",
    "worker_rss_mb",
    "inproc_metrics_on_over_off_p50",
    "http_metrics_on_over_off_p50",
    "inproc_profiles_on_over_off_p50",
}


@pytest.mark.integration
def test_quick_benchmark_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "bench_inference.py"), "--quick"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["quick"] is True
    figures = report["figures"]
    assert FIGURES <= set(figures), sorted(FIGURES - set(figures))
    for name in FIGURES:
        value = figures[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    assert set(report["targets"]) == TARGETS
    for verdict in report["targets"].values():
        assert isinstance(verdict["pass"], bool)
    # The serving path must not have imported the training stack (a fact, not a timing).
    assert report["checks"]["xgboost_imported_after_infer"] is False
    assert report["checks"]["sklearn_imported_after_infer"] is False
    assert report["server"]["workers"] >= 1 and report["server"]["threads"] >= 1
    # The metrics-on server wrote its metric lines (at exit at the latest); the off one none.
    assert report["checks"]["metric_log_lines_on"] > 0 and report["checks"]["metric_log_lines_off"] == 0
