"""The batch benchmark's smoke run: it completes and reports every figure (never judged on its timings)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from shared.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "bench_batch.py"

BATCH_FIGURES = [
    f"batch_{size}_t{threads}_{name}"
    for size in ("small", "large")
    for threads in (1, 2)
    for name in ("engine_scores_per_s", "raw_scores_per_s", "engine_over_raw")
]
CONTRIBUTION_FIGURES = [
    "contrib_students",
    "contrib_scoring_ms",
    "contrib_treeshap_ms",
    "contrib_top5_ms",
    "contrib_over_scoring",
    "contrib_with_top5_over_scoring",
]
NIGHTLY_FIGURES = [
    f"nightly_{size}_{name}"
    for size in ("small", "large")
    for name in (
        "students",
        "chunks",
        "cold_wall_s",
        "cold_students_per_s",
        "warm_wall_s",
        "warm_students_per_s",
        "dispatch_ms",
        "first_chunk_ms",
        "model_load_ms",
        "chunk_ms",
        "chunk_scoring_ms",
        "chunk_writes_ms",
        "worker_busy_share",
    )
] + ["nightly_xgboost_import_s", "nightly_xgboost_import_bundle_s"] + [
    "worker_profiles_on_students_per_s", "worker_profiles_off_students_per_s", "worker_profiles_on_over_off"
]
TARGETED = [f"batch_{size}_t{threads}_engine_over_raw" for size in ("small", "large") for threads in (1, 2)] + [
    "nightly_small_cold_wall_s", "worker_profiles_on_over_off"
]


@pytest.mark.integration
def test_quick_run_reports_every_figure_as_a_positive_number() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:] or done.stdout[-4000:]

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "batch"
    assert report["quick"] is True
    assert set(report["sizes"]) == {"batch_small", "batch_large", "nightly_small", "nightly_large"}
    assert all(isinstance(n, int) and n > 0 for n in report["sizes"].values())

    figures = report["figures"]
    for key in BATCH_FIGURES + CONTRIBUTION_FIGURES + NIGHTLY_FIGURES:
        assert key in figures, f"figure {key} is missing"
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"
    assert figures["nightly_small_students"] == report["sizes"]["nightly_small"]
    assert figures["nightly_large_students"] == report["sizes"]["nightly_large"]

    for key in TARGETED:
        target = report["targets"][key]
        assert target["value"] == figures[key]
        assert isinstance(target["pass"], bool)  # reported, never asserted: the machine is shared
    assert report["checks"]["booster_nthread"] == {"BATCH_THREADS=1": [1], "BATCH_THREADS=2": [2]}
