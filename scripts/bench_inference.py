"""Measures the online path end to end, on an embedded stack of its own, against the service's latency targets.

    PYTHONPATH=. .venv/bin/python scripts/bench_inference.py [--quick]

It builds a throwaway stack in a temp folder (the demo models are trained into models/artifacts if
absent, then published there), and measures, in one run:

1. in-process: one student scored on all seven skills through InferenceEngine.infer (ONNX Runtime),
   and the same rows through ONNX Runtime and through XGBoost's Python API, model call only;
2. HTTP, sequential: POST /api/v1/skills/infer next to the constant-JSON floor GET /_bench/constant,
   one fresh connection per request for both (gunicorn's sync workers close every connection);
3. HTTP throughput at concurrency 16 for both endpoints, from a separate load-generator process
   (a readiness loop over raw sockets), with the CPU the generator, the server and other processes used;
4. cold start of a one-worker server to its first answered infer, the import time of the serving
   modules, and whether a serving process has imported xgboost or sklearn;
5. resident memory of a serving worker with all seven models loaded, and of the gunicorn master;
6. the metrics writer on (METRICS=log, flushing every 5 s) against off, side by side: infer through
   the app in process (Flask test client, every skill in turn, one set of loaded models) and over
   HTTP (two one-worker servers per side), alternating between on and off request by request so
   drift hits both alike; and what recording one request's metrics costs.

It prints a table, each figure beside its target with PASS or MISS, then one JSON line with every
figure. A MISS does not change the exit status; a failed request or a broken stack does.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import math
import os
import random
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

from functions.local_server import FLOOR_PATH, create_app
from scripts.bench_targets import Target
from scripts.command_line import HelpFormatter
from shared.catalog import SkillCatalog
from shared.engine import InferenceRequest
from shared.local_stack import LocalServer, ensure_demo_models, free_port, gunicorn_args
from shared.metrics import open_metrics
from shared.services import Services, use_services
from shared.settings import PROJECT_ROOT, Settings

INFER_PATH = "/api/v1/skills/infer"
HOST = "127.0.0.1"
CONCURRENCY = 16
SERVER_WORKERS = 2  # the shape tests/conftest.py's live_server and this benchmark run
SEED = 20240611


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do: the full run, or the smoke run of --quick."""

    inproc_iterations: int
    inproc_warmup: int
    http_sequential: int
    load_seconds: float
    load_max_requests: int
    cold_starts: int
    import_runs: int
    metrics_inproc_iterations: int
    metrics_http_pairs: int

    @classmethod
    def full(cls) -> Plan:
        return cls(2_000, 300, 1_000, 8.0, 20_000, 3, 3, 400, 1_000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(200, 50, 100, 1.5, 2_000, 1, 1, 80, 100)


# -- figures, targets and the report ---------------------------------------------------------------


TARGETS: dict[str, Target] = {
    "inproc_onnx_all7_p50_ms": Target(0.4),
    "http_ratio_p50": Target(1.3),
    "load_infer_rps": Target(1_000, at_most=False),
    "cold_start_median_s": Target(1.0),
    "worker_rss_mb": Target(150.0),
    # Metrics on must cost at most 5 % over off, in process and over HTTP.
    "inproc_metrics_on_over_off_p50": Target(1.05),
    "inproc_profiles_on_over_off_p50": Target(1.05),
    "http_metrics_on_over_off_p50": Target(1.05),
}
# The "on" stacks flush at the shortest interval allowed, so flushes happen while they are measured.
METRICS_FLUSH_SECONDS = 5


@dataclass(frozen=True)
class Row:
    """One line of the printed table: a figure's label, its key in the JSON, its unit and decimals."""

    label: str
    key: str
    unit: str
    digits: int = 3


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the nearest-rank q-quantile (q in [0, 1]) of non-empty values."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def print_table(sections: list[tuple[str, list[Row]]], figures: dict[str, float]) -> None:
    width = max(len(row.label) for _, rows in sections for row in rows) + 2
    print()
    print(f"{'figure'.ljust(width)}{'value':>14}   {'target':<12}verdict")
    for title, rows in sections:
        print(f"-- {title} " + "-" * max(0, width + 36 - len(title) - 4))
        for row in rows:
            value = figures[row.key]
            target = TARGETS.get(row.key)
            shown = f"{value:,.{row.digits}f}{row.unit}"
            goal = target.describe(row.unit) if target else ""
            verdict = ("PASS" if target.met(value) else "MISS") if target else ""
            print(f"{row.label.ljust(width)}{shown:>14}   {goal:<12}{verdict}")


# -- the stack under test --------------------------------------------------------------------------


def stack_env(folder: Path) -> dict[str, str]:
    """The environment of an embedded stack in folder, at the service's default log level: one JSON line per request."""
    return {
        "ARTIFACT_STORE": str(folder / "artifacts"),
        "DATABASE_URL": str(folder / "skills.sqlite3"),
        "MODEL_REFRESH_SECONDS": "30",
        "LOG_LEVEL": "INFO",
    }


def student_features(catalog: SkillCatalog, rng: random.Random) -> dict[str, float]:
    """One student's value for every feature of the catalog: the default, jittered within the feature's range."""
    values: dict[str, float] = {}
    for spec in catalog:
        for feature in spec.features:
            if feature.name not in values:
                spread = (feature.max - feature.min) * 0.1
                values[feature.name] = min(feature.max, max(feature.min, rng.gauss(feature.default, spread)))
    return values


def skill_bodies(catalog: SkillCatalog, students: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Request bodies, one per student and skill, each carrying only the features its skill reads."""
    return [
        {
            "student_id": f"student-{i:05d}",
            "skill": spec.skill,
            "features": {name: student[name] for name in spec.feature_names},
        }
        for i, student in enumerate(students)
        for spec in catalog
    ]


def http_request(method: str, path: str, port: int, body: dict[str, Any] | None = None) -> bytes:
    """The exact bytes of one HTTP/1.1 request that asks the server to close the connection after answering."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
    if body is None:
        return (head + "\r\n").encode()
    payload = json.dumps(body).encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


def exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Sends one request on a fresh connection and reads the answer to EOF; returns (status, raw answer)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    return (int(answer[9:12]) if answer[:5] == b"HTTP/" else 0), answer


def expect_ok(port: int, request: bytes) -> dict[str, Any]:
    status, answer = exchange(port, request)
    if status != 200:
        raise RuntimeError(f"expected 200, got {status}: {answer[:400]!r}")
    body: dict[str, Any] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return body


# -- what else ran ---------------------------------------------------------------------------------


class CpuWindow:
    """What else used the CPU while a measurement ran, in cores: other processes, and the hypervisor's steal.

    `measured` return the CPU seconds of the processes under measurement (this one, the server), which
    are subtracted from the machine's busy time.
    """

    def __init__(self, *measured: Callable[[], float]) -> None:
        self._measured = measured
        self._began = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float, float]:
        times = psutil.cpu_times()
        # guest time is already counted in user time; steal is time the hypervisor gave to other machines.
        busy = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))
        return time.perf_counter(), busy, getattr(times, "steal", 0.0), sum(f() for f in self._measured)

    def close(self) -> dict[str, float]:
        """Returns {"other_cores", "steal_cores"} averaged over the window so far."""
        (t0, busy0, steal0, own0), (t1, busy1, steal1, own1) = self._began, self._snapshot()
        wall = max(t1 - t0, 1e-9)
        return {
            "other_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
            "steal_cores": (steal1 - steal0) / wall,
        }


