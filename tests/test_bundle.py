"""The deploy bundle: the same sources give the same bytes, it holds what serves and nothing else, and,
unpacked into an empty folder with a fresh virtual environment of its own requirements, it serves every
function target as the OpenAPI contract says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import requests

from scripts import build_bundle
from shared.catalog import SkillCatalog
from shared.local_stack import ensure_demo_models, ensure_demo_students, free_port
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings
from shared.synthetic import generate_cohort
from tests.openapi_contract import assert_matches_spec

# What a function must be able to import (serving) and what it must never install (training, tests).
SERVING_DISTRIBUTIONS = {
    "functions-framework", "flask", "numpy", "onnxruntime", "xgboost-cpu", "google-cloud-storage",
    "google-cloud-firestore", "google-cloud-tasks", "google-cloud-monitoring", "matplotlib",
}
TRAINING_AND_TEST_DISTRIBUTIONS = {
    "scikit-learn", "onnx", "onnxmltools", "skl2onnx", "pytest", "mypy", "gcp-storage-emulator",
    "jsonschema", "pyyaml", "psutil",
}
# Imported by none of the function targets when main.py is loaded: training packages never, the heavy
# serving ones lazily (XGBoost for explanations and chunks, matplotlib for drift reports, the Google
# clients only with a GCP backend).
# (`google` and `google.cloud` themselves are namespace packages that site's .pth files load: harmless.)
NOT_IMPORTED_BY_MAIN = (
    "sklearn", "onnx", "onnxmltools", "skl2onnx", "scipy", "xgboost", "matplotlib",
    "google.cloud.storage", "google.cloud.firestore", "google.cloud.tasks_v2", "google.cloud.monitoring_v3",
)

INSTALL_TIMEOUT = 900  # a fresh venv of the bundle's pins; pip's cache makes it one to two minutes
START_TIMEOUT = 60  # a function process, from start to its first answer
HTTP_TIMEOUT = 60
RUN_DEADLINE = 120
DEMO_STUDENTS, DEMO_SEED = 60, 11
FIGURES_FILE = PROJECT_ROOT / "build" / "bundle_figures.json"


def _entry_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


# -- reproducible, and only what serves ----------------------------------------------------------------


def test_the_same_sources_give_the_same_bytes(tmp_path: Path) -> None:
    first = build_bundle.build(tmp_path / "a" / "bundle.zip")
    second = build_bundle.build(tmp_path / "b" / "bundle.zip")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    with zipfile.ZipFile(first.path) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names), "entries must be written in sorted order"
    assert {info.date_time for info in infos} == {build_bundle.FIXED_DATE_TIME}
    assert {info.external_attr >> 16 for info in infos} == {0o100644}
    assert {info.create_system for info in infos} == {build_bundle.UNIX_SYSTEM}


def test_the_bundle_holds_what_serves_and_nothing_else(tmp_path: Path) -> None:
    bundle = build_bundle.build(tmp_path / "bundle.zip")
    names = _entry_names(bundle.path)
    assert {"main.py", "requirements.txt", "models/catalog.json", "shared/__init__.py", "shared/gcp/__init__.py"} <= set(names)
    # Every module of the package, and nothing beside the package but the three files.
    package = sorted(
        p.relative_to(PROJECT_ROOT).as_posix()
        for p in (PROJECT_ROOT / "shared").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )
    assert [n for n in names if n.startswith("shared/")] == package
    assert [n for n in names if not n.startswith("shared/")] == ["main.py", "models/catalog.json", "requirements.txt"]
    assert not [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n or "/tests/" in n or n.startswith("tests/")]
    assert not [n for n in names if n.startswith("models/") and n != "models/catalog.json"], "no local artifacts"
    with zipfile.ZipFile(bundle.path) as archive:
        assert archive.read("main.py") == (PROJECT_ROOT / "functions" / "main.py").read_bytes()
        assert archive.read("requirements.txt") == (PROJECT_ROOT / "functions" / "requirements.txt").read_bytes()
    assert bundle.files == len(names)


def test_serving_requirements_are_a_subset_of_the_root_pins() -> None:
    serving = build_bundle.read_pins(PROJECT_ROOT / "functions" / "requirements.txt")
    root = build_bundle.read_pins(PROJECT_ROOT / "requirements.txt")
    assert {name: root.get(name) for name in serving} == serving, "every serving pin is the root file's pin"
    assert SERVING_DISTRIBUTIONS <= set(serving)
    assert not TRAINING_AND_TEST_DISTRIBUTIONS & set(serving)
    assert not build_bundle.EXCLUDED_DISTRIBUTIONS & set(serving)
    assert build_bundle.check_requirements() == serving


def test_a_pin_that_drifts_from_the_root_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "requirements.txt"
    root.write_text("numpy==2.4.6\nscikit-learn==1.9.1\n")
    drifted = tmp_path / "serving.txt"
    drifted.write_text("numpy==2.4.5\n")
    with pytest.raises(build_bundle.BundleError, match="numpy==2.4.5 differs"):
        build_bundle.check_requirements(drifted, root)
    training = tmp_path / "training.txt"
    training.write_text("scikit-learn==1.9.1\n")
    with pytest.raises(build_bundle.BundleError, match="scikit-learn is training- or test-only"):
        build_bundle.check_requirements(training, root)
    loose = tmp_path / "loose.txt"
    loose.write_text("numpy>=2\n")
    with pytest.raises(build_bundle.BundleError, match="not an exact"):
        build_bundle.check_requirements(loose, root)


def test_no_bundled_module_imports_a_training_package_at_module_level() -> None:
    entries = build_bundle.bundle_sources()
    build_bundle.check_imports(entries, build_bundle.check_requirements())  # raises BundleError otherwise
    # The check sees through if/try blocks, and only lazy imports and TYPE_CHECKING are exempt.
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "if TYPE_CHECKING:\n    import sklearn\n"
        "try:\n    import onnxmltools\nexcept ImportError:\n    pass\n"
        "def lazy():\n    import skl2onnx\n"
        "class Model:\n    import scipy.stats\n"
    )
    modules = [m for _, m in build_bundle.module_level_imports(source, "example.py")]
    assert modules == ["__future__", "typing", "numpy", "onnxmltools", "scipy"]


def test_a_module_level_training_import_fails_the_build(tmp_path: Path) -> None:
    module = tmp_path / "shared" / "leaky.py"
    module.parent.mkdir()
    module.write_text("import sklearn.linear_model\n")
    with pytest.raises(build_bundle.BundleError, match=r"shared/leaky.py:1 imports 'sklearn'"):
        build_bundle.check_imports([(module, "shared/leaky.py")], build_bundle.check_requirements())


# -- the unpacked bundle serves every function -------------------------------------------------------------


@dataclass
class Function:
    """One function target served by functions-framework from the unpacked bundle."""

    target: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Sends one request to the public path (a deployed function answers every path) and checks the
        answer against the OpenAPI contract; returns (status, body)."""
        response = requests.request(method, self.url + path, json=body, timeout=HTTP_TIMEOUT)
        payload = response.json()
        assert_matches_spec(method, path, response.status_code, payload)
        return response.status_code, payload

    def memory(self) -> dict[str, float]:
        """Returns the resident memory in MB of the serving process (gunicorn's worker) and of the whole
        instance (master and worker: what counts against a Cloud Run instance's memory)."""
        master = psutil.Process(self.process.pid)
        workers = master.children(recursive=True)
        serving = max(workers, key=lambda p: p.memory_info().rss) if workers else master
        total_pss = sum(_pss(p) for p in [master, *workers])
        return {
            "serving_rss_mb": round(serving.memory_info().rss / 2**20, 1),
            "instance_rss_mb": round(sum(p.memory_info().rss for p in [master, *workers]) / 2**20, 1),
            "instance_pss_mb": round(total_pss / 2**20, 1),
        }

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _pss(process: psutil.Process) -> int:
    try:
        return int(process.memory_full_info().pss)
    except (psutil.AccessDenied, AttributeError):
        return int(process.memory_info().rss)


