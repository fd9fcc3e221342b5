"""Schemathesis over every operation of functions/openapi.yaml, against the real local server: generated requests
(valid and invalid) must never get a 5xx, an undocumented status, a wrong content type or a body off its schema."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from shared.local_stack import LocalServer, ensure_demo_models, ensure_demo_students, free_port
from shared.services import Services
from shared.settings import Settings
from tests.openapi_contract import HTTP_METHODS, SPEC_PATH, find_path, load_spec

pytestmark = pytest.mark.integration

# The server holds tiny demo data: the task endpoints are open with TASKS_AUTH off (the local default),
# so a nightly run the fuzzer starts scores at most FUZZ_STUDENTS students, in chunks of CHUNK_SIZE, once.
FUZZ_STUDENTS = 20
CHUNK_SIZE = 10
EXAMPLE_RUN = "demo-1"  # the run id of the spec's examples
# The run: the same seed gives the same requests; a few dozen per operation keeps it near a minute here.
SEED = 20261202
MAX_EXAMPLES = 40
MIN_REQUESTS = 10  # per operation with parameters or a body; hypothesis stops early on a small input space
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")
REQUEST_TIMEOUT_SECONDS = 60
RUN_DEADLINE_SECONDS = 600  # a run this long is stuck: stop it and fail


def schemathesis_command(url: str, report_dir: Path) -> list[str]:
    """The `st run` command line of the fuzz run (`make test` runs it through this test)."""
    return [
        str(Path(sys.executable).parent / "st"), "run", str(SPEC_PATH),
        "--url", url,
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--generation-database", "none",
        "--request-timeout", str(REQUEST_TIMEOUT_SECONDS),
        "--report-json-path", str(report_dir / "report.json"),
        "--report-har-path", str(report_dir / "requests.har"),
        "--no-color",
    ]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, trained_dir: Path) -> Iterator[LocalServer]:
    """A live server (gunicorn, two workers) on its own stores: every skill served, FUZZ_STUDENTS demo students."""
    folder = tmp_path_factory.mktemp("api-fuzz")
    env = {
        "ARTIFACT_STORE": str(folder / "artifacts"),
        "DATABASE_URL": str(folder / "skills.sqlite3"),
        "MODEL_REFRESH_SECONDS": "30",
        "LOG_LEVEL": "WARNING",
        "BATCH_CHUNK_SIZE": str(CHUNK_SIZE),
        "TASK_MAX_ATTEMPTS": "1",  # a chunk the fuzzer broke is not retried
        "METRICS": "off",
        "DRIFT_MIN_STUDENTS": "1000000",  # every drift check has too little data to compute and draw a report
    }
    services = Services(Settings.from_env(env))
    ensure_demo_models(services, trained_dir)
    ensure_demo_students(services, FUZZ_STUDENTS)
    with LocalServer(env, free_port(), workers=2) as server:
        seed_examples(server)
        yield server


def seed_examples(server: LocalServer) -> None:
    """Makes the spec's examples name things that exist: the run `demo-1` (finished) and a latest drift check."""
    answer = requests.post(server.url + "/tasks/nightly", json={"run_id": EXAMPLE_RUN, "full": True}, timeout=60)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 120
    while requests.get(f"{server.url}/api/v1/batch/runs/{EXAMPLE_RUN}", timeout=60).json()["status"] == "running":
        assert time.monotonic() < deadline, f"run {EXAMPLE_RUN} did not finish"
        time.sleep(0.2)
    assert requests.post(server.url + "/tasks/drift-check", json={}, timeout=60).status_code == 200


def operations() -> set[str]:
    """Every operation of the spec, as `METHOD /path/{template}`."""
    return {
        f"{method.upper()} {path}"
        for path, item in load_spec()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def has_inputs(operation: str) -> bool:
    method, path = operation.split(" ", 1)
    spec = load_spec()["paths"][path][method.lower()]
    return bool(spec.get("parameters") or spec.get("requestBody"))


def requests_per_operation(har: dict[str, Any], base_url: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in har["log"]["entries"]:
        request = entry["request"]
        path = request["url"].removeprefix(base_url)
        template = find_path(path)
        key = f"{request['method']} {template}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_schemathesis_finds_no_failure_on_any_operation(fuzz_server: LocalServer, tmp_path: Path) -> None:
    report_dir = tmp_path / "schemathesis"
    started = time.monotonic()
    run = subprocess.run(
        schemathesis_command(fuzz_server.url, report_dir),
        cwd=tmp_path,  # schemathesis and hypothesis keep caches (.schemathesis/, .hypothesis/) in the working folder
        capture_output=True,
        text=True,
        timeout=RUN_DEADLINE_SECONDS,
    )
    seconds = time.monotonic() - started
    output = run.stdout[-20_000:] + run.stderr[-5_000:]
    assert run.returncode == 0, f"schemathesis found failures (exit {run.returncode}):\n{output}\nserver log:\n{fuzz_server.log()[-5_000:]}"

    report = json.loads((report_dir / "report.json").read_text())
    assert report["failures"] == [] and report["errors"] == [], report
    expected = operations()
    assert report["operations"]["tested"] == report["operations"]["total"] == len(expected), report["operations"]

    counts = requests_per_operation(json.loads((report_dir / "requests.har").read_text()), fuzz_server.url)
    assert set(counts) >= expected, f"not exercised: {sorted(expected - set(counts))}"
    # An operation with inputs gets many requests; one without (healthz, the catalog) has little to vary.
    assert all(counts[operation] >= MIN_REQUESTS for operation in expected if has_inputs(operation)), counts
    print(f"schemathesis: {sum(counts.values())} requests over {len(expected)} operations in {seconds:.1f} s: {counts}")
