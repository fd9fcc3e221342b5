"""Measures the batch path, on embedded stacks of its own, against the service's batch targets.

    PYTHONPATH=. .venv/bin/python scripts/bench_batch.py [--quick]

It builds throwaway stacks in a temp folder (the demo models are trained into models/artifacts if
absent, then published there), and measures, in one run:

a. in process, for a small and a large cohort: every skill scored the way the nightly chunk worker
   scores it (the production SkillModel: raw matrix with NaN for missing -> schema.prepare_matrix ->
   valid rows -> probabilities_booster, which scales in numpy and calls XGBoost's inplace_predict on
   float32), next to XGBoost's inplace_predict alone on the same already-scaled float32 matrices with
   the same booster and thread count; at BATCH_THREADS=1 (the service default) and 2. Then the cost
   of exact TreeSHAP contributions (what STORE_CONTRIBUTIONS adds) relative to scoring;
b. end to end, for a small and a large feature store: a two-worker local server (gunicorn, the local
   task queue delivering one chunk per task over HTTP), POST /tasks/nightly, then GET the run until
   it is no longer running. The first run on a fresh server is "cold" (each worker loads its models
   and imports xgboost inside its first chunk); later runs on the same server rescore everyone
   (`full`) and are "warm". The server's own "chunk scored" log lines say where the time went.

It prints a table, each figure beside its target with PASS or MISS, then one JSON line with every
figure. A MISS does not change the exit status; a failed run or a broken stack does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from scripts.bench_targets import Target
from scripts.command_line import HelpFormatter
from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer, ensure_demo_models, ensure_demo_students, free_port
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings
from shared.skill_model import SkillModel
from shared.synthetic import generate_cohort

TRAINED = PROJECT_ROOT / "models" / "artifacts"
SERVER_WORKERS = 2  # the shape tests/conftest.py's live_server and bench_inference run
THREADS = (1, 2)  # BATCH_THREADS: the service default (one worker process per core), then both cores
MISSING_SHARE = 0.05  # share of optional feature values left missing (NaN), so imputation does real work
COHORT_SEED = 20240612
POLL_SECONDS = 0.05
SIZES = ("small", "large")


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do: the full run, or the smoke run of --quick."""

    batch_students: tuple[int, int]
    batch_repeats: tuple[int, int]
    contribution_repeats: int
    nightly_students: tuple[int, int]
    nightly_servers: tuple[int, int]  # fresh servers per size, each giving one cold run
    nightly_warm_runs: tuple[int, int]  # warm runs on each of those servers
    import_probes: int

    @classmethod
    def full(cls) -> Plan:
        return cls((1_000, 100_000), (40, 5), 3, (1_000, 10_000), (3, 1), (2, 2), 3)

    @classmethod
    def quick(cls) -> Plan:
        return cls((1_000, 20_000), (10, 2), 1, (1_000, 2_000), (1, 1), (1, 1), 1)


# -- figures, targets and the report ---------------------------------------------------------------


TARGETS: dict[str, Target] = {
    **{f"batch_{size}_t{t}_engine_over_raw": Target(0.7, at_most=False) for size in SIZES for t in THREADS},
    "nightly_small_cold_wall_s": Target(10.0),
    "worker_profiles_on_over_off": Target(0.95, at_most=False),
}
# Expectations that document a cost rather than set a goal: shown beside the figure, never judged.
REFERENCES: dict[str, str] = {"contrib_over_scoring": "~100x (issue)"}


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    return statistics.median(seconds(run) for _ in range(repeats))


def verdict(key: str, value: float) -> tuple[str, str]:
    """Returns the target column and the verdict for a figure."""
    target = TARGETS.get(key)
    if target is not None:
        return target.describe(""), "PASS" if target.met(value) else "MISS"
    return REFERENCES.get(key, ""), ""


# -- a. in-process batch scoring -----------------------------------------------------------------------