@dataclass
class BundleStack:
    """The unpacked bundle, its virtual environment and the function processes it serves."""

    root: Path
    venv: Path
    env: dict[str, str]
    logs: Path
    student_ids: list[str]
    figures: dict[str, Any] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)

    def start(self, target: str, port: int | None = None) -> Function:
        port = port or free_port()
        log = self.logs / f"{target}.log"
        started_at = time.perf_counter()
        process = subprocess.Popen(
            [str(self.venv / "bin" / "functions-framework"), f"--target={target}", "--source=main.py", f"--port={port}"],
            cwd=self.root,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        function = Function(target, port, process, log, started_at)
        self.functions[target] = function
        return function

    def wait_listening(self, function: Function) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if function.process.poll() is not None:
                raise AssertionError(f"{function.target} exited with {function.process.returncode}:\n{function.output()}")
            try:
                requests.get(function.url + "/__ready__", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"{function.target} did not listen within {START_TIMEOUT}s:\n{function.output()}")

    def stop(self) -> None:
        for function in self.functions.values():
            if function.process.poll() is None:
                os.killpg(function.process.pid, signal.SIGTERM)
        for function in self.functions.values():
            try:
                function.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(function.process.pid, signal.SIGKILL)
                function.process.wait()


_SETTING = re.compile(r'reader\.\w+\(\s*"([A-Z][A-Z0-9_]*)"')


def _bundle_env(stack_dir: Path) -> dict[str, str]:
    """The environment of a deployed function: no PYTHONPATH, none of this shell's settings, the
    embedded stores in a folder of this test."""
    settings_source = (PROJECT_ROOT / "shared" / "settings.py").read_text()
    env = {k: v for k, v in os.environ.items() if k not in set(_SETTING.findall(settings_source))}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env.update(
        {
            "ARTIFACT_STORE": str(stack_dir / "artifacts"),
            "DATABASE_URL": str(stack_dir / "skills.sqlite3"),
            "LOG_LEVEL": "WARNING",
            "TASK_MIN_BACKOFF_SECONDS": "0.2",
            "SERVER_WORKERS": "1",
            # Cloud Run sets K_SERVICE per function; one value for all is enough here.
            "K_SERVICE": "skills-bundle-test",
        }
    )
    return env


@pytest.fixture(scope="module")
def bundle_stack(tmp_path_factory: pytest.TempPathFactory, trained_dir: Path, catalog: SkillCatalog) -> Iterator[BundleStack]:
    """The bundle built, unpacked into an empty folder, its requirements installed into a fresh venv, and
    the demo models and students published into an embedded stack of its own."""
    work = tmp_path_factory.mktemp("bundle")
    bundle = build_bundle.build(work / "bundle.zip")
    root = work / "unpacked"
    with zipfile.ZipFile(bundle.path) as archive:
        archive.extractall(root)

    venv = work / "venv"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", "requirements.txt"],
        cwd=root, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
    )
    install_seconds = time.perf_counter() - started
    assert installed.returncode == 0, installed.stderr[-4000:]

    stack_dir = work / "stack"
    env = _bundle_env(stack_dir)
    services = Services(Settings.from_env({"ARTIFACT_STORE": env["ARTIFACT_STORE"], "DATABASE_URL": env["DATABASE_URL"], "LOG_LEVEL": "WARNING"}))
    ensure_demo_models(services, trained_dir)
    ensure_demo_students(services, count=DEMO_STUDENTS, seed=DEMO_SEED)

    logs = work / "logs"
    logs.mkdir()
    student_ids = generate_cohort(catalog, DEMO_STUDENTS, DEMO_SEED).student_ids
    stack = BundleStack(root, venv, env, logs, student_ids)
    stack.figures.update(
        bundle_bytes=bundle.size, bundle_sha256=bundle.sha256, bundle_files=bundle.files,
        install_seconds=round(install_seconds, 1),
    )
    try:
        yield stack
    finally:
        stack.stop()


