"""Soak: holds the real local server under steady load and checks that it neither fails nor grows.

    PYTHONPATH=. .venv/bin/python scripts/bench_soak.py [--requests N] [--concurrency C] [--help]

It builds a throwaway embedded stack in a temp folder (the demo models are trained into models/artifacts if
absent, then published there), starts the local server as `make run` does (gunicorn, SERVER_WORKERS sync
workers: one per core unless the variable says otherwise; LOG_LEVEL=INFO, one JSON line per request) on
127.0.0.1, and sends --requests POST /api/v1/skills/infer at --concurrency, one connection per request
(the readiness-loop load generator of bench_inference.py). A request scores one skill, as the endpoint
does: seven consecutive requests score one student on all seven skills, over --students varied students,
and --explain-share of them, spread evenly, ask for `"explain": true` (exact TreeSHAP, which imports
XGBoost into the worker on its first one).

After --warmup requests it reads each worker's resident memory (VmRSS in /proc/PID/status of the gunicorn
master's children), the baseline, then again after every --segment requests until the end. It prints
errors (non-2xx answers and failed connections), latency and throughput after the warm-up, and each
worker's memory beside the targets: no error, no worker replaced, and each worker's memory at the end
within --rss-growth of its memory after the warm-up. Then one JSON line. A MISS does not change the exit
status; a stack that does not start does.

The load stops between segments to read memory (a few milliseconds each); latency percentiles are per
segment, so the run reports the median of the segments' p50 and the worst segment's p99 (an upper bound
of the p99 over all of them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from scripts.bench_inference import CpuWindow, generate_load, http_request, server_cpu_seconds, stack_env, student_features
from scripts.bench_targets import Target
from scripts.command_line import HelpFormatter
from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer, ensure_demo_models, free_port
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings

INFER_PATH = "/api/v1/skills/infer"
SEED = 20261202


def build_requests(catalog: SkillCatalog, port: int, count: int, students: int, explain_share: float) -> list[bytes]:
    """The raw HTTP requests, in order: request i scores skill i mod 7 of student (i div 7) mod `students`,
    and asks for an explanation when it crosses the next multiple of 1/explain_share."""
    rng = random.Random(SEED)
    population = [student_features(catalog, rng) for _ in range(students)]
    specs = list(catalog)
    requests = []
    for i in range(count):
        s, spec = (i // len(specs)) % students, specs[i % len(specs)]
        body: dict[str, Any] = {
            "student_id": f"soak-{s:05d}",
            "skill": spec.skill,
            "features": {name: population[s][name] for name in spec.feature_names},
        }
        if math.floor((i + 1) * explain_share) > math.floor(i * explain_share):
            body["explain"] = True
        requests.append(http_request("POST", INFER_PATH, port, body))
    return requests


def vm_rss_kb(pid: int) -> int:
    """Returns a process's resident memory in KiB, as the kernel reports it (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def workers_rss_kb(master: psutil.Process) -> dict[int, int]:
    """Returns {pid: VmRSS in KiB} of every worker (child) of the gunicorn master."""
    return {child.pid: vm_rss_kb(child.pid) for child in master.children()}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the soak and returns its report (figures, targets, per-worker memory, segments)."""
    with tempfile.TemporaryDirectory(prefix="skills-soak-") as temp:
        env = stack_env(Path(temp))
        services = Services(Settings.from_env(env))
        ensure_demo_models(services, PROJECT_ROOT / "models" / "artifacts")
        port = free_port()
        requests = build_requests(services.catalog, port, args.requests, args.students, args.explain_share)
        print(
            f"soak: {args.requests:,} POST {INFER_PATH} at concurrency {args.concurrency}, {args.workers} workers, "
            f"{args.explain_share:.0%} with explain, {args.students:,} students; memory after {args.warmup:,} "
            f"and every {args.segment:,} requests",
            flush=True,
        )
        with LocalServer(env, port, workers=args.workers) as server:
            assert server.process is not None
            master = psutil.Process(server.process.pid)
            return run_segments(args, requests, port, master)


def run_segments(args: argparse.Namespace, requests: list[bytes], port: int, master: psutil.Process) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_seconds
    bounds = [0, args.warmup, *range(args.warmup + args.segment, args.requests, args.segment), args.requests]
    segments: list[dict[str, Any]] = []
    samples: list[tuple[int, dict[int, int]]] = []
    window: CpuWindow | None = None
    server_cpu_before = 0.0
    for first, last in zip(bounds, bounds[1:]):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(f"NOTE: stopped at the time limit (--max-seconds {args.max_seconds:g}) after {first:,} requests")
            break
        if first == args.warmup:  # what else ran, and the server's CPU, are measured after the warm-up
            window = CpuWindow(time.process_time, lambda: server_cpu_seconds(master))
            server_cpu_before = server_cpu_seconds(master)
        report = generate_load(port, requests[first:last], remaining, last - first, args.concurrency)
        errors = sum(report["statuses"].values()) + sum(report["errors"].values())
        segments.append({
            "first": first, "requests": report["ok"] + errors, "ok": report["ok"], "errors": errors,
            "statuses": report["statuses"], "connection_errors": report["errors"], "wall_s": report["wall_s"],
            "rps": report["rps"], "p50_ms": report["p50_ms"], "p99_ms": report["p99_ms"],
        })
        samples.append((first + segments[-1]["requests"], workers_rss_kb(master)))
        print(
            f"  {samples[-1][0]:>7,} requests: {report['rps']:,.0f} rps, p50 {report['p50_ms']:.2f} ms, "
            f"p99 {report['p99_ms']:.2f} ms, errors {errors}; worker RSS "
            + ", ".join(f"{kb / 1024:.1f}" for kb in samples[-1][1].values()) + " MB",
            flush=True,
        )
    background = window.close() if window is not None else {"other_cores": 0.0, "steal_cores": 0.0}
    steady = segments[1:] or segments
    steady_wall = sum(s["wall_s"] for s in steady)
    server_cores = (server_cpu_seconds(master) - server_cpu_before) / steady_wall if window is not None else 0.0
    return summarize(args, segments, steady, samples, background, server_cores)


def summarize(
    args: argparse.Namespace,
    segments: list[dict[str, Any]],
    steady: list[dict[str, Any]],
    samples: list[tuple[int, dict[int, int]]],
    background: dict[str, float],
    server_cores: float,
) -> dict[str, Any]:
    baseline, end = samples[0][1], samples[-1][1]
    workers = [
        {
            "pid": pid,
            "rss_after_warmup_mb": round(kb / 1024, 2),
            "rss_end_mb": round(end[pid] / 1024, 2) if pid in end else None,
            "growth": round(end[pid] / kb - 1, 4) if pid in end else None,
            "rss_mb": [round(rss[pid] / 1024, 2) if pid in rss else None for _, rss in samples],
        }
        for pid, kb in baseline.items()
    ]
    growths = [w["growth"] for w in workers if w["growth"] is not None]
    steady_ok = sum(s["ok"] for s in steady)
    figures = {
        "requests": sum(s["requests"] for s in segments),
        "errors": sum(s["errors"] for s in segments),
        "workers_replaced": len(set(baseline) - set(end)) + len(set(end) - set(baseline)),
        "rps": steady_ok / sum(s["wall_s"] for s in steady) if steady_ok else 0.0,
        "p50_ms": statistics.median(s["p50_ms"] for s in steady),
        "p99_ms": max(s["p99_ms"] for s in steady),
        "server_cores": server_cores,
        "rss_after_warmup_max_mb": max(baseline.values()) / 1024,
        "rss_end_max_mb": max(end.values()) / 1024,
        "rss_growth_max": max(growths) if growths else 0.0,
    }
    targets = {
        "errors": Target(0),
        "workers_replaced": Target(0),
        "rss_growth_max": Target(args.rss_growth),
    }
    return {
        "bench": "soak",
        "config": {
            "requests": args.requests, "concurrency": args.concurrency, "workers": args.workers,
            "warmup": args.warmup, "segment": args.segment, "explain_share": args.explain_share,
            "students": args.students, "rss_growth": args.rss_growth, "max_seconds": args.max_seconds,
            "cores": os.cpu_count() or 1,
        },
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "targets": {
            k: {"value": round(figures[k], 4), "target": t.describe(""), "pass": t.met(figures[k])} for k, t in targets.items()
        },
        "workers": workers,
        "samples_at": [at for at, _ in samples],
        "segments": segments,
        "background_cores": {k: round(v, 3) for k, v in background.items()},
    }


def print_report(report: dict[str, Any]) -> None:
    figures, targets, config = report["figures"], report["targets"], report["config"]
    rows = [
        ("requests sent", "requests", "", 0),
        ("errors (non-2xx or failed connection)", "errors", "", 0),
        ("workers replaced during the run", "workers_replaced", "", 0),
        (f"throughput after the warm-up (rps, concurrency {config['concurrency']})", "rps", "", 0),
        ("latency p50 (median of the segments)", "p50_ms", " ms", 2),
        ("latency p99 (worst segment)", "p99_ms", " ms", 2),
        ("server CPU (cores)", "server_cores", "", 2),
        ("largest worker RSS growth, warm-up to end", "rss_growth_max", "", 3),
    ]
    width = max(len(label) for label, *_ in rows) + 2
    print()
    print(f"{'figure'.ljust(width)}{'value':>12}   {'target':<10}verdict")
    for label, key, unit, digits in rows:
        target = targets.get(key)
        shown = f"{figures[key]:,.{digits}f}{unit}"
        verdict = ("PASS" if target["pass"] else "MISS") if target else ""
        print(f"{label.ljust(width)}{shown:>12}   {(target['target'] if target else ''):<10}{verdict}")
    print()
    print(f"worker RSS (VmRSS), MB, after {config['warmup']:,} requests and at the end ({figures['requests']:,}):")
    for worker in report["workers"]:
        end = "gone" if worker["rss_end_mb"] is None else f"{worker['rss_end_mb']:.1f}"
        growth = "" if worker["growth"] is None else f"{worker['growth']:+.1%}"
        trail = " -> ".join("-" if mb is None else f"{mb:.1f}" for mb in worker["rss_mb"])
        print(f"  pid {worker['pid']}: {worker['rss_after_warmup_mb']:.1f} -> {end} ({growth}); every sample: {trail}")
    background = report["background_cores"]
    print(
        f"CPU used by other processes / stolen by the hypervisor after the warm-up (cores): "
        f"{background['other_cores']:.2f}/{background['steal_cores']:.2f} of {config['cores']}"
    )


def main() -> int:
    default_workers = Settings.from_env().server_workers
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests in all, warm-up included")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--warmup", type=int, default=2_000, help="requests before the memory baseline")
    parser.add_argument("--segment", type=int, default=2_000, help="requests between memory readings after the warm-up")
    parser.add_argument("--explain-share", type=float, default=0.1, help="share of requests with \"explain\": true")
    parser.add_argument("--students", type=int, default=1_000, help="distinct students the requests cycle through")
    parser.add_argument(
        "--workers", type=int, default=default_workers, help="gunicorn workers (the production count: SERVER_WORKERS)"
    )
    parser.add_argument("--rss-growth", type=float, default=0.10, help="largest growth of a worker's RSS allowed")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop sending after this long, whatever is left")
    args = parser.parse_args()
    if not 0 < args.warmup < args.requests:
        parser.error("--warmup must be above 0 and below --requests")
    if args.segment < 1 or args.concurrency < 1 or args.students < 1 or args.workers < 1:
        parser.error("--segment, --concurrency, --students and --workers must be at least 1")
    if not 0 <= args.explain_share <= 1:
        parser.error("--explain-share must be between 0 and 1")
    report = soak(args)
    print_report(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