def skill_matrices(catalog: SkillCatalog, students: int, seed: int) -> dict[str, np.ndarray]:
    """Raw feature rows per skill, in model order, with a share of the optional values missing (NaN)."""
    cohort = generate_cohort(catalog, students, seed)
    rng = np.random.default_rng(seed)
    matrices = {}
    for spec in catalog:
        X = np.ascontiguousarray(cohort.matrix(spec), dtype=np.float64)
        optional = np.array([not f.required for f in spec.features])
        X[(rng.random(X.shape) < MISSING_SHARE) & optional] = np.nan
        matrices[spec.skill] = X
    return matrices


def score_like_chunk_worker(model: SkillModel, X: np.ndarray) -> np.ndarray:
    """Scores rows exactly as batch.score_chunk does for one skill (minus building the assessments)."""
    filled, valid, _ = model.schema.prepare_matrix(X)
    rows = np.flatnonzero(valid)
    return model.probabilities_booster(filled[rows])


def booster_threads(model: SkillModel) -> int:
    config = json.loads(model.booster().save_config())
    return int(config["learner"]["generic_param"]["nthread"])


def bench_scoring(
    models: list[SkillModel], matrices: dict[str, np.ndarray], size: str, threads: int, repeats: int
) -> dict[str, float]:
    """Times all seven skills through the chunk worker's path and through inplace_predict alone, interleaved."""
    pairs = [(m, matrices[m.skill]) for m in models]
    students = len(next(iter(matrices.values())))
    for model, X in pairs:
        if score_like_chunk_worker(model, X).shape[0] != students:
            raise RuntimeError(f"{model.skill}: some generated rows were rejected; the comparison would be unfair")
    scaled = [(m.booster(), m.scale(m.schema.prepare_matrix(X)[0])) for m, X in pairs]

    def engine() -> None:
        for model, X in pairs:
            score_like_chunk_worker(model, X)

    def raw() -> None:
        for booster, Xs in scaled:
            booster.inplace_predict(Xs)

    engine()  # warm-up: allocator and caches settled
    raw()
    engine_s: list[float] = []
    raw_s: list[float] = []
    for _ in range(repeats):  # interleaved, so both see the same background load
        engine_s.append(seconds(engine))
        raw_s.append(seconds(raw))
    scores = students * len(pairs)
    engine_sps = scores / statistics.median(engine_s)
    raw_sps = scores / statistics.median(raw_s)
    prefix = f"batch_{size}_t{threads}"
    return {
        f"{prefix}_engine_scores_per_s": engine_sps,
        f"{prefix}_raw_scores_per_s": raw_sps,
        f"{prefix}_engine_over_raw": engine_sps / raw_sps,
    }


