"""Capacity plan of the nightly re-score on Google Cloud, computed from figures measured here.

    PYTHONPATH=. .venv/bin/python scripts/capacity_plan.py              # print the plan from the recorded figures
    PYTHONPATH=. .venv/bin/python scripts/capacity_plan.py --measure    # measure again, record, print
    PYTHONPATH=. .venv/bin/python scripts/capacity_plan.py --measure --write-readme

`--measure` runs the chunk worker's real path (read features, score seven skills, write assessments,
mark the students, record the chunk) against the Firestore emulator and the demo models, and records
the CPU seconds this process spent per student: scoring plus the client side of every read and
write (the emulator runs in its own process, so its CPU is not counted). One worker process with
one thread stands for one vCPU. The figures go to scripts/capacity_figures.json; the plan itself is
arithmetic over those figures and the documented limits and prices below, so it changes when the
code gets faster. `--write-readme` replaces the README's capacity section with the printed plan;
a test checks that the README and this script agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts import readme_sections
from scripts.command_line import HelpFormatter
from shared.settings import PROJECT_ROOT

FIGURES_FILE = PROJECT_ROOT / "scripts" / "capacity_figures.json"
README = PROJECT_ROOT / "README.md"
README_SECTION = "capacity-plan"  # the README section this script writes

WINDOW_SECONDS = 15 * 60
TARGET_STUDENTS = 1_000_000
SKILLS = 7
CHUNK = 200  # BATCH_CHUNK_SIZE's default: students per task

# Documented limits the plan relies on (the README names where each comes from).
TASKS_MAX_DISPATCHES_PER_SECOND = 500  # Cloud Tasks: the most a queue may be configured to dispatch
TASKS_MAX_CONCURRENT_DISPATCHES = 5_000  # Cloud Tasks: the most concurrent dispatches per queue
RUN_MAX_INSTANCES = 100  # the worker function's max instances (a Terraform variable)
RUN_VCPU_PER_INSTANCE = 1
RUN_MEMORY_GIB = 0.5  # one serving process with xgboost imported stays under ~230 MB; 512 MiB per instance
RAMP_START_OPS = 500  # Firestore's 500/50/5 guidance: start at 500 ops/s on a new collection ...
RAMP_GROWTH = 1.5  # ... then grow by 50 % ...
RAMP_STEP_SECONDS = 300  # ... every 5 minutes
FIRESTORE_MAX_WRITES_PER_COMMIT = 500
# Assumed, not measured here: a production Firestore commit of up to 500 writes in the same region.
ASSUMED_COMMIT_SECONDS = 0.05

# List prices assumed (USD, us-central1: Cloud Run request-based billing tier 1, Firestore Standard
# edition regional, Cloud Tasks after the free tier), as read on PRICES_DATE; check before budgeting.
PRICES_DATE = "2026-12-01"
PRICE_RUN_VCPU_SECOND = 0.000024
PRICE_RUN_GIB_SECOND = 0.0000025
PRICE_RUN_REQUEST = 0.40 / 1_000_000
PRICE_FIRESTORE_WRITE = 0.09 / 100_000
PRICE_FIRESTORE_READ = 0.03 / 100_000
PRICE_TASKS_OPERATION = 0.40 / 1_000_000


@dataclass(frozen=True)
class WriteShape:
    """How a night's results are laid out in Firestore, and what that costs in writes per student."""

    name: str
    description: str
    writes_per_student: float
    reads_per_student: float  # the dispatcher's scoring state and the worker's features, plus what writing reads


def write_shapes() -> list[WriteShape]:
    return [
        WriteShape(
            "per assessment (today)",
            "one document per (run, student, skill), one latest-view document per (student, skill), the student's scoring marker",
            2 * SKILLS + 1 + 1 / CHUNK,
            2 + SKILLS,  # the latest view moves only forward: each pointer is read in the writing transaction
        ),
        WriteShape(
            "per student",
            "one document per (run, student) holding all seven scores, the latest view folded into the student's document",
            2 + 1 / CHUNK,
            2 + 1,
        ),
        WriteShape(
            "per chunk",
            f"one document per task holding its {CHUNK} students' scores (about {CHUNK * SKILLS * 60 // 1024} KiB, under the 1 MiB limit)",
            1 / CHUNK + 1 / CHUNK,
            2,
        ),
    ]


