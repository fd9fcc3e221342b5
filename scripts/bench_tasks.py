"""Measures how long the nightly dispatcher takes to enqueue its chunk tasks on Cloud Tasks, sequential and in parallel.

    PYTHONPATH=. .venv/bin/python scripts/bench_tasks.py [--quick]

It measures, in one run:

a. against the Cloud Tasks emulator (started here, from .venv-tasks-emulator): 5,000 chunk tasks
   (BATCH_CHUNK_SIZE student ids each, as dispatch_nightly builds them) through
   CloudTasksQueue.enqueue_many, sequential (width 1) and at ENQUEUE_WIDTH, each on a fresh paused
   queue so that delivery does not interfere; the tasks are then counted with ListTasks. The emulator
   answers in about a millisecond and runs on this machine, so this shows the client's cost and the
   emulator's, not the network's;
b. against a stand-in CreateTask server in another process that answers after LATENCY_MS, the round
   trip a CreateTask takes across a network: the same 5,000 tasks at ENQUEUE_WIDTH, and the sequential
   rate on a sample (5,000 sequential calls would take minutes; its 5,000 figure is projected from that rate).

It prints a table, then one JSON line with every figure. A MISS does not change the exit status; a
broken emulator or a wrong task count does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from scripts.bench_targets import Target
from scripts.command_line import HelpFormatter
from shared.gcp.tasks import ENQUEUE_WIDTH, CloudTasksQueue
from shared.settings import PROJECT_ROOT, Settings
from shared.tasks import Task
from tests.emulators.cloud_tasks import CloudTasksEmulator, new_queue_path

LATENCY_MS = 20.0
SERVICE_ACCOUNT = "tasks-invoker@skills-bench.iam.gserviceaccount.com"
WORKER_URL = "https://batch-worker.example.run.app/tasks/batch-worker"

TARGETS: dict[str, Target] = {
    # The dispatcher enqueues inside one HTTP request from Cloud Scheduler: 5,000 chunks (a million
    # students at the default BATCH_CHUNK_SIZE) must fit well inside a function's 60 s default timeout.
    "latency_parallel_5000_s": Target(30.0),
}

STAND_IN_PROCESS = """
import sys, time
from tests.emulators.cloud_tasks import CreateTaskStandIn
server = CreateTaskStandIn(latency_seconds=float(sys.argv[1])).start()
print(server.host, flush=True)
sys.stdin.read()  # runs until the benchmark closes its stdin
"""


@dataclass(frozen=True)
class Plan:
    tasks: int
    sequential_sample: int  # tasks sent sequentially to the slow stand-in, to measure the rate

    @classmethod
    def full(cls) -> Plan:
        return cls(5_000, 150)

    @classmethod
    def quick(cls) -> Plan:
        return cls(500, 50)


def chunk_tasks(run_id: str, count: int, chunk_size: int) -> list[Task]:
    """The tasks dispatch_nightly enqueues for `count` chunks of `chunk_size` students (demo-style ids)."""
    tasks = []
    for chunk in range(count):
        ids = [f"student-{chunk * chunk_size + i:07d}" for i in range(chunk_size)]
        tasks.append(Task(f"{run_id}-chunk-{chunk:06d}", WORKER_URL, {"run_id": run_id, "chunk": chunk, "student_ids": ids}))
    return tasks


def timed_enqueue(host: str, path: str, tasks: list[Task], width: int) -> float:
    """Enqueues the tasks through a fresh CloudTasksQueue (its client built inside the timing); returns seconds."""
    queue = CloudTasksQueue(path, service_account=SERVICE_ACCOUNT, audience=WORKER_URL, emulator_host=host, enqueue_width=width)
    try:
        started = time.perf_counter()
        created = queue.enqueue_many(tasks)
        seconds = time.perf_counter() - started
    finally:
        queue.close()
    if created != len(tasks):
        raise RuntimeError(f"enqueue_many created {created} of {len(tasks)} tasks at width {width}")
    return seconds


def bench_emulator(plan: Plan, tasks: list[Task]) -> dict[str, float]:
    figures: dict[str, float] = {}
    with CloudTasksEmulator() as emulator:
        # Warm-up on a queue of its own: imports the client and opens the emulator's first connection.
        warm = emulator.create_queue(new_queue_path("bench-warm"), paused=True)
        timed_enqueue(emulator.host, warm, tasks[:20], ENQUEUE_WIDTH)
        for label, width in (("sequential", 1), ("parallel", ENQUEUE_WIDTH)):
            path = emulator.create_queue(new_queue_path(f"bench-{label}"), paused=True)
            print(f"  emulator: {plan.tasks:,} tasks at width {width} ...", flush=True)
            seconds = timed_enqueue(emulator.host, path, tasks, width)
            held = len(emulator.list_tasks(path))
            if held != plan.tasks:
                raise RuntimeError(f"the emulator's queue holds {held} tasks after {plan.tasks} enqueues at width {width}")
            figures[f"emulator_{label}_s"] = seconds
            figures[f"emulator_{label}_per_s"] = plan.tasks / seconds
    figures["emulator_speedup"] = figures["emulator_sequential_s"] / figures["emulator_parallel_s"]
    return figures


def bench_latency(plan: Plan, tasks: list[Task]) -> dict[str, float]:
    stand_in = subprocess.Popen(
        [sys.executable, "-c", STAND_IN_PROCESS, str(LATENCY_MS / 1000)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    try:
        assert stand_in.stdout is not None
        host = stand_in.stdout.readline().decode().strip()
        if not host:
            raise RuntimeError("the stand-in CreateTask server did not start")
        timed_enqueue(host, new_queue_path("bench-warm"), chunk_tasks("warm", 20, 1), ENQUEUE_WIDTH)
        sample = tasks[: plan.sequential_sample]
        print(f"  stand-in, {LATENCY_MS:g} ms per call: {len(sample):,} tasks at width 1 ...", flush=True)
        sequential_per_s = len(sample) / timed_enqueue(host, new_queue_path("bench-seq"), sample, 1)
        print(f"  stand-in, {LATENCY_MS:g} ms per call: {plan.tasks:,} tasks at width {ENQUEUE_WIDTH} ...", flush=True)
        parallel_s = timed_enqueue(host, new_queue_path("bench-par"), tasks, ENQUEUE_WIDTH)
    finally:
        if stand_in.stdin is not None:
            stand_in.stdin.close()
        stand_in.terminate()
        stand_in.wait(timeout=10)
    return {
        "latency_ms": LATENCY_MS,
        "latency_sequential_per_s": sequential_per_s,
        "latency_sequential_5000_s": 5_000 / sequential_per_s,  # projected from the sample's rate
        "latency_parallel_per_s": plan.tasks / parallel_s,
        "latency_parallel_5000_s": 5_000 / (plan.tasks / parallel_s),  # measured when the plan sends 5,000
        "latency_speedup": (plan.tasks / parallel_s) / sequential_per_s,
    }


def print_table(figures: dict[str, float], plan: Plan, chunk_size: int, task_bytes: int) -> None:
    print(f"-- enqueue {plan.tasks:,} chunk tasks ({chunk_size} student ids, ~{task_bytes:,} bytes each) through CloudTasksQueue.enqueue_many")
    print(f"{'':44}{'width 1':>14}{f'width {ENQUEUE_WIDTH}':>14}{'speedup':>10}   {'target':<10}verdict")
    print(
        f"{'emulator: seconds for ' + format(plan.tasks, ',') + ' tasks':44}"
        f"{figures['emulator_sequential_s']:>12.2f} s{figures['emulator_parallel_s']:>12.2f} s"
        f"{figures['emulator_speedup']:>9.2f}x"
    )
    print(f"{'  tasks/s':44}{figures['emulator_sequential_per_s']:>14,.0f}{figures['emulator_parallel_per_s']:>14,.0f}")
    target = TARGETS["latency_parallel_5000_s"]
    value = figures["latency_parallel_5000_s"]
    print(
        f"{f'stand-in at {LATENCY_MS:g} ms/call: seconds for 5,000':44}"
        f"{figures['latency_sequential_5000_s']:>11.1f}*s{value:>12.2f} s{figures['latency_speedup']:>9.1f}x"
        f"   {target.describe(' s'):<10}{'PASS' if target.met(value) else 'MISS'}"
    )
    print(f"{'  tasks/s':44}{figures['latency_sequential_per_s']:>14,.0f}{figures['latency_parallel_per_s']:>14,.0f}")
    print(
        f"* projected from {plan.sequential_sample} sequential calls. The emulator runs on this machine "
        f"({os.cpu_count()} cores) and answers in ~1 ms, so it shows CPU cost; the stand-in (another process) "
        "adds a network-like round trip, which is what parallel calls hide."
    )


def run(plan: Plan, quick: bool) -> int:
    chunk_size = Settings.from_env({}).batch_chunk_size
    tasks = chunk_tasks("nightly-bench", plan.tasks, chunk_size)
    task_bytes = len(json.dumps(tasks[-1].payload, separators=(",", ":")))
    print(f"{plan.tasks:,} tasks of {chunk_size} students; ENQUEUE_WIDTH={ENQUEUE_WIDTH}", flush=True)
    figures: dict[str, float] = {}
    print("1/2 the Cloud Tasks emulator ...", flush=True)
    figures.update(bench_emulator(plan, tasks))
    print(f"2/2 a CreateTask stand-in answering after {LATENCY_MS:g} ms ...", flush=True)
    figures.update(bench_latency(plan, tasks))
    print()
    print_table(figures, plan, chunk_size, task_bytes)
    print(json.dumps({
        "bench": "tasks",
        "quick": quick,
        "sizes": {"tasks": plan.tasks, "chunk_size": chunk_size, "body_bytes": task_bytes, "width": ENQUEUE_WIDTH},
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "targets": {
            k: {"value": round(figures[k], 4), "target": t.describe(""), "pass": t.met(figures[k])} for k, t in TARGETS.items()
        },
        "cores": os.cpu_count() or 1,
    }))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {Plan.quick().tasks} tasks instead of 5,000")
    args = parser.parse_args(argv)
    if not CloudTasksEmulator.installed():
        print("The Cloud Tasks emulator is not installed; run `make emulators`.", file=sys.stderr)
        return 2
    return run(Plan.quick() if args.quick else Plan.full(), args.quick)


if __name__ == "__main__":
    sys.exit(main())