def _valid_body(catalog: SkillCatalog, skill: str, student_id: str) -> dict[str, Any]:
    spec = catalog.skill(skill)
    row = generate_cohort(catalog, 1, seed=5).matrix(spec)[0]
    return {"student_id": student_id, "skill": skill, "features": dict(zip(spec.feature_names, map(float, row)))}


@pytest.mark.integration
def test_the_unpacked_bundle_serves_every_function(bundle_stack: BundleStack, catalog: SkillCatalog) -> None:
    stack = bundle_stack
    figures = stack.figures

    # Its own venv holds exactly its pins: nothing unpinned came in, nothing of training or tests.
    frozen = subprocess.run([str(stack.venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    installed = {build_bundle.canonical(n): v for n, v in (line.split("==", 1) for line in frozen.stdout.split() if "==" in line)}
    assert installed == build_bundle.read_pins(stack.root / "requirements.txt")

    # Loading main.py, as functions-framework does for every target, imports no training package and
    # none of the heavy serving ones (they load lazily).
    probe = subprocess.run(
        [str(stack.venv / "bin" / "python"), "-c",
         "import json, sys; import main; print(json.dumps(sorted(sys.modules)))"],
        cwd=stack.root, env=stack.env, capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    loaded = json.loads(probe.stdout)
    heavy = sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in NOT_IMPORTED_BY_MAIN))
    assert not heavy, heavy

    # Cold start of the single-inference function, alone on the machine: process start to its first 200.
    infer = stack.start("infer")
    body = _valid_body(catalog, "leadership", "s-bundle")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert infer.process.poll() is None, infer.output()
        try:
            response = requests.post(infer.url + "/api/v1/skills/infer", json=body, timeout=HTTP_TIMEOUT)
            if response.status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"infer did not answer 200 within {START_TIMEOUT}s:\n{infer.output()}"
        time.sleep(0.02)
    figures["cold_start_infer_seconds"] = round(time.perf_counter() - infer.started_at, 2)
    figures["memory_infer"] = infer.memory()

    # Every other target, each in its own process as when deployed; the nightly's tasks go to the worker's port.
    worker_port = free_port()
    stack.env["WORKER_URL"] = f"http://127.0.0.1:{worker_port}/tasks/batch-worker"
    others = [t for t in ("infer_batch", "list_models", "list_skills", "healthz", "nightly", "batch_worker",
                          "batch_run_status", "drift_check", "drift_checks", "canary_check") if t not in stack.functions]
    for target in others:
        stack.start(target, worker_port if target == "batch_worker" else None)
    for target in others:
        stack.wait_listening(stack.functions[target])
    fn = stack.functions

    status, answer = infer.call("POST", "/api/v1/skills/infer", {**body, "explain": True})
    assert status == 200 and len(answer["contributions"]) == 5
    figures["memory_infer_after_explain"] = infer.memory()

    status, answer = fn["infer_batch"].call("POST", "/api/v1/skills/infer/batch", {"items": [body, {**body, "skill": "teamwork"}]})
    assert status == 200 and (answer["succeeded"], answer["failed"]) == (1, 1)

    status, answer = fn["list_skills"].call("GET", "/api/v1/skills")
    assert status == 200 and answer == catalog.to_dict()

    status, answer = fn["list_models"].call("GET", "/api/v1/skills/models?skill=leadership")
    assert status == 200 and answer["skills"][0]["versions"][0]["stage"] == "production"

    status, answer = fn["healthz"].call("GET", "/healthz")
    assert status == 200 and set(answer["models"]) == set(catalog.names)

    status, answer = fn["nightly"].call("POST", "/tasks/nightly", {"run_id": "bundle-1", "full": True})
    assert status == 202 and answer["students"] == DEMO_STUDENTS and answer["tasks"] >= 1

    run_deadline = time.monotonic() + RUN_DEADLINE
    while True:
        status, run = fn["batch_run_status"].call("GET", "/api/v1/batch/runs/bundle-1")
        assert status == 200
        if run["status"] != "running":
            break
        assert time.monotonic() < run_deadline, f"run still running: {run}\n{fn['batch_worker'].output()}\n{fn['nightly'].output()}"
        time.sleep(0.2)
    assert (run["status"], run["students_scored"], run["students_failed"]) == ("succeeded", DEMO_STUDENTS, 0)

    # One chunk sent straight to the worker, as Cloud Tasks would retry it: rescored, never duplicated.
    status, answer = fn["batch_worker"].call(
        "POST", "/tasks/batch-worker", {"run_id": "bundle-1", "chunk": 0, "student_ids": stack.student_ids[:3]}
    )
    assert status == 200, answer
    figures["memory_batch_worker_after_chunk"] = fn["batch_worker"].memory()

    status, check = fn["drift_check"].call("POST", "/tasks/drift-check", {})
    assert status == 200 and check["report_uri"]
    figures["memory_drift_check_after_check"] = fn["drift_check"].memory()

    status, stored = fn["drift_checks"].call("GET", "/api/v1/drift/checks/latest")
    assert status == 200 and stored["check_id"] == check["check_id"]

    status, canaries = fn["canary_check"].call("POST", "/tasks/canary-check", {})
    assert status == 200 and canaries["skills"] == []  # no canary runs: nothing to compare

    for target, function in stack.functions.items():
        assert function.process.poll() is None, f"{target} died:\n{function.output()}"
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(figures, indent=2) + "\n")
    print("\nbundle figures:", json.dumps(figures))