def bench_contributions(models: list[SkillModel], matrices: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """TreeSHAP on every skill next to scoring the same rows, as score_chunk does with STORE_CONTRIBUTIONS."""
    prepared = [(m, m.schema.prepare_matrix(matrices[m.skill])[0]) for m in models]
    shap = {m.skill: m.contributions(filled) for m, filled in prepared}  # warm-up, and the input of top-5

    def score() -> None:
        for model, filled in prepared:
            model.probabilities_booster(filled)

    def contributions() -> None:
        for model, filled in prepared:
            model.contributions(filled)

    def top_five() -> None:
        for model, filled in prepared:
            values = shap[model.skill]
            for k in range(len(filled)):
                model.top_contributions(filled[k], values[k])

    score()
    scoring_s = median_seconds(score, max(5, repeats * 5))
    shap_s = median_seconds(contributions, repeats)
    top_s = median_seconds(top_five, repeats)
    students = len(prepared[0][1])
    return {
        "contrib_students": float(students),
        "contrib_scoring_ms": scoring_s * 1000,
        "contrib_treeshap_ms": shap_s * 1000,
        "contrib_top5_ms": top_s * 1000,
        "contrib_over_scoring": shap_s / scoring_s,
        "contrib_with_top5_over_scoring": (shap_s + top_s) / scoring_s,
    }


def bench_batch(folder: Path, plan: Plan) -> tuple[dict[str, float], dict[str, Any]]:
    base = Settings.from_env(stack_env(folder / "batch"))
    services = {t: Services(base.replace(batch_threads=t)) for t in THREADS}
    ensure_demo_models(services[THREADS[0]], TRAINED)
    catalog = services[THREADS[0]].catalog
    generate_started = time.perf_counter()
    matrices = skill_matrices(catalog, max(plan.batch_students), COHORT_SEED)
    print(f"  generated {max(plan.batch_students):,} students in {time.perf_counter() - generate_started:.1f} s", flush=True)
    figures: dict[str, float] = {}
    checks: dict[str, Any] = {"booster_nthread": {}}
    for threads in THREADS:
        engine = services[threads].engine
        models = [engine.deployment(skill).production for skill in catalog.names]
        checks["booster_nthread"][f"BATCH_THREADS={threads}"] = sorted({booster_threads(m) for m in models})
        for size, students, repeats in zip(SIZES, plan.batch_students, plan.batch_repeats):
            subset = {skill: X[:students] for skill, X in matrices.items()}
            print(f"  {students:,} students x {len(models)} skills, {threads} thread(s) ...", flush=True)
            figures.update(bench_scoring(models, subset, size, threads, repeats))
        if threads == 1:
            print(f"  TreeSHAP contributions, {plan.batch_students[0]:,} students ...", flush=True)
            subset = {skill: X[: plan.batch_students[0]] for skill, X in matrices.items()}
            figures.update(bench_contributions(models, subset, plan.contribution_repeats))
    return figures, checks


# -- b. the local nightly, end to end ----------------------------------------------------------------


def stack_env(folder: Path) -> dict[str, str]:
    """The environment of an embedded stack in folder; the log level stays the service default (INFO),
    which the chunk worker's "chunk scored" lines need."""
    return {
        "ARTIFACT_STORE": str(folder / "artifacts"),
        "DATABASE_URL": str(folder / "skills.sqlite3"),
        "MODEL_REFRESH_SECONDS": "30",
    }


def http_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310 # the bench's own http://127.0.0.1 server
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url} answered {exc.code}: {exc.read()[:400]!r}") from None


@dataclass(frozen=True)
class NightlyRun:
    run_id: str
    students: int
    tasks: int
    dispatch_s: float  # the POST's own latency: scan the store, create the run, enqueue the tasks
    wall_s: float  # from the POST to the first poll that saw the run finished


def run_nightly(url: str, run_id: str, full: bool, timeout: float) -> NightlyRun:
    """Fires a run and follows it to completion; raises if it fails, scores too few, or outlasts timeout."""
    body: dict[str, Any] = {"run_id": run_id, "full": True} if full else {"run_id": run_id}
    started = time.perf_counter()
    status, dispatched = http_json("POST", f"{url}/tasks/nightly", body)
    dispatch_s = time.perf_counter() - started
    if status != 202 or dispatched["run_id"] != run_id:
        raise RuntimeError(f"POST /tasks/nightly answered {status}: {dispatched}")
    deadline = started + timeout
    while True:
        _, run = http_json("GET", f"{url}/api/v1/batch/runs/{run_id}")
        if run["status"] != "running":
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"run {run_id} still running after {timeout:.0f} s: {run}")
        time.sleep(POLL_SECONDS)
    wall_s = time.perf_counter() - started
    if run["status"] != "succeeded" or run["students_scored"] != dispatched["students"]:
        raise RuntimeError(f"run {run_id} ended {run['status']}: {run}")
    return NightlyRun(run_id, int(dispatched["students"]), int(dispatched["tasks"]), dispatch_s, wall_s)


def log_entries(text: str) -> list[dict[str, Any]]:
    """The server log's JSON lines (gunicorn's own lines are not JSON and are skipped)."""
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


@dataclass(frozen=True)
class ChunkLog:
    processing_ms: float  # the whole score_chunk call
    scoring_ms: float  # up to the first write: reads, feature JSON decode, model loading, scoring


