"""Measures what the GCP backends cost the online path's cold start, against the embedded default, side by side.

    PYTHONPATH=. .venv/bin/python scripts/bench_gcp.py [--quick]

It starts the Firestore emulator (Java) and the Cloud Storage emulator, publishes the demo models to
both stacks (an embedded one in a temp folder; the registry in Firestore and the artifacts in the
bucket for the other), and then alternates cold starts of a one-worker server of each stack: process
start to the first answered POST /api/v1/skills/infer (the same measurement as bench_inference.py's
cold start). Each GCP cold start gets an empty artifact cache, as a new instance has. It also times,
in fresh interpreters, the import of the two Google clients the serving path uses.

The emulators answer from this machine, so the network part of a real cold start (a few round trips
to Firestore and Cloud Storage in the same region) is not in these figures.

It prints a table, each figure beside its target with PASS or MISS, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from scripts.bench_inference import cold_start, skill_bodies, stack_env, student_features
from scripts.bench_targets import Target
from scripts.command_line import HelpFormatter
from shared.local_stack import ensure_demo_models
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings
from tests.emulators.firestore import FirestoreEmulator
from tests.emulators.storage import StorageEmulator

TARGETS = {"cold_start_gcp_minus_embedded_s": Target(0.3)}
IMPORT_PROBE = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def import_seconds(module: str, repeats: int) -> float:
    """Median time of importing a module in a fresh interpreter (after the serving stack's own imports)."""
    code = "import numpy, onnxruntime, flask; " + IMPORT_PROBE.format(module=module)
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeats)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one cold start per stack instead of five")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else 5

    with tempfile.TemporaryDirectory(prefix="skills-bench-gcp-") as temp, FirestoreEmulator() as firestore, StorageEmulator() as storage:
        folder = Path(temp)
        embedded = {**stack_env(folder / "embedded"), "METRICS": "off"}
        gcp = {
            **embedded,
            "ARTIFACT_STORE": f"gs://{storage.bucket}/bench",
            "DATABASE_URL": f"firestore://{firestore.project}/(default)",
            "FIRESTORE_EMULATOR_HOST": firestore.host,
            "STORAGE_EMULATOR_HOST": storage.url,
        }
        previous = {name: os.environ.get(name) for name in ("FIRESTORE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")}
        os.environ.update({"FIRESTORE_EMULATOR_HOST": firestore.host, "STORAGE_EMULATOR_HOST": storage.url})
        try:
            trained = PROJECT_ROOT / "models" / "artifacts"
            for env in (embedded, gcp):
                ensure_demo_models(Services(Settings.from_env(env)), trained)
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        catalog = Services(Settings.from_env(embedded)).catalog
        rng = random.Random(7)
        bodies = skill_bodies(catalog, [student_features(catalog, rng) for _ in range(2)])
        seconds: dict[str, list[float]] = {"embedded": [], "gcp": []}
        for i in range(rounds):  # alternating, so both stacks see the same background load
            seconds["embedded"].append(cold_start(embedded, bodies, catalog.names, folder / f"e{i}.log")["seconds"])
            cold = {**gcp, "ARTIFACT_CACHE_DIR": str(folder / f"cache-{i}")}  # a new instance: empty cache
            seconds["gcp"].append(cold_start(cold, bodies, catalog.names, folder / f"g{i}.log")["seconds"])

    figures: dict[str, Any] = {
        "cold_start_embedded_median_s": statistics.median(seconds["embedded"]),
        "cold_start_gcp_median_s": statistics.median(seconds["gcp"]),
        "import_google_cloud_firestore_s": import_seconds("google.cloud.firestore", 3),
        "import_google_cloud_storage_s": import_seconds("google.cloud.storage", 3),
        "import_both_s": import_seconds("google.cloud.firestore, google.cloud.storage", 3),
    }
    figures["cold_start_gcp_minus_embedded_s"] = figures["cold_start_gcp_median_s"] - figures["cold_start_embedded_median_s"]
    rows = [
        ("cold start, embedded default (median)", "cold_start_embedded_median_s"),
        ("cold start, Firestore + Cloud Storage emulators (median, empty cache)", "cold_start_gcp_median_s"),
        ("  GCP minus embedded", "cold_start_gcp_minus_embedded_s"),
        ("  import google.cloud.firestore (after numpy, onnxruntime, flask)", "import_google_cloud_firestore_s"),
        ("  import google.cloud.storage (same)", "import_google_cloud_storage_s"),
        ("  import both", "import_both_s"),
    ]
    print(f"\ncold start with the GCP backends ({rounds} alternating rounds; emulators on this machine)")
    for label, key in rows:
        target = TARGETS.get(key)
        verdict = f"{target.describe(' s'):>10}  {'PASS' if target.met(figures[key]) else 'MISS'}" if target else ""
        print(f"  {label:<72}{figures[key]:>8.3f} s  {verdict}")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()} | {"rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
