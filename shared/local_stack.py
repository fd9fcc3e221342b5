"""The embedded stack: demo models trained and published if absent, and the local server process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from shared.artifacts import ARTIFACT_FILES
from shared.publishing import AlreadyPublished, publish_version
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

LOCAL_STACK_ACTOR = "local-stack"  # who the registry history names for the demo models a start publishes


def ensure_demo_models(services: Services, trained_dir: Path, seed: int = 7) -> list[str]:
    """Trains the skills that have no artifacts in trained_dir, then publishes and promotes every skill
    that has no production version; returns the skills it published."""
    catalog = services.catalog
    registry = services.registry
    serving = registry.serving()
    missing = [s for s in catalog.names if not any(v.stage == "production" for v in serving.get(s, []))]
    if not missing:
        return []
    untrained = [s for s in missing if not all((trained_dir / s / name).is_file() for name in ARTIFACT_FILES)]
    if untrained:
        from shared.training import TrainingConfig, train_catalog, write_trained

        log.info("training demo models", extra={"skills": untrained})
        for result in train_catalog(catalog, TrainingConfig(seed=seed), untrained).values():
            write_trained(result, trained_dir)
    for skill in missing:
        try:
            record = publish_version(
                registry, services.artifacts, trained_dir / skill, actor=LOCAL_STACK_ACTOR, reason="demo model of the embedded stack"
            )
        except AlreadyPublished as published:  # by a start that stopped before promoting it
            record = published.existing
        registry.make_production(skill, record.version, actor=LOCAL_STACK_ACTOR, reason="demo model of the embedded stack")
        log.info("published demo model", extra={"skill": skill, "model_version": record.version})
    return missing


def ensure_demo_students(services: Services, count: int = 1000, seed: int = 11) -> int:
    """Seeds the feature store with demo students if it is empty; returns how many were added."""
    if services.features.count() > 0:
        return 0
    from shared.feature_store import load_feature_file, write_cohort_jsonl
    from shared.ratings import load_ratings_file
    from shared.synthetic import generate_cohort

    cohort = generate_cohort(services.catalog, count, seed)
    # The file exists only to go through the loaders an operator uses; it is removed even if loading fails.
    with tempfile.TemporaryDirectory(prefix="skills-demo-") as folder:
        path = Path(folder) / "demo_students.jsonl"
        write_cohort_jsonl(path, cohort.student_ids, cohort.features, cohort.teacher_ratings)
        report = load_feature_file(services.features, services.catalog, path)
        ratings = load_ratings_file(services.ratings, services.catalog, path)
    log.info("seeded demo students", extra={"students": report.accepted, "rated_students": ratings.accepted})
    return report.accepted


class LocalServer:
    """A local server process (gunicorn serving functions/local_server.py) on 127.0.0.1, for tests and benchmarks.

    Use as a context manager: it starts the process, waits until /healthz answers, and stops it on exit.
    """

    def __init__(self, env: dict[str, str], port: int, workers: int = 1, timeout: float = 60.0) -> None:
        self.env = env
        self.port = port
        self.workers = workers
        self.timeout = timeout
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file: Any = None
        self._final_log = ""
        self.started_at = 0.0

    def start(self) -> LocalServer:
        env = {**os.environ, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1", "SERVER_WORKERS": str(self.workers)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        settings = Settings.from_env(env)
        self.started_at = time.perf_counter()
        self.log_file = tempfile.NamedTemporaryFile(prefix="skills-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *gunicorn_args(settings)],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/_bench/constant", timeout=1) as response:  # nosec B310 # self.url is http://127.0.0.1:PORT
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start within {self.timeout}s:\n{self.log()}")

    def log(self) -> str:
        """Returns what the server printed (kept after it stops)."""
        if self.log_file is None:
            return self._final_log
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.log_file is not None:
            self._final_log = self.log()
            self.log_file.close()
            Path(self.log_file.name).unlink(missing_ok=True)
            self.log_file = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """Returns a TCP port of 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gunicorn_args(settings: Settings) -> list[str]:
    """Returns the server shape the README documents: N single-threaded sync workers, no access log (requests
    log themselves), each worker delivering the embedded queue's tasks, and on SIGTERM new connections refused
    while the requests in flight finish within 10 s (shared/gunicorn_hooks.py)."""
    return [
        "--config", "python:shared.gunicorn_hooks",
        "--bind", f"{settings.host}:{settings.port}",
        "--workers", str(settings.server_workers),
        "--threads", "1",
        "--worker-class", "sync",
        "--timeout", "120",
        # Cloud Run gives an instance 10 s between SIGTERM and SIGKILL.
        "--graceful-timeout", "10",
        "--log-level", "warning",
        "functions.local_server:app",
    ]