def chunk_logs(entries: list[dict[str, Any]], run_id: str) -> list[ChunkLog]:
    return [
        ChunkLog(float(e["processing_ms"]), float(e["scoring_ms"]))
        for e in entries
        if e.get("message") == "chunk scored" and e.get("run_id") == run_id
    ]


def worker_busy_ms(entries: list[dict[str, Any]], run_id: str) -> float:
    """Sums the batch worker's request latencies for a run: the time workers spent on its chunks."""
    return sum(
        float(e["latency_ms"]) for e in entries if e.get("function") == "batch_worker" and e.get("run_id") == run_id
    )


def settled_log(server: LocalServer, runs: Sequence[NightlyRun], timeout: float = 15.0) -> list[dict[str, Any]]:
    """Returns the server's log once it holds every chunk's lines: a worker records its chunk on the run
    (which is what the poll sees) before it logs the chunk and its request."""
    deadline = time.monotonic() + timeout
    while True:
        entries = log_entries(server.log())
        missing = [
            r.run_id
            for r in runs
            if len(chunk_logs(entries, r.run_id)) < r.tasks
            or sum(1 for e in entries if e.get("function") == "batch_worker" and e.get("run_id") == r.run_id) < r.tasks
        ]
        if not missing:
            return entries
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server log lacks chunk lines of runs {missing} after {timeout:.0f} s")
        time.sleep(0.05)


def run_timeout(students: int) -> float:
    return 120.0 + students * 0.05


def bench_nightly_size(folder: Path, size: str, students: int, servers: int, warm_runs: int) -> dict[str, float]:
    env = stack_env(folder)
    services = Services(Settings.from_env(env))
    ensure_demo_models(services, TRAINED)
    seeding = time.perf_counter()
    # ensure_demo_students writes its JSON Lines file under a fresh temp folder; pointing tempfile at
    # this stack's folder for the call makes it go away with the stack.
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        seeded = ensure_demo_students(services, students)
    finally:
        tempfile.tempdir = saved
    if seeded != students:
        raise RuntimeError(f"seeded {seeded} students into {folder}, expected {students}")
    print(f"  seeded {students:,} students in {time.perf_counter() - seeding:.1f} s", flush=True)

    cold: list[NightlyRun] = []
    warm: list[NightlyRun] = []
    cold_chunks: list[ChunkLog] = []
    first_chunks: list[ChunkLog] = []
    warm_chunks: list[ChunkLog] = []
    model_load_ms: list[float] = []
    busy_share: list[float] = []
    for s in range(servers):
        server = LocalServer(env, free_port(), workers=SERVER_WORKERS)
        try:
            server.start()
            # The first run on a fresh server finds every student unscored; later ones rescore everyone.
            runs = [run_nightly(server.url, f"bench-{size}-s{s}-cold", full=s > 0, timeout=run_timeout(students))]
            for w in range(warm_runs):
                runs.append(run_nightly(server.url, f"bench-{size}-s{s}-warm{w}", full=True, timeout=run_timeout(students)))
            entries = settled_log(server, runs)
        finally:
            server.stop()  # also removes its log file
        for i, run in enumerate(runs):
            chunks = chunk_logs(entries, run.run_id)
            busy_share.append(worker_busy_ms(entries, run.run_id) / 1000 / (SERVER_WORKERS * (run.wall_s - run.dispatch_s)))
            if i == 0:
                cold.append(run)
                # Each worker's first chunk loads the models and imports xgboost: the slowest of the cold run.
                ordered = sorted(chunks, key=lambda c: -c.processing_ms)
                first_chunks.extend(ordered[:SERVER_WORKERS])
                cold_chunks.extend(ordered[SERVER_WORKERS:])
            else:
                warm.append(run)
                warm_chunks.extend(chunks)
        loads = [float(e["load_ms"]) for e in entries if e.get("message") == "model loaded"]
        model_load_ms.append(sum(loads) / SERVER_WORKERS)
        print(
            f"  server {s + 1}/{servers}: cold {cold[-1].wall_s:.2f} s, warm "
            + ", ".join(f"{r.wall_s:.2f} s" for r in runs[1:]),
            flush=True,
        )

    cold_wall = statistics.median(r.wall_s for r in cold)
    warm_wall = statistics.median(r.wall_s for r in warm)
    steady = warm_chunks or cold_chunks
    prefix = f"nightly_{size}"
    return {
        f"{prefix}_students": float(students),
        f"{prefix}_chunks": float(cold[0].tasks),
        f"{prefix}_cold_wall_s": cold_wall,
        f"{prefix}_cold_students_per_s": students / cold_wall,
        f"{prefix}_warm_wall_s": warm_wall,
        f"{prefix}_warm_students_per_s": students / warm_wall,
        f"{prefix}_dispatch_ms": statistics.median(r.dispatch_s for r in cold + warm) * 1000,
        f"{prefix}_first_chunk_ms": statistics.median(c.processing_ms for c in first_chunks),
        f"{prefix}_model_load_ms": statistics.median(model_load_ms),
        f"{prefix}_chunk_ms": statistics.median(c.processing_ms for c in steady),
        f"{prefix}_chunk_scoring_ms": statistics.median(c.scoring_ms for c in steady),
        f"{prefix}_chunk_writes_ms": statistics.median(c.processing_ms - c.scoring_ms for c in steady),
        f"{prefix}_worker_busy_share": statistics.median(busy_share),
    }