def server_cpu_seconds(master: psutil.Process) -> float:
    """CPU time (user + system) of the master and its workers so far."""
    total = 0.0
    for process in [master, *master.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# -- 1. in-process latency ---------------------------------------------------------------------------


def time_all_skills(
    run_one: Callable[[int, int], object], students: int, skills: int, iterations: int, first: int = 0
) -> list[float]:
    """Returns milliseconds per iteration, each iteration scoring one student (the next one) on every skill."""
    timings = []
    clock = time.perf_counter_ns
    for i in range(iterations):
        s = (first + i) % students
        started = clock()
        for k in range(skills):
            run_one(s, k)
        timings.append((clock() - started) / 1e6)
    return timings


def bench_in_process(
    services: Services, students: list[dict[str, float]], plan: Plan
) -> tuple[dict[str, float], dict[str, float]]:
    """Returns the in-process figures, and what else used the CPU meanwhile."""
    engine = services.engine
    engine.refresh(force=True)
    specs = list(services.catalog)
    bodies = iter(skill_bodies(services.catalog, students))  # student by student, each on every skill
    requests = [
        [InferenceRequest(body["student_id"], body["skill"], body["features"]) for _, body in zip(specs, bodies)]
        for _ in students
    ]
    models = [engine.deployment(spec.skill).production for spec in specs]
    matrices = [[m.schema.matrix([m.schema.prepare(r.features)]) for r, m in zip(row, models)] for row in requests]
    paths: dict[str, Callable[[int, int], object]] = {
        "serving": lambda s, k: engine.infer(requests[s][k]),
        # The same engine with serving profiles off (SERVING_PROFILES=false): what recording them costs.
        "serving_unprofiled": lambda s, k: engine.infer(requests[s][k]),
        "onnx": lambda s, k: models[k].probabilities(matrices[s][k]),
        # The first call imports xgboost and parses the boosters; the warm-up absorbs it.
        "xgb": lambda s, k: models[k].probabilities_booster(matrices[s][k]),
    }
    profiler = engine.profiler
    for run_one in paths.values():
        time_all_skills(run_one, len(students), len(specs), plan.inproc_warmup)
    # Rounds alternate the paths, so a burst of load from elsewhere hits all of them alike.
    serving_paths = ("serving", "serving_unprofiled")
    timings: dict[str, list[float]] = {name: [] for name in paths}
    rounds = 8
    window = CpuWindow(time.process_time)
    for _ in range(rounds):
        for name, run_one in paths.items():
            if name not in serving_paths:
                timings[name] += time_all_skills(run_one, len(students), len(specs), plan.inproc_iterations // rounds)
        # Serving profiles on and off, iteration by iteration: neither follows the XGBoost path (which
        # evicts the ONNX trees from the caches) more often than the other.
        for i in range(plan.inproc_iterations // rounds):
            for name in serving_paths if i % 2 == 0 else reversed(serving_paths):
                engine.profiler = None if name == "serving_unprofiled" else profiler
                timings[name] += time_all_skills(paths[name], len(students), len(specs), 1, first=i)
    engine.profiler = profiler
    if profiler is not None:
        profiler.flush()  # what was recorded is binned and written, as the background thread would
    background = window.close()
    figures = {}
    for name, label in (("serving", "onnx_all7"), ("onnx", "onnx_model_all7"), ("xgb", "xgb_model_all7")):
        figures[f"inproc_{label}_p50_ms"] = percentile(timings[name], 0.5)
        figures[f"inproc_{label}_p99_ms"] = percentile(timings[name], 0.99)
    figures["inproc_unprofiled_all7_p50_ms"] = percentile(timings["serving_unprofiled"], 0.5)
    figures["inproc_profiles_on_over_off_p50"] = (
        figures["inproc_onnx_all7_p50_ms"] / figures["inproc_unprofiled_all7_p50_ms"]
    )
    figures["inproc_xgb_over_onnx_p50"] = (
        figures["inproc_xgb_model_all7_p50_ms"] / figures["inproc_onnx_model_all7_p50_ms"]
    )
    return figures, background


# -- 2. and 3. HTTP ----------------------------------------------------------------------------------


def bench_http_sequential(port: int, infer: list[bytes], floor: bytes, count: int) -> dict[str, float]:
    """Alternates one infer and one floor request, so both see the same conditions; one connection each."""
    infer_ms: list[float] = []
    floor_ms: list[float] = []
    clock = time.perf_counter_ns
    for i in range(count):
        for request, timings in ((infer[i % len(infer)], infer_ms), (floor, floor_ms)):
            started = clock()
            status, answer = exchange(port, request)
            timings.append((clock() - started) / 1e6)
            if status != 200:
                raise RuntimeError(f"expected 200, got {status}: {answer[:400]!r}")
    figures = {
        "http_infer_p50_ms": percentile(infer_ms, 0.5),
        "http_infer_p99_ms": percentile(infer_ms, 0.99),
        "http_floor_p50_ms": percentile(floor_ms, 0.5),
        "http_floor_p99_ms": percentile(floor_ms, 0.99),
    }
    figures["http_ratio_p50"] = figures["http_infer_p50_ms"] / figures["http_floor_p50_ms"]
    figures["http_ratio_p99"] = figures["http_infer_p99_ms"] / figures["http_floor_p99_ms"]
    return figures


def run_load(
    port: int, requests: list[bytes], seconds: float, max_requests: int, master: psutil.Process
) -> dict[str, Any]:
    """Runs the load generator in its own process; returns its report, with the CPU the server and others used.

    Raises RuntimeError if any answer is not a 200, or more than 1% of the connections fail.
    """
    spec = {
        "port": port,
        "requests": [base64.b64encode(r).decode() for r in requests],
        "seconds": seconds,
        "max_requests": max_requests,
        "concurrency": CONCURRENCY,
        "server_pid": master.pid,
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--load-generator"],
        input=json.dumps(spec).encode(),
        capture_output=True,
        timeout=seconds + 60,
        check=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    failed = report["errors"]
    if report["statuses"] or not report["ok"] or sum(failed.values()) > 0.01 * (report["ok"] + sum(failed.values())):
        raise RuntimeError(
            f"load on port {port}: {report['ok']} answered 200, other statuses {report['statuses']}, failures {failed}"
        )
    return report


def load_generator() -> int:
    """The load generator's own process: reads its spec on stdin, prints one JSON report line."""
    spec = json.loads(sys.stdin.read())
    requests = [base64.b64decode(r) for r in spec["requests"]]
    server = psutil.Process(int(spec["server_pid"]))
    server_before = server_cpu_seconds(server)
    # Both are measured around the generator's window; the few calls outside it cost microseconds.
    window = CpuWindow(time.process_time, lambda: server_cpu_seconds(server))
    report = generate_load(
        int(spec["port"]), requests, float(spec["seconds"]), int(spec["max_requests"]), int(spec["concurrency"])
    )
    report["background"] = window.close()
    report["server_cores"] = (server_cpu_seconds(server) - server_before) / report["wall_s"]
    print(json.dumps(report))
    return 0


def generate_load(
    port: int, requests: list[bytes], seconds: float, max_requests: int, concurrency: int
) -> dict[str, Any]:
    """Keeps `concurrency` requests in flight, one connection each, until the time or request budget is spent.

    A readiness loop over non-blocking sockets (epoll, or poll where there is none): about half the CPU
    per request of asyncio's sock_* calls, which matters when the generator shares two cores with the server.
    """
    poller = select.epoll() if hasattr(select, "epoll") else select.poll()
    scale = 1.0 if hasattr(select, "epoll") else 1000.0  # epoll waits in seconds, poll in milliseconds
    readable, writable = select.POLLIN, select.POLLOUT  # the same values as EPOLLIN and EPOLLOUT
    address = (HOST, port)
    clock = time.perf_counter
    # fd -> [socket, request bytes still to send (None once sent), started at, first chunk of the answer]
    open_: dict[int, list[Any]] = {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    issued = 0

    def fail(fd: int, reason: str) -> None:
        errors[reason] = errors.get(reason, 0) + 1
        poller.unregister(fd)
        open_.pop(fd)[0].close()

    def start_one() -> None:
        nonlocal issued
        request = requests[issued % len(requests)]
        issued += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        started = clock()
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            reason = errno.errorcode.get(code, str(code))
            errors[reason] = errors.get(reason, 0) + 1
            sock.close()
            return
        pending: bytes | None = request
        try:
            # On loopback the handshake has completed by the time connect returns, though it says EINPROGRESS:
            # sending at once saves a round through the poller. If it has not, wait until writable.
            pending = request[sock.send(request) :] or None
        except OSError:
            pass
        open_[sock.fileno()] = [sock, pending, started, b""]
        poller.register(sock.fileno(), writable if pending else readable)

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    began = clock()
    deadline = began + seconds
    for _ in range(concurrency):
        start_one()
    while open_:
        for fd, _event in poller.poll(1.0 * scale):
            entry = open_[fd]
            sock = entry[0]
            if entry[1] is not None:
                try:
                    entry[1] = entry[1][sock.send(entry[1]) :] or None
                except OSError as exc:
                    fail(fd, type(exc).__name__)
                else:
                    if entry[1] is None:
                        poller.modify(fd, readable)
                continue
            try:
                chunk = sock.recv(65536)
            except OSError as exc:
                fail(fd, type(exc).__name__)
            else:
                if chunk:
                    entry[3] = entry[3] or chunk
                    continue
                poller.unregister(fd)
                open_.pop(fd)[0].close()
                status = entry[3][9:12].decode(errors="replace") or "none"
                if status == "200":
                    latencies.append(clock() - entry[2])
                else:
                    statuses[status] = statuses.get(status, 0) + 1
            if issued < max_requests and clock() < deadline:
                start_one()
        while len(open_) < concurrency and issued < max_requests and clock() < deadline:
            start_one()  # replaces connections that failed before they were registered
    wall = clock() - began
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "ok": len(latencies),
        "statuses": statuses,
        "errors": errors,
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else 0.0,
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else 0.0,
        "generator_cores": cpu / wall,
        "generator_cpu_us_per_request": cpu / max(1, issued) * 1e6,
    }


def bench_http(
    env: dict[str, str], bodies: list[dict[str, Any]], plan: Plan
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Returns the HTTP figures of a live server, and what else used the CPU during each part."""
    port = free_port()
    server = LocalServer(env, port, workers=SERVER_WORKERS)
    try:
        server.start()
        assert server.process is not None
        master = psutil.Process(server.process.pid)
        infer = [http_request("POST", INFER_PATH, port, body) for body in bodies]
        floor = http_request("GET", FLOOR_PATH, port)
        # Warms every worker (each loads its models on its first infer) under concurrent load.
        run_load(port, infer, min(1.0, plan.load_seconds), 2_000, master)

        window = CpuWindow(time.process_time, lambda: server_cpu_seconds(master))
        figures = bench_http_sequential(port, infer, floor, plan.http_sequential)
        background = {"http_sequential": window.close()}

        for name, requests in (("infer", infer), ("floor", [floor])):
            report = run_load(port, requests, plan.load_seconds, plan.load_max_requests, master)
            for key in ("rps", "p50_ms", "p99_ms", "server_cores", "generator_cores", "generator_cpu_us_per_request"):
                figures[f"load_{name}_{key}"] = report[key]
            figures[f"load_{name}_requests"] = report["ok"]
            figures[f"load_{name}_server_cpu_us_per_request"] = report["server_cores"] / report["rps"] * 1e6
            background[f"load_{name}"] = report["background"]
        figures["load_ratio_rps"] = figures["load_floor_rps"] / figures["load_infer_rps"]
        figures["loaded_worker_rss_max_mb"] = max(w.memory_info().rss for w in master.children()) / 2**20
        return figures, background
    finally:
        server.stop()  # also removes its log file


# -- 4. and 5. cold start, imports, memory ----------------------------------------------------------


def server_process_env(env: dict[str, str], port: int, workers: int) -> dict[str, str]:
    """The environment LocalServer gives its gunicorn process."""
    full = {**os.environ, **env, "PORT": str(port), "HOST": HOST, "SERVER_WORKERS": str(workers)}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), full.get("PYTHONPATH", "")) if p)
    return full


def cold_start(env: dict[str, str], bodies: list[dict[str, Any]], skills: list[str], log_path: Path) -> dict[str, Any]:
    """Starts a one-worker gunicorn and polls POST infer until it answers 200 (the cold start);
    then hits /healthz and every skill, and weighs the worker and the master."""
    port = free_port()
    full = server_process_env(env, port, 1)
    command = [sys.executable, "-m", "gunicorn", *gunicorn_args(Settings.from_env(full))]
    request = http_request("POST", INFER_PATH, port, bodies[0])
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=full, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = started + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"cold-start server exited with {process.returncode}:\n{log_path.read_text()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"cold-start server did not answer within 60 s:\n{log_path.read_text()}")
            try:
                status, _ = exchange(port, request, timeout=30)
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        healthz = expect_ok(port, http_request("GET", "/healthz", port))
        if sorted(healthz["models"]) != sorted(skills):
            raise RuntimeError(f"/healthz serves {sorted(healthz['models'])}, not every skill")
        for body in bodies[: len(skills)]:
            expect_ok(port, http_request("POST", INFER_PATH, port, body))
        master = psutil.Process(process.pid)
        (worker,) = master.children()
        mapped = " ".join(m.path for m in worker.memory_maps())
        return {
            "seconds": elapsed,
            "worker_rss_mb": worker.memory_info().rss / 2**20,
            "worker_uss_mb": worker.memory_full_info().uss / 2**20,
            "master_rss_mb": master.memory_info().rss / 2**20,
            "worker_maps_xgboost": "/xgboost/" in mapped,
            "worker_maps_sklearn": "/sklearn/" in mapped,
            "model_load_ms": _logged_model_load_ms(log_path),
        }
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _logged_model_load_ms(log_path: Path) -> float:
    """Sums the engine's `model loaded` log lines: how much of the cold start went to loading models."""
    total = 0.0
    for line in log_path.read_text(errors="replace").splitlines():
        if '"model loaded"' in line:
            try:
                total += float(json.loads(line)["load_ms"])
            except (ValueError, KeyError):
                continue
    return total


IMPORT_PROBE = """
import json, sys, time
started = time.perf_counter()
import shared.engine, functions.main
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

SERVING_PROBE = """
import json, sys
from functions.local_server import create_app
body = json.loads(sys.argv[1])
response = create_app().test_client().post("/api/v1/skills/infer", json=body)
print(json.dumps({
    "status": response.status_code,
    "xgboost": "xgboost" in sys.modules,
    "sklearn": "sklearn" in sys.modules,
    "onnxruntime": "onnxruntime" in sys.modules,
}))
"""


def run_probe(
    code: str, env: dict[str, str], *args: str, python_flags: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Runs Python code in a fresh interpreter on the bench stack; raises CalledProcessError if it fails."""
    return subprocess.run(
        [sys.executable, *python_flags, "-c", code, *args],
        env={**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT), "LOG_LEVEL": "WARNING"},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def slowest_imports(importtime_stderr: str, count: int = 6) -> dict[str, float]:
    """Returns the top-level packages with the largest cumulative import time in `-X importtime` output, in ms."""
    cumulative: dict[str, float] = {}
    for line in importtime_stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+([\w]+)$", line)
        if match:
            cumulative[match.group(2)] = max(cumulative.get(match.group(2), 0.0), int(match.group(1)) / 1000)
    return dict(sorted(cumulative.items(), key=lambda item: -item[1])[:count])


def bench_startup(
    env: dict[str, str], bodies: list[dict[str, Any]], skills: list[str], folder: Path, plan: Plan
) -> tuple[dict[str, float], dict[str, Any]]:
    """Returns the cold-start, import and memory figures, and the checks on what a serving process imported."""
    runs = [cold_start(env, bodies, skills, folder / f"cold-{i}.log") for i in range(plan.cold_starts)]
    imports = [json.loads(run_probe(IMPORT_PROBE, env).stdout)["seconds"] for _ in range(plan.import_runs)]
    importtime = run_probe("import shared.engine, functions.main", env, python_flags=("-X", "importtime"))
    # The probe's own line comes first; the metric lines its process writes at exit follow it.
    serving = json.loads(run_probe(SERVING_PROBE, env, json.dumps(bodies[0])).stdout.splitlines()[0])
    if serving["status"] != 200:
        raise RuntimeError(f"the serving probe's infer answered {serving['status']}")
    last = runs[-1]
    figures = {
        "cold_start_median_s": statistics.median(r["seconds"] for r in runs),
        "cold_start_max_s": max(r["seconds"] for r in runs),
        "cold_start_model_load_ms": statistics.median(r["model_load_ms"] for r in runs),
        "import_serving_modules_s": statistics.median(imports),
        "worker_rss_mb": last["worker_rss_mb"],
        "worker_uss_mb": last["worker_uss_mb"],
        "master_rss_mb": last["master_rss_mb"],
    }
    checks = {
        "xgboost_imported_after_infer": serving["xgboost"],
        "sklearn_imported_after_infer": serving["sklearn"],
        "onnxruntime_imported_after_infer": serving["onnxruntime"],
        "gunicorn_worker_maps_xgboost": last["worker_maps_xgboost"],
        "gunicorn_worker_maps_sklearn": last["worker_maps_sklearn"],
        "slowest_imports_ms": slowest_imports(importtime.stderr),
    }
    return figures, checks


# -- 6. metrics on against off ------------------------------------------------------------------------


def bench_metrics_in_process(
    settings: Settings, bodies: list[dict[str, Any]], skills: int, plan: Plan
) -> tuple[dict[str, float], dict[str, float]]:
    """Infer through the app's test client on two stacks, metrics on and off, alternating; returns the
    figures, and what else used the CPU meanwhile."""
    stacks = {
        "on": Services(settings.replace(metrics="log", metrics_flush_seconds=float(METRICS_FLUSH_SECONDS))),
        "off": Services(settings.replace(metrics="off")),
    }
    # Both serve from the same loaded models, so that they differ in nothing but their metrics.
    stacks["off"].engine = stacks["on"].engine
    client = create_app().test_client()
    students = len(bodies) // skills
    payloads = [[json.dumps(bodies[s * skills + k]).encode() for k in range(skills)] for s in range(students)]

    def run_one(s: int, k: int) -> object:
        return client.post(INFER_PATH, data=payloads[s][k], content_type="application/json")

    timings: dict[str, list[float]] = {"on": [], "off": []}
    try:
        stacks["on"].engine.refresh(force=True)
        for name, services in stacks.items():
            use_services(services)
            for k in range(skills):
                response: Any = run_one(0, k)
                if response.status_code != 200:
                    raise RuntimeError(f"in-process infer with metrics {name} answered {response.status_code}")
            time_all_skills(run_one, students, skills, plan.inproc_warmup // 6)
        # On and off alternate request by request (first one, then the other), as the HTTP figures do,
        # so load from elsewhere and the machine's drift hit both alike.
        window = CpuWindow(time.process_time)
        clock = time.perf_counter_ns
        for i in range(plan.metrics_inproc_iterations):
            s = i % students
            for k in range(skills):
                for name in ("on", "off") if (i * skills + k) % 2 == 0 else ("off", "on"):
                    use_services(stacks[name])
                    started = clock()
                    run_one(s, k)
                    timings[name].append((clock() - started) / 1e6)
        background = window.close()
    finally:
        use_services(None)
        stacks["on"].metrics.close()

    # The recording alone, on a recorder of its own: what the decorator and the infer handler add per request.
    recorder = open_metrics(settings.replace(metrics="log"))
    count = 20_000
    started = time.perf_counter_ns()
    for _ in range(count):
        recorder.record_request("infer", 200, 0.0012, "leadership", "1.0.0")
        recorder.record_score("leadership", "1.0.0", 0.5)
    record_us = (time.perf_counter_ns() - started) / count / 1e3
    recorder.close()

    on, off = percentile(timings["on"], 0.5), percentile(timings["off"], 0.5)
    return {
        "inproc_metrics_on_p50_ms": on,
        "inproc_metrics_off_p50_ms": off,
        "inproc_metrics_on_over_off_p50": on / off,
        "metrics_record_us_per_request": record_us,
    }, background


def bench_metrics_http(
    env: dict[str, str], bodies: list[dict[str, Any]], plan: Plan
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Sequential infer against one-worker servers, metrics on and off, alternating request by request;
    returns the figures, what else used the CPU, and how many metric lines the servers of each side wrote.

    Each side has two servers, all four started at once: a server process runs a few percent faster or
    slower than another for reasons of its own (measured: +2 % between two identical servers), which
    two processes per side average out instead of charging it to the metrics.
    """
    sides = {
        "on": {**env, "METRICS": "log", "METRICS_FLUSH_SECONDS": str(METRICS_FLUSH_SECONDS)},
        "off": {**env, "METRICS": "off"},
    }
    servers = [(name, LocalServer(sides[name], free_port())) for name in ("on", "off", "on", "off")]
    timings: dict[str, list[float]] = {"on": [], "off": []}
    # Started and stopped side by side: an "on" server's exit may wait up to 5 s to write its last
    # series (Cloud Monitoring's one point per 5 s), which need not delay the others.
    pool = ThreadPoolExecutor(max_workers=len(servers))
    try:
        list(pool.map(LocalServer.start, [server for _, server in servers]))
        requests = [[http_request("POST", INFER_PATH, server.port, body) for body in bodies] for _, server in servers]
        masters = [psutil.Process(server.process.pid) for _, server in servers if server.process is not None]
        for (_, server), own in zip(servers, requests):
            for request in own[: min(len(bodies), 100)]:  # loads every model, warms the worker
                expect_ok(server.port, request)
        window = CpuWindow(time.process_time, lambda: sum(server_cpu_seconds(m) for m in masters))
        clock = time.perf_counter_ns
        # Each round starts one server further along (on1 off1 on2 off2, off1 on2 off2 on1, ...): a
        # request follows one of the other side, never the same server, which would find it warmer.
        count = len(servers)
        for i in range(plan.metrics_http_pairs // 2):
            for j in ((i + step) % count for step in range(count)):
                name, server = servers[j]
                started = clock()
                status, answer = exchange(server.port, requests[j][i % len(bodies)])
                timings[name].append((clock() - started) / 1e6)
                if status != 200:
                    raise RuntimeError(f"expected 200 with metrics {name}, got {status}: {answer[:400]!r}")
        background = window.close()
    finally:
        # The "on" servers write their buffered metrics as they exit.
        list(pool.map(LocalServer.stop, [server for _, server in servers]))
        pool.shutdown()
    lines = {"on": 0, "off": 0}
    for name, server in servers:
        lines[name] += server.log().count('"message": "metric ')
    on, off = percentile(timings["on"], 0.5), percentile(timings["off"], 0.5)
    figures = {
        "http_metrics_on_p50_ms": on,
        "http_metrics_off_p50_ms": off,
        "http_metrics_on_over_off_p50": on / off,
    }
    return figures, background, {"metric_log_lines_on": lines["on"], "metric_log_lines_off": lines["off"]}


# -- the run ---------------------------------------------------------------------------------------


SECTIONS: list[tuple[str, list[Row]]] = [
    ("1. in process: one student, all 7 skills", [
        Row("engine.infer x7 (ONNX) p50", "inproc_onnx_all7_p50_ms", " ms"),
        Row("engine.infer x7 (ONNX) p99", "inproc_onnx_all7_p99_ms", " ms"),
        Row("probabilities x7 (ONNX Runtime) p50", "inproc_onnx_model_all7_p50_ms", " ms"),
        Row("probabilities x7 (ONNX Runtime) p99", "inproc_onnx_model_all7_p99_ms", " ms"),
        Row("probabilities_booster x7 (XGBoost) p50", "inproc_xgb_model_all7_p50_ms", " ms"),
        Row("probabilities_booster x7 (XGBoost) p99", "inproc_xgb_model_all7_p99_ms", " ms"),
        Row("XGBoost / ONNX Runtime (p50)", "inproc_xgb_over_onnx_p50", "x", 2),
        Row("engine.infer x7, serving profiles off, p50", "inproc_unprofiled_all7_p50_ms", " ms"),
        Row("serving profiles on / off (p50)", "inproc_profiles_on_over_off_p50", "x", 3),
    ]),
    ("2. HTTP sequential, one connection per request", [
        Row("POST infer p50", "http_infer_p50_ms", " ms"),
        Row("POST infer p99", "http_infer_p99_ms", " ms"),
        Row("GET floor p50", "http_floor_p50_ms", " ms"),
        Row("GET floor p99", "http_floor_p99_ms", " ms"),
        Row("infer / floor p50", "http_ratio_p50", "x", 2),
        Row("infer / floor p99", "http_ratio_p99", "x", 2),
    ]),
    (f"3. HTTP load, concurrency {CONCURRENCY}", [
        Row("POST infer rps", "load_infer_rps", "", 0),
        Row("POST infer p50 under load", "load_infer_p50_ms", " ms", 2),
        Row("POST infer p99 under load", "load_infer_p99_ms", " ms", 2),
        Row("  server CPU (cores)", "load_infer_server_cores", "", 2),
        Row("  server CPU per request", "load_infer_server_cpu_us_per_request", " us", 0),
        Row("  generator CPU (cores)", "load_infer_generator_cores", "", 2),
        Row("GET floor rps", "load_floor_rps", "", 0),
        Row("GET floor p50 under load", "load_floor_p50_ms", " ms", 2),
        Row("GET floor p99 under load", "load_floor_p99_ms", " ms", 2),
        Row("  server CPU (cores)", "load_floor_server_cores", "", 2),
        Row("  server CPU per request", "load_floor_server_cpu_us_per_request", " us", 0),
        Row("  generator CPU (cores)", "load_floor_generator_cores", "", 2),
        Row("  generator CPU per request", "load_floor_generator_cpu_us_per_request", " us", 0),
        Row("floor rps / infer rps", "load_ratio_rps", "x", 2),
    ]),
    ("4. cold start (1 worker, to first infer 200)", [
        Row("cold start median", "cold_start_median_s", " s"),
        Row("cold start max", "cold_start_max_s", " s"),
        Row("  of which loading 7 models", "cold_start_model_load_ms", " ms", 1),
        Row("import shared.engine, functions.main", "import_serving_modules_s", " s"),
    ]),
    ("5. memory, all 7 models loaded", [
        Row("gunicorn worker RSS", "worker_rss_mb", " MB", 1),
        Row("gunicorn worker USS", "worker_uss_mb", " MB", 1),
        Row("gunicorn master RSS", "master_rss_mb", " MB", 1),
        Row("worker RSS after the load runs (max)", "loaded_worker_rss_max_mb", " MB", 1),
    ]),
    (f"6. metrics writer on (METRICS=log, flush every {METRICS_FLUSH_SECONDS} s) against off", [
        Row("in process, infer via the app, on p50", "inproc_metrics_on_p50_ms", " ms"),
        Row("in process, infer via the app, off p50", "inproc_metrics_off_p50_ms", " ms"),
        Row("in process on / off (p50)", "inproc_metrics_on_over_off_p50", "x", 3),
        Row("HTTP POST infer (2 servers a side), on p50", "http_metrics_on_p50_ms", " ms"),
        Row("HTTP POST infer (2 servers a side), off p50", "http_metrics_off_p50_ms", " ms"),
        Row("HTTP on / off (p50)", "http_metrics_on_over_off_p50", "x", 3),
        Row("recording one request's metrics", "metrics_record_us_per_request", " us", 2),
        Row("  as a share of one engine.infer (p50)", "metrics_record_share_of_engine_infer", "", 3),
    ]),
]


def run(plan: Plan, quick: bool) -> int:
    window = CpuWindow()
    time.sleep(0.5)
    background = {"before_start": window.close()}
    with tempfile.TemporaryDirectory(prefix="skills-bench-") as temp:
        folder = Path(temp)
        env = stack_env(folder)
        settings = Settings.from_env(env).replace(batch_threads=1)
        services = Services(settings)
        published = ensure_demo_models(services, PROJECT_ROOT / "models" / "artifacts")
        catalog = services.catalog
        rng = random.Random(SEED)
        students = [student_features(catalog, rng) for _ in range(64)]
        bodies = skill_bodies(catalog, students)
        print(f"stack in {folder}: published {len(published)} demo models; {os.cpu_count()} cores", flush=True)

        print("1/4 in-process latency ...", flush=True)
        figures, background["in_process"] = bench_in_process(services, students, plan)
        print("2/4 cold start, imports, memory ...", flush=True)
        startup, checks = bench_startup(env, bodies, catalog.names, folder, plan)
        figures.update(startup)
        print("3/4 HTTP sequential and under load ...", flush=True)
        http, http_background = bench_http(env, bodies, plan)
        figures.update(http)
        background.update(http_background)
        print("4/4 metrics writer on against off, in process and over HTTP ...", flush=True)
        metrics_inproc, background["metrics_in_process"] = bench_metrics_in_process(settings, bodies, len(catalog.names), plan)
        figures.update(metrics_inproc)
        # What recording adds to the bare model path, had it been measured there (the engine records nothing).
        figures["metrics_record_share_of_engine_infer"] = figures["metrics_record_us_per_request"] / (
            figures["inproc_onnx_all7_p50_ms"] * 1000 / len(catalog.names)
        )
        metrics_http, background["metrics_http"], metric_lines = bench_metrics_http(env, bodies, plan)
        figures.update(metrics_http)
        checks.update(metric_lines)
        if metric_lines["metric_log_lines_on"] == 0 or metric_lines["metric_log_lines_off"] != 0:
            raise RuntimeError(f"the metrics-on server must write metric lines and the off one none: {metric_lines}")

    gunicorn = gunicorn_args(settings)
    server = {
        "workers": SERVER_WORKERS,
        "cold_start_workers": 1,
        "threads": int(gunicorn[gunicorn.index("--threads") + 1]),
        "worker_class": gunicorn[gunicorn.index("--worker-class") + 1],
        "log_level": settings.log_level,
        "metrics": settings.metrics,
        "onnx_threads": settings.onnx_threads,
        "cores": os.cpu_count() or 1,
    }
    print_table(SECTIONS, figures)
    print()
    print(
        f"server: gunicorn {server['workers']} workers x {server['threads']} thread, "
        f"{server['worker_class']} worker class "
        f"(cold start and memory: {server['cold_start_workers']} worker), LOG_LEVEL={server['log_level']} "
        f"(one JSON log line per request), METRICS={server['metrics']}, ONNX_THREADS={server['onnx_threads']}, "
        f"{server['cores']} cores shared with the load generator"
    )
    print(
        "after one infer in a fresh serving process: "
        f"xgboost imported={checks['xgboost_imported_after_infer']}, "
        f"sklearn imported={checks['sklearn_imported_after_infer']}, "
        f"onnxruntime imported={checks['onnxruntime_imported_after_infer']}; the gunicorn worker maps xgboost="
        f"{checks['gunicorn_worker_maps_xgboost']}, sklearn={checks['gunicorn_worker_maps_sklearn']}"
    )
    slowest = checks["slowest_imports_ms"].items()
    print("slowest imports (cumulative ms): " + ", ".join(f"{k} {v:.0f}" for k, v in slowest))
    print(
        "CPU used by other processes / stolen by the hypervisor meanwhile (cores): "
        + ", ".join(f"{k} {v['other_cores']:.2f}/{v['steal_cores']:.2f}" for k, v in background.items())
    )
    busiest = max(v["other_cores"] + v["steal_cores"] for v in background.values())
    if busiest > 0.25:
        print(
            f"NOTE: up to {busiest:.2f} of {server['cores']} cores went elsewhere; "
            "the figures are pessimistic, rerun on a quiet machine"
        )
    print(json.dumps({
        "bench": "inference",
        "quick": quick,
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "targets": {
            key: {"value": round(figures[key], 4), "target": target.describe(""), "pass": target.met(figures[key])}
            for key, target in TARGETS.items()
        },
        "checks": checks,
        "server": server,
        "background_cores": {k: {name: round(x, 3) for name, x in v.items()} for k, v in background.items()},
    }))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run with small iteration counts")
    parser.add_argument("--load-generator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_generator:
        return load_generator()
    return run(Plan.quick() if args.quick else Plan.full(), args.quick)


if __name__ == "__main__":
    sys.exit(main())
