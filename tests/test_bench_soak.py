"""The soak benchmark's smoke run: a few hundred requests, and a report of the right shape (its targets are
reported, not asserted here: the machine is shared)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from shared.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "bench_soak.py"
FIGURES = {
    "requests", "errors", "workers_replaced", "rps", "p50_ms", "p99_ms", "server_cores",
    "rss_after_warmup_max_mb", "rss_end_max_mb", "rss_growth_max",
}


@pytest.mark.integration
def test_a_short_soak_reports_errors_latency_and_each_workers_memory() -> None:
    args = ["--requests", "200", "--concurrency", "4", "--warmup", "100", "--segment", "50", "--students", "10"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--workers", "2"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["bench"] == "soak"
    assert report["config"]["requests"] == 200 and report["config"]["workers"] == 2
    figures = report["figures"]
    assert FIGURES <= set(figures), sorted(FIGURES - set(figures))
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in figures.values()), figures
    assert figures["requests"] == 200
    assert figures["rps"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert set(report["targets"]) == {"errors", "workers_replaced", "rss_growth_max"}
    for verdict in report["targets"].values():
        assert isinstance(verdict["pass"], bool)

    # Memory is read after the warm-up, then after every segment: 100, 150, 200.
    assert report["samples_at"] == [100, 150, 200]
    assert len(report["workers"]) == 2
    for worker in report["workers"]:
        assert worker["pid"] > 0 and worker["rss_after_warmup_mb"] > 10
        assert len(worker["rss_mb"]) == 3 and worker["rss_mb"][0] == worker["rss_after_warmup_mb"]
    # One segment of warm-up and two after it, every request accounted for.
    segments = report["segments"]
    assert [s["first"] for s in segments] == [0, 100, 150]
    assert sum(s["requests"] for s in segments) == 200
    assert all(s["ok"] + s["errors"] == s["requests"] for s in segments)