XGBOOST_IMPORT_PROBE = """
import json, sys, time
if sys.argv[1] == "bundle":
    # The deploy bundle carries no scikit-learn; xgboost imports it (and scipy.stats) whenever it can.
    sys.modules["sklearn"] = None
import shared.engine, functions.main  # what a serving worker has imported before its first chunk
started = time.perf_counter()
import xgboost
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def xgboost_import_seconds(runs: int) -> tuple[float, float]:
    """The lazy `import xgboost` a worker pays in its first chunk, in fresh processes: with this
    environment's packages, and as in the deploy bundle (no scikit-learn)."""
    timings: dict[str, list[float]] = {"venv": [], "bundle": []}
    for _ in range(runs):
        for kind, found in timings.items():
            done = subprocess.run(
                [sys.executable, "-c", XGBOOST_IMPORT_PROBE, kind],
                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "LOG_LEVEL": "WARNING"},
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            found.append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
    return statistics.median(timings["venv"]), statistics.median(timings["bundle"])


def bench_nightly(folder: Path, plan: Plan) -> dict[str, float]:
    figures: dict[str, float] = {}
    for size, students, servers, warm_runs in zip(SIZES, plan.nightly_students, plan.nightly_servers, plan.nightly_warm_runs):
        print(f"  {students:,} students: {servers} fresh server(s), {warm_runs} warm run(s) each ...", flush=True)
        figures.update(bench_nightly_size(folder / f"nightly-{size}", size, students, servers, warm_runs))
    figures["nightly_xgboost_import_s"], figures["nightly_xgboost_import_bundle_s"] = xgboost_import_seconds(plan.import_probes)
    return figures


# -- the report ------------------------------------------------------------------------------------


def print_batch_table(figures: dict[str, float], plan: Plan) -> None:
    print("-- a. batch scoring in process: scores/s (one score = one student x one skill), all 7 skills")
    print(f"{'students':>10}{'threads':>9}{'engine path':>15}{'raw inplace':>15}{'engine/raw':>12}   {'target':<10}verdict")
    for size, students in zip(SIZES, plan.batch_students):
        for t in THREADS:
            prefix = f"batch_{size}_t{t}"
            goal, judged = verdict(f"{prefix}_engine_over_raw", figures[f"{prefix}_engine_over_raw"])
            print(
                f"{students:>10,}{t:>9}{figures[prefix + '_engine_scores_per_s']:>15,.0f}"
                f"{figures[prefix + '_raw_scores_per_s']:>15,.0f}{figures[prefix + '_engine_over_raw']:>12.2f}   {goal:<10}{judged}"
            )
    students = int(figures["contrib_students"])
    rows = [
        (f"scoring, {students:,} students x 7 skills (1 thread)", "contrib_scoring_ms", " ms", 1),
        ("exact TreeSHAP (model.contributions), same rows", "contrib_treeshap_ms", " ms", 1),
        ("top-5 per row (model.top_contributions)", "contrib_top5_ms", " ms", 1),
        ("TreeSHAP / scoring", "contrib_over_scoring", "x", 1),
        ("TreeSHAP + top-5 / scoring", "contrib_with_top5_over_scoring", "x", 1),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"-- STORE_CONTRIBUTIONS cost {'-' * (width - 10)}")
    for label, key, unit, digits in rows:
        goal, judged = verdict(key, figures[key])
        print(f"{label.ljust(width)}{figures[key]:>12,.{digits}f}{unit:<3}   {goal:<16}{judged}")