def ramp_writes(seconds: float, start: float = RAMP_START_OPS) -> float:
    """Returns the most writes Firestore's 500/50/5 ramp admits in `seconds`, starting cold."""
    total, rate, elapsed = 0.0, start, 0.0
    while elapsed < seconds:
        step = min(RAMP_STEP_SECONDS, seconds - elapsed)
        total += rate * step
        rate *= RAMP_GROWTH
        elapsed += step
    return total


def ramp_minutes_to(rate: float, start: float = RAMP_START_OPS) -> float:
    """Returns how many minutes of ramping it takes before `rate` writes per second are admitted."""
    steps = 0
    while start * RAMP_GROWTH**steps < rate:
        steps += 1
    return steps * RAMP_STEP_SECONDS / 60


def plan(figures: dict[str, Any]) -> str:
    """Returns the capacity plan as Markdown, computed from measured figures and the constants above."""
    cpu = figures["cpu_seconds_per_student"]
    per_vcpu = 1.0 / cpu
    shapes = write_shapes()
    today = shapes[0]
    commits_per_student = today.writes_per_student / FIRESTORE_MAX_WRITES_PER_COMMIT
    wall_per_student = cpu + commits_per_student * ASSUMED_COMMIT_SECONDS
    per_instance = RUN_VCPU_PER_INSTANCE / wall_per_student

    compute_bound = RUN_MAX_INSTANCES * per_instance * WINDOW_SECONDS
    tasks_bound = TASKS_MAX_DISPATCHES_PER_SECOND * CHUNK * WINDOW_SECONDS
    firestore_bound = ramp_writes(WINDOW_SECONDS) / today.writes_per_student
    bounds = {
        f"compute ({RUN_MAX_INSTANCES} instances x {per_instance:,.0f} students/s)": compute_bound,
        f"Cloud Tasks dispatch ({TASKS_MAX_DISPATCHES_PER_SECOND}/s x {CHUNK} students)": tasks_bound,
        f"Firestore write ramp from cold ({ramp_writes(WINDOW_SECONDS):,.0f} writes / {today.writes_per_student:.3f} per student)": firestore_bound,
    }
    binding = min(bounds, key=lambda k: bounds[k])
    instances_for_target = TARGET_STUDENTS * wall_per_student / WINDOW_SECONDS

    lines = [
        f"Computed by `scripts/capacity_plan.py` from figures measured on {figures['measured_on']} "
        f"({figures['machine']}); prices assumed as listed on {PRICES_DATE}.",
        "",
        "**Measured.** The chunk worker's real path (read features, score seven skills, write the "
        "assessments, mark the students, record the chunk) against the Firestore emulator costs "
        f"{cpu * 1000:.2f} ms of CPU per student ({figures['students']:,} students in chunks of {CHUNK}; "
        f"scoring alone {figures['scoring_cpu_seconds_per_student'] * 1000:.2f} ms): "
        f"**{per_vcpu:,.0f} students x 7 skills per vCPU-second**. With concurrency 1 per vCPU the worker "
        f"also waits for its commits: {commits_per_student:.3f} commits per student at an assumed "
        f"{ASSUMED_COMMIT_SECONDS * 1000:.0f} ms each, so one 1-vCPU instance re-scores about "
        f"{per_instance:,.0f} students per second.",
        "",
        "**Students x 7 skills re-scored in 15 minutes**, by constraint:",
        "",
        "| constraint | students in 15 min |",
        "| --- | --- |",
        *(f"| {name} | {value:,.0f} |" for name, value in bounds.items()),
        "",
        f"The binding one is **{binding.split(' (')[0]}: {bounds[binding]:,.0f} students** a night in "
        "15 minutes with today's write shape. Compute is not the limit: "
        f"{instances_for_target:.1f} instances would score {TARGET_STUDENTS:,} students in 15 minutes. "
        "The ramp is Firestore's guidance for traffic that grows from a low baseline, which a nightly "
        "burst after a quiet day is; it is a planning figure, not a hard limit.",
        "",
        f"**What makes {TARGET_STUDENTS:,} students possible.** Writes needed, sustained rate over 15 "
        "minutes, and what Firestore's ramp admits from cold:",
        "",
        "| write shape | writes per student | writes for 1,000,000 | writes/s over 15 min | ramp minutes to that rate | students a cold ramp admits in 15 min |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for shape in shapes:
        writes = TARGET_STUDENTS * shape.writes_per_student
        rate = writes / WINDOW_SECONDS
        lines.append(
            f"| {shape.name}: {shape.description} | {shape.writes_per_student:.3f} | {writes:,.0f} | "
            f"{rate:,.0f} | {ramp_minutes_to(rate):.0f} | {ramp_writes(WINDOW_SECONDS) / shape.writes_per_student:,.0f} |"
        )
    per_student = shapes[1]
    lines += [
        "",
        f"Today's shape needs {TARGET_STUDENTS * today.writes_per_student / WINDOW_SECONDS:,.0f} writes/s, "
        f"which Firestore admits only after {ramp_minutes_to(TARGET_STUDENTS * today.writes_per_student / WINDOW_SECONDS):.0f} "
        "minutes of ramping. One document per student and run (seven scores in it, the latest view "
        f"folded into the student's document) needs {TARGET_STUDENTS * per_student.writes_per_student / WINDOW_SECONDS:,.0f} "
        "writes/s: that is the shape for 1,000,000 students, with the nightly run started "
        f"{ramp_minutes_to(TARGET_STUDENTS * per_student.writes_per_student / WINDOW_SECONDS):.0f} minutes of ramp "
        "earlier (or the queue's dispatch rate raised step by step, 500/50/5), and `assessed_at` exempted "
        "from single-field indexing (a timestamp indexed across a collection caps its writes at 500/s).",
        "",
        f"**Cost per night** (prices of {PRICES_DATE}: Cloud Run ${PRICE_RUN_VCPU_SECOND}/vCPU-s, "
        f"${PRICE_RUN_GIB_SECOND}/GiB-s, $0.40 per million requests; Firestore ${PRICE_FIRESTORE_WRITE * 100_000:.2f} "
        f"per 100,000 writes, ${PRICE_FIRESTORE_READ * 100_000:.2f} per 100,000 reads; Cloud Tasks $0.40 per million "
        "operations; free tiers ignored):",
        "",
        "| students | write shape | Cloud Run | Firestore writes | Firestore reads | Cloud Tasks | total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for students in (100_000, TARGET_STUDENTS):
        for shape in (today, per_student):
            run_seconds = students * wall_per_student
            tasks = students / CHUNK
            run_cost = run_seconds * (PRICE_RUN_VCPU_SECOND * RUN_VCPU_PER_INSTANCE + PRICE_RUN_GIB_SECOND * RUN_MEMORY_GIB)
            run_cost += tasks * PRICE_RUN_REQUEST
            write_cost = students * shape.writes_per_student * PRICE_FIRESTORE_WRITE
            read_cost = students * shape.reads_per_student * PRICE_FIRESTORE_READ
            tasks_cost = tasks * PRICE_TASKS_OPERATION
            total = run_cost + write_cost + read_cost + tasks_cost
            lines.append(
                f"| {students:,} | {shape.name} | ${run_cost:.2f} | ${write_cost:.2f} | ${read_cost:.2f} | "
                f"${tasks_cost:.4f} | **${total:.2f}** |"
            )
    lines += [
        "",
        "Writes dominate: the per-student shape cuts a night's cost by about "
        f"{(today.writes_per_student / per_student.writes_per_student):.0f}x on Firestore. Not counted: the drift "
        "check, single inference traffic, storage, egress, and the minimum instances kept warm.",
    ]
    return "\n".join(lines) + "\n"


# -- measuring ---------------------------------------------------------------------------------------


def measure(students: int) -> dict[str, Any]:
    """Runs the chunk worker's path against the Firestore emulator; returns the figures the plan needs."""
    import os
    import platform

    from shared import batch
    from shared.local_stack import ensure_demo_models
    from shared.runs import Chunk, Run
    from shared.services import Services
    from shared.settings import Settings
    from shared.synthetic import generate_cohort
    from tests.emulators.firestore import FirestoreEmulator

    emulator = FirestoreEmulator()
    emulator.start()
    folder = Path(tempfile.mkdtemp(prefix="capacity-plan-"))
    previous = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
    try:
        settings = Settings.from_env(
            {
                "DATABASE_URL": "firestore://capacity-plan/(default)",
                "ARTIFACT_STORE": str(folder / "artifacts"),
                "FIRESTORE_EMULATOR_HOST": emulator.host,
                "LOG_LEVEL": "ERROR",
                "METRICS": "off",
            }
        )
        services = Services(settings)
        ensure_demo_models(services, PROJECT_ROOT / "models" / "artifacts")
        cohort = generate_cohort(services.catalog, students, seed=5)
        names = sorted(cohort.features)
        updates = {
            sid: {name: float(cohort.features[name][i]) for name in names} for i, sid in enumerate(cohort.student_ids)
        }
        ids = list(updates)
        for start in range(0, len(ids), 1000):
            services.features.upsert({sid: updates[sid] for sid in ids[start : start + 1000]})
        versions = batch.production_versions(services)
        run_id = f"capacity-{int(time.time())}"
        chunks = [Chunk(run_id, i, ids[s : s + CHUNK]) for i, s in enumerate(range(0, len(ids), CHUNK))]
        services.runs.create(
            Run(run_id, True, batch.models_signature(versions), "", len(ids), len(chunks)), chunks
        )
        batch.score_chunk(services, run_id, 0, chunks[0].student_ids)  # warm-up: models, xgboost, client
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        for chunk in chunks[1:]:
            batch.score_chunk(services, run_id, chunk.chunk, chunk.student_ids)
        cpu = time.process_time() - cpu_started
        wall = time.perf_counter() - wall_started
        measured = students - CHUNK

        models = [services.engine.deployment(skill).production for skill in versions]
        stored = list(services.features.get_many(ids[:CHUNK]).values())
        matrix_names = sorted({n for m in models for n in m.feature_names})
        X_all, _ = batch.feature_matrix(stored, matrix_names)
        column = {n: j for j, n in enumerate(matrix_names)}
        score_started = time.process_time()
        repeats = 20
        for _ in range(repeats):
            for model in models:
                filled, valid, _ = model.schema.prepare_matrix(X_all[:, [column[n] for n in model.feature_names]])
                model.probabilities_booster(filled)
        scoring = (time.process_time() - score_started) / (repeats * len(stored))
    finally:
        emulator.stop()
        if previous is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = previous
    return {
        "measured_on": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "students": measured,
        "cpu_seconds_per_student": round(cpu / measured, 7),
        "scoring_cpu_seconds_per_student": round(scoring, 7),
        "emulator_wall_seconds_per_student": round(wall / measured, 7),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--measure", action="store_true", help="measure the figures again (starts the Firestore emulator)")
    parser.add_argument("--students", type=int, default=2_200, help="students to measure with")
    parser.add_argument("--write-readme", action="store_true", help="replace the README's capacity section")
    args = parser.parse_args(argv)
    if args.measure:
        figures = measure(args.students)
        FIGURES_FILE.write_text(json.dumps(figures, indent=1) + "\n")
    figures = json.loads(FIGURES_FILE.read_text())
    text = plan(figures)
    print(text, end="")
    if args.write_readme:
        README.write_text(readme_sections.with_section(README.read_text(), README_SECTION, text))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