def print_nightly_table(figures: dict[str, float], plan: Plan) -> None:
    rows = [
        ("chunks (tasks)", "chunks", "", 0),
        ("wall, cold server: POST -> run finished", "cold_wall_s", " s", 2),
        ("  students/s", "cold_students_per_s", "", 0),
        ("wall, warm server (median)", "warm_wall_s", " s", 2),
        ("  students/s", "warm_students_per_s", "", 0),
        ("dispatch: POST /tasks/nightly latency", "dispatch_ms", " ms", 0),
        ("first chunk per worker (cold)", "first_chunk_ms", " ms", 0),
        ("  of which loading 7 models (per worker)", "model_load_ms", " ms", 0),
        ("steady chunk: processing", "chunk_ms", " ms", 0),
        ("  read + decode + score", "chunk_scoring_ms", " ms", 0),
        ("  writes (assessments, markers, run)", "chunk_writes_ms", " ms", 0),
        ("workers busy / (2 x wall after dispatch)", "worker_busy_share", "", 2),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"-- b. local nightly, {SERVER_WORKERS} gunicorn workers {'-' * max(0, width - 20)}")
    print(f"{'students'.ljust(width)}" + "".join(f"{n:>12,}" for n in plan.nightly_students) + f"   {'target':<18}verdict")
    for label, key, unit, digits in rows:
        cells = ""
        verdicts = []
        for size in SIZES:
            full_key = f"nightly_{size}_{key}"
            cells += f"{figures[full_key]:>{12 - len(unit)},.{digits}f}{unit}"
            if full_key in TARGETS:
                goal, judged = verdict(full_key, figures[full_key])
                verdicts.append(f"{goal} s at {plan.nightly_students[SIZES.index(size)]:,}".ljust(18) + judged)
        print(f"{label.ljust(width)}{cells}   {' '.join(verdicts)}")
    print(f"{'import xgboost in a fresh worker'.ljust(width)}{figures['nightly_xgboost_import_s']:>10.2f} s")
    print(f"{'  as deployed (no scikit-learn)'.ljust(width)}{figures['nightly_xgboost_import_bundle_s']:>10.2f} s")


# -- c. what recording serving profiles costs the chunk worker ----------------------------------------


def bench_profiles(folder: Path, students: int, rounds: int) -> dict[str, float]:
    """Runs the chunk worker in process (score_chunk: read, score, write, record) over the same students
    with SERVING_PROFILES on and off, alternating chunk by chunk; returns both throughputs and their ratio."""
    from shared import batch
    from shared.runs import Chunk, Run

    env = {"ARTIFACT_STORE": str(folder / "profiles" / "artifacts"), "DATABASE_URL": str(folder / "profiles" / "db.sqlite3"),
           "LOG_LEVEL": "ERROR", "METRICS": "off"}
    base = Settings.from_env(env)
    stacks = {flag: Services(base.replace(serving_profiles=flag)) for flag in (True, False)}
    ensure_demo_models(stacks[True], TRAINED)
    ensure_demo_students(stacks[True], count=students, seed=COHORT_SEED)
    ids = [s.student_id for s in stacks[True].features.scoring_states()]
    signature = batch.models_signature(batch.production_versions(stacks[True]))
    elapsed = {True: 0.0, False: 0.0}
    scored = {True: 0, False: 0}
    for round_number in range(rounds + 1):  # the first round warms both stacks up and is not counted
        for flag, services in stacks.items():
            run_id = f"profiles-{int(flag)}-{round_number}"
            chunks = [Chunk(run_id, i, ids[s : s + 200]) for i, s in enumerate(range(0, len(ids), 200))]
            services.runs.create(Run(run_id, True, signature, "", len(ids), len(chunks)), chunks)
            started = time.perf_counter()
            for chunk in chunks:
                batch.score_chunk(services, run_id, chunk.chunk, chunk.student_ids)
            if round_number:
                elapsed[flag] += time.perf_counter() - started
                scored[flag] += len(ids)
    on, off = scored[True] / elapsed[True], scored[False] / elapsed[False]
    return {"worker_profiles_on_students_per_s": on, "worker_profiles_off_students_per_s": off,
            "worker_profiles_on_over_off": on / off}


def run(plan: Plan, quick: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="skills-bench-batch-") as temp:
        folder = Path(temp)
        print(f"stacks in {folder}; {os.cpu_count()} cores", flush=True)
        figures: dict[str, float] = {}
        print("1/3 in-process batch scoring ...", flush=True)
        batch, checks = bench_batch(folder, plan)
        figures.update(batch)
        print("2/3 local nightly end to end ...", flush=True)
        figures.update(bench_nightly(folder, plan))
        print("3/3 the chunk worker with serving profiles on and off ...", flush=True)
        figures.update(bench_profiles(folder, 1_000 if quick else 2_000, 2 if quick else 5))

    print()
    print_batch_table(figures, plan)
    print()
    print_nightly_table(figures, plan)
    print()
    target = TARGETS["worker_profiles_on_over_off"]
    print(
        f"chunk worker in process (read, score 7 skills, write, record; chunks of 200), students per second: "
        f"serving profiles on {figures['worker_profiles_on_students_per_s']:,.0f}, off "
        f"{figures['worker_profiles_off_students_per_s']:,.0f}, on / off {figures['worker_profiles_on_over_off']:.3f} "
        f"(target {target.describe('')}: {'PASS' if target.met(figures['worker_profiles_on_over_off']) else 'MISS'})"
    )
    print()
    print(
        f"engine path = schema.prepare_matrix + valid rows + probabilities_booster (scale, float32, inplace_predict, clip); "
        f"raw = inplace_predict on the scaled float32 rows; {MISSING_SHARE:.0%} of optional values missing. "
        f"booster nthread by BATCH_THREADS: {checks['booster_nthread']}"
    )
    print(
        f"nightly: BATCH_CHUNK_SIZE={Settings.from_env({}).batch_chunk_size}, gunicorn {SERVER_WORKERS} sync workers, "
        f"local task queue delivered by each worker process, one task at a time. cold = first run on a fresh server (median of "
        + " / ".join(str(n) for n in plan.nightly_servers)
        + " servers), warm = later full runs on it (median of "
        + " / ".join(str(n * w) for n, w in zip(plan.nightly_servers, plan.nightly_warm_runs))
        + " runs); first chunk per worker = the cold run's slowest chunks; steady chunk = the warm runs' chunks"
    )
    verdicts = {key: target.met(figures[key]) for key, target in TARGETS.items()}
    print(json.dumps({
        "bench": "batch",
        "quick": quick,
        "sizes": {
            "batch_small": plan.batch_students[0],
            "batch_large": plan.batch_students[1],
            "nightly_small": plan.nightly_students[0],
            "nightly_large": plan.nightly_students[1],
        },
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "targets": {k: {"value": round(figures[k], 4), "target": t.describe(""), "pass": verdicts[k]} for k, t in TARGETS.items()},
        "checks": checks,
        "cores": os.cpu_count() or 1,
    }))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with smaller cohorts and fewer repeats")
    args = parser.parse_args(argv)
    return run(Plan.quick() if args.quick else Plan.full(), args.quick)


if __name__ == "__main__":
    sys.exit(main())
