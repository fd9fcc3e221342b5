"""Batch scoring: the ad-hoc batch endpoint, the nightly dispatcher that fans out chunks, and the chunk worker."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from shared.assessments import Assessment
from shared.clock import now_iso
from shared.engine import InferenceRequest, in_canary, parse_inference_request
from shared.errors import ModelUnavailable, NotFound, PayloadTooLarge, ServiceError, StoreUnavailable
from shared.feature_store import ScoredMarker, StudentFeatures
from shared.profiles import chunk_parts
from shared.request_fields import CHUNK, CHUNK_STUDENT_IDS, RUN_ID, RequestFields, parameter
from shared.runs import Chunk, Run
from shared.services import Services
from shared.skill_model import SkillModel, confidence_from_probability
from shared.tasks import Task

log = logging.getLogger(__name__)

WRITE_BATCH = 500  # Firestore's limit of writes per batch; the SQLite store takes it whole


# -- ad-hoc batch endpoint --------------------------------------------------------------------------

BATCH_FIELDS = frozenset({"items"})


def infer_batch(services: Services, body: Any) -> dict[str, Any]:
    """Scores every item of `{"items": [...]}`, one vectorized call per skill and model version.

    A bad item fails only itself: its result carries its error. Raises ValidationError for a malformed
    envelope (not an object, no items), PayloadTooLarge for more than MAX_BATCH_ITEMS items.
    """
    limit = services.settings.max_batch_items
    fields = RequestFields(body, BATCH_FIELDS, "must be a JSON object with an items array")
    items = fields.array("items", f"must be an array of 1 to {limit} infer requests")
    fields.done()
    if len(items) > limit:
        # Too much in one request is the envelope's size, not a malformed field: the contract's 413.
        raise PayloadTooLarge(
            f"The batch has {len(items)} items; the limit is {limit}.", {"field": "items", "limit_items": limit}
        )
    results: list[dict[str, Any]] = [{}] * len(items)
    parsed: list[InferenceRequest] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse_inference_request(item, services.catalog))
            positions.append(index)
        except ServiceError as exc:
            results[index] = _item_error(index, item, exc)
    for index, outcome in zip(positions, services.engine.infer_many(parsed)):
        if isinstance(outcome, ServiceError):
            results[index] = _item_error(index, items[index], outcome)
        else:
            results[index] = {**outcome, "index": index}
    failed = sum(1 for r in results if "error" in r)
    return {"results": results, "succeeded": len(items) - failed, "failed": failed}


def _item_error(index: int, item: Any, error: ServiceError) -> dict[str, Any]:
    student_id = item.get("student_id") if isinstance(item, dict) else None
    skill = item.get("skill") if isinstance(item, dict) else None
    return {
        "index": index,
        "student_id": student_id if isinstance(student_id, str) else None,
        "skill": skill if isinstance(skill, str) else None,
        **error.to_dict(),
    }


# -- nightly dispatcher -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunVersions:
    """The versions a run scores one skill with: production, and a canary taking its share of students."""

    production: str
    canary: str | None = None
    canary_traffic: float = 0.0

    def spec(self) -> str:
        """Returns the signature's part for the skill: `1.0.0`, or with a canary `1.0.0|1.1.0@0.1`."""
        if self.canary is None:
            return self.production
        return f"{self.production}|{self.canary}@{format(self.canary_traffic, '.6g')}"

    @classmethod
    def parse(cls, spec: str) -> RunVersions:
        """Reads a spec written by `spec` (a plain version, as runs recorded before canaries were scored, too)."""
        production, _, canary = spec.partition("|")
        if not canary:
            return cls(production)
        version, _, traffic = canary.partition("@")
        return cls(production, version, float(traffic))


def models_signature(versions: Mapping[str, Union[str, RunVersions]]) -> str:
    """Returns one string naming the model versions of every skill, e.g. `communication=1.0.0;leadership=1.0.0|1.1.0@0.1`
    (a skill with a canary names production, the canary and its traffic)."""
    def spec(value: Union[str, RunVersions]) -> str:
        return value.spec() if isinstance(value, RunVersions) else value

    return ";".join(f"{skill}={spec(versions[skill])}" for skill in sorted(versions))


def production_versions(services: Services) -> dict[str, str]:
    """Returns each skill's production version from the registry (without loading any model)."""
    return {
        skill: next(v.version for v in versions if v.stage == "production")
        for skill, versions in services.registry.serving().items()
        if skill in services.catalog and any(v.stage == "production" for v in versions)
    }


def serving_versions(services: Services) -> dict[str, RunVersions]:
    """Returns each skill's production version and running canary with its traffic, from the registry
    (without loading any model): what a nightly run records at dispatch and scores with."""
    result: dict[str, RunVersions] = {}
    for skill, versions in services.registry.serving().items():
        production = next((v for v in versions if v.stage == "production"), None)
        if skill not in services.catalog or production is None:
            continue
        canary = next((v for v in versions if v.stage == "canary"), None)
        result[skill] = RunVersions(production.version, canary.version, canary.traffic) if canary else RunVersions(production.version)
    return result


NIGHTLY_FIELDS = frozenset({"full", "run_id"})


def parse_nightly_request(body: Any) -> tuple[bool, str | None]:
    """Returns (full, run_id) from the dispatcher's optional body; raises ValidationError naming each bad field."""
    if body is None:
        return False, None
    fields = RequestFields(body, NIGHTLY_FIELDS)
    full = fields.boolean("full")
    run_id = fields.optional_text("run_id", RUN_ID)
    fields.done()
    return full, run_id


def task_name(run_id: str, chunk: int) -> str:
    """Returns the chunk's task name: deterministic (a second firing enqueues nothing new), and led by a
    short hash, since Cloud Tasks warns that names sharing a sequential prefix slow its dispatch."""
    spread = hashlib.sha256(f"{run_id}/{chunk}".encode()).hexdigest()[:4]
    return f"{spread}-{run_id}-chunk-{chunk:06d}"


def dispatch_nightly(services: Services, full: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Starts (or resumes) a run: picks the students to score, splits them into chunks, enqueues a task each.

    Incremental by default: a student is picked if their features changed since they were last
    scored or a skill's serving versions changed (production, or a canary's version or traffic). The run
    records them; each student is scored by the version its stable bucket picks, as online. The run id defaults to the UTC date, and task
    names derive from it, so firing twice for one run enqueues nothing new.
    """
    run_id = run_id or "nightly-" + datetime.now(timezone.utc).strftime("%Y%m%d")
    runs = services.runs
    if runs.get(run_id) is None:
        versions = serving_versions(services)
        if not versions:
            raise ModelUnavailable("No skill has a version in production; there is nothing to score with.")
        signature = models_signature(versions)
        students = [s.student_id for s in services.features.scoring_states() if full or s.needs_scoring(signature)]
        size = services.settings.batch_chunk_size
        chunks = [Chunk(run_id, i, students[start : start + size]) for i, start in enumerate(range(0, len(students), size))]
        started = now_iso()
        run = Run(
            run_id=run_id,
            full=full,
            models=signature,
            started_at=started,
            students_total=len(students),
            tasks_total=len(chunks),
            finished_at=started if not chunks else None,
        )
        runs.create(run, chunks)
    chunks = runs.chunks(run_id)
    enqueued = services.tasks.enqueue_many(
        [
            Task(
                task_name(run_id, chunk.chunk),
                services.settings.worker_url,
                {"run_id": run_id, "chunk": chunk.chunk, "student_ids": chunk.student_ids},
            )
            # A chunk already done is not sent again: firing a run again after Cloud Tasks' name
            # deduplication window (about an hour) would otherwise re-score it.
            for chunk in chunks
            if not chunk.done
        ]
    )
    students_total = sum(len(c.student_ids) for c in chunks)
    log.info(
        "nightly run dispatched",
        extra={"run_id": run_id, "students": students_total, "tasks": len(chunks), "enqueued": enqueued},
    )
    return {"run_id": run_id, "students": students_total, "tasks": len(chunks)}


FAILED_SAMPLES = 20


def failure_counts(failures: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """Returns how many (student, skill) failures each skill has."""
    counts: dict[str, int] = {}
    for skills in failures:
        for skill in skills:
            counts[skill] = counts.get(skill, 0) + 1
    return counts


def failure_summary(chunks: Iterable[Chunk]) -> dict[str, Any]:
    """Returns a run's failures by skill and reason, and the first few (student, skill, reason), by id only."""
    by_skill: dict[str, dict[str, int]] = {}
    first: list[dict[str, str]] = []
    for chunk in chunks:
        for entry in chunk.failed:
            # entries recorded before failures were per skill carry one reason for the whole student
            skills = entry.get("skills") or {"*": entry["reason"]}
            for skill, reason in skills.items():
                reasons = by_skill.setdefault(skill, {})
                reasons[reason] = reasons.get(reason, 0) + 1
                if len(first) < FAILED_SAMPLES:
                    first.append({"student_id": entry["student_id"], "skill": skill, "reason": reason})
    return {"by_skill": by_skill, "first": first}


def run_status(services: Services, run_id: str) -> dict[str, Any]:
    """Returns a run's progress, and once it has failures, their summary; raises ValidationError for a malformed
    run id (the path parameter `run_id`), NotFound for an unknown one."""
    parameter("run_id", run_id, RUN_ID)
    run = services.runs.get(run_id)
    if run is None:
        raise NotFound(f"No batch run {run_id!r}.")
    status = run.to_dict()
    if run.students_failed:
        status["failures"] = failure_summary(services.runs.chunks(run_id))
    return status


# -- chunk worker -----------------------------------------------------------------------------------


CHUNK_FIELDS = frozenset({"run_id", "chunk", "student_ids"})


def parse_chunk_request(body: Any) -> tuple[str, int, list[str]]:
    """Returns (run_id, chunk, student_ids) of a worker task; raises ValidationError naming each bad field."""
    fields = RequestFields(body, CHUNK_FIELDS)
    run_id = fields.text("run_id", RUN_ID)
    chunk = fields.integer("chunk", CHUNK)
    student_ids = fields.texts("student_ids", CHUNK_STUDENT_IDS)
    fields.done()
    return run_id, chunk, student_ids


def feature_matrix(
    students: Sequence[StudentFeatures], names: Sequence[str]
) -> tuple[np.ndarray, dict[int, dict[str, str]]]:
    """Returns one row per student over the named features (NaN where missing), and per row the stored
    values that are not numbers (feature -> reason): only the skills that read such a feature fail."""
    X = np.full((len(students), len(names)), np.nan)
    bad: dict[int, dict[str, str]] = {}
    for i, student in enumerate(students):
        stored = student.features
        row = X[i]
        for j, name in enumerate(names):
            value = stored.get(name)
            if value is None:
                continue
            if type(value) is float or type(value) is int:
                row[j] = value
            else:
                bad.setdefault(i, {})[name] = f"features.{name}: stored value is not a number"
    return X, bad


def score_chunk(
    services: Services, run_id: str, chunk: int, student_ids: Sequence[str], attempt: int = 0
) -> dict[str, int]:
    """Scores a chunk's students on the run's skills and stores the assessments; returns the counts.

    Writes are idempotent (deterministic ids), so a retried chunk overwrites its earlier attempt.
    A student with invalid or missing stored features is recorded as failed on the run (a permanent
    problem, not retried) and gets no assessment from it. Any other failure (a store that cannot be
    reached, a model that cannot be loaded) raises, so the queue retries; on the last attempt the
    chunk's students are first recorded as failed, so the run still finishes.
    """
    started = time.perf_counter()
    run = services.runs.get(run_id)
    if run is None:
        raise NotFound(f"No batch run {run_id!r}.")
    if chunk >= run.tasks_total:  # a chunk the run does not have would write assessments it never counts
        raise NotFound(f"Batch run {run_id!r} has no chunk {chunk}: its chunks are 0 to {run.tasks_total - 1}.")
    recorded = services.runs.chunk(run_id, chunk)
    if recorded is not None and recorded.done:
        # Delivered again after its result was recorded (delivery is at least once; an attempt whose
        # deliverer died is made again): the assessments are stored, so scoring again would only cost.
        log.info("chunk already done", extra={"run_id": run_id, "chunk": chunk})
        return {"scored": recorded.scored, "failed": len(recorded.failed)}
    try:
        models = _run_models(services, run.models)
        return _score_chunk(services, run_id, chunk, student_ids, attempt, started, models)
    except Exception as exc:
        if attempt + 1 >= services.settings.task_max_attempts:
            # The queue gives up after this attempt: record the chunk's students as failed, so the
            # run still finishes (as partial or failed) instead of running for ever.
            message = exc.message if isinstance(exc, ServiceError) else type(exc).__name__
            reason = f"chunk failed after {attempt + 1} attempts: {message}"
            try:
                skills = dict.fromkeys(parse_models_signature(run.models), reason)
                services.runs.record_chunk(
                    run_id, chunk, 0, [{"student_id": s, "reason": reason, "skills": skills} for s in student_ids]
                )
            except ServiceError:
                log.error("could not record a failed chunk", extra={"run_id": run_id, "chunk": chunk})
        raise


def parse_models_signature(signature: str) -> dict[str, str]:
    """Returns {skill: spec} from a models_signature string (a spec is a version, or `prod|canary@traffic`)."""
    return dict(part.split("=", 1) for part in signature.split(";") if "=" in part)


def parse_run_versions(signature: str) -> dict[str, RunVersions]:
    """Returns {skill: RunVersions} from a models_signature string."""
    return {skill: RunVersions.parse(spec) for skill, spec in parse_models_signature(signature).items()}


@dataclass(frozen=True)
class _SkillModels:
    """A skill's loaded models for a run: production, and the canary with the traffic recorded at dispatch."""

    production: SkillModel
    canary: SkillModel | None
    canary_traffic: float

    def served(self) -> RunVersions:
        return RunVersions(self.production.version, self.canary.version if self.canary else None, self.canary_traffic)

    def split(self, student_ids: Sequence[str]) -> list[tuple[SkillModel, np.ndarray]]:
        """Returns each model with the indices of the students it scores, by the students' stable buckets."""
        if self.canary is None:
            return [(self.production, np.arange(len(student_ids)))]
        canary = np.fromiter((in_canary(s, self.canary_traffic) for s in student_ids), dtype=bool, count=len(student_ids))
        return [(self.production, np.flatnonzero(~canary)), (self.canary, np.flatnonzero(canary))]

    def models(self) -> list[SkillModel]:
        return [self.production] + ([self.canary] if self.canary else [])


def _run_models(services: Services, signature: str) -> list[_SkillModels]:
    """Returns the loaded models of the versions the run scores with (production, and a canary where the run
    recorded one); raises ModelUnavailable if this process cannot serve exactly those (after one forced
    registry check)."""
    wanted = parse_run_versions(signature)

    def loaded() -> list[_SkillModels]:
        found = []
        for skill, versions in wanted.items():
            deployment = services.engine.deployment(skill)
            canary = deployment.canary if versions.canary is not None else None
            found.append(_SkillModels(deployment.production, canary, versions.canary_traffic if canary else 0.0))
        return found

    try:
        models = loaded()
    except ModelUnavailable:
        models = []
    if [m.served() for m in models] != list(wanted.values()):
        # The run names the versions it scores with; this process may not have seen them yet.
        services.engine.refresh(force=True)
        models = loaded()
    if [m.served() for m in models] != list(wanted.values()):
        served = {m.production.skill: m.served() for m in models}
        raise ModelUnavailable(
            f"This process cannot load the run's model versions ({signature}); it serves {models_signature(served)}.",
            {"run_models": parse_models_signature(signature), "loaded_models": {k: v.spec() for k, v in served.items()}},
        )
    return models


def _score_chunk(
    services: Services,
    run_id: str,
    chunk: int,
    student_ids: Sequence[str],
    attempt: int,
    started: float,
    skill_models: list[_SkillModels],
) -> dict[str, int]:
    models = [m for skill in skill_models for m in skill.models()]
    stored = services.features.get_many(student_ids)
    # The unit of failure is one student on one skill: student -> {skill: reason}.
    failed: dict[str, dict[str, str]] = {}
    students: list[StudentFeatures] = []
    for student_id in dict.fromkeys(student_ids):
        if student_id in stored:
            students.append(stored[student_id])
        else:
            failed[student_id] = {m.skill: "no features are stored for this student" for m in models}

    names = sorted({name for model in models for name in model.feature_names})
    column = {name: j for j, name in enumerate(names)}
    X_all, bad_cells = feature_matrix(students, names)

    assessed_at = now_iso()
    profiled: list[tuple[SkillModel, np.ndarray, np.ndarray, np.ndarray]] = []
    assessments: list[Assessment] = []
    versions: dict[str, RunVersions] = {}
    keep_contributions = services.settings.store_contributions
    # Each student is scored by the version its stable bucket picks, the same function online inference uses.
    units = [unit for skill in skill_models for unit in skill.split([s.student_id for s in students])]
    for skill in skill_models:
        versions[skill.production.skill] = skill.served()
    for model, subset in units:
        if subset.size == 0:
            continue
        X = X_all[np.ix_(subset, np.array([column[name] for name in model.feature_names], dtype=np.intp))]
        filled, valid, local_problems = model.schema.prepare_matrix(X)
        # Rows below are the students' positions in the chunk; `local` ones index the subset.
        problems = {int(subset[row]): problem for row, problem in local_problems.items()}
        reads = set(model.feature_names)
        position = {int(row): k for k, row in enumerate(subset)}
        for row, cells in bad_cells.items():
            if row not in position:
                continue
            hit = [reason for name, reason in cells.items() if name in reads]
            if hit:
                valid[position[row]] = False
                problems.setdefault(row, hit[0])
        for row, problem in problems.items():
            failed.setdefault(students[row].student_id, {})[model.skill] = problem
        local_rows = np.flatnonzero(valid)
        if local_rows.size == 0:
            continue
        rows = subset[local_rows]
        scoring = filled if local_rows.size == len(filled) else filled[local_rows]
        scores = model.probabilities_booster(scoring)
        profiled.append((model, rows, scoring, scores))
        confidences = confidence_from_probability(scores)
        contributions = model.contributions(scoring) if keep_contributions else None
        for k, row in enumerate(rows.tolist()):
            student = students[row]
            assessments.append(
                Assessment(
                    run_id=run_id,
                    student_id=student.student_id,
                    skill=model.skill,
                    score=float(scores[k]),
                    confidence=float(confidences[k]),
                    model_version=model.version,
                    features_hash=student.features_hash,
                    assessed_at=assessed_at,
                    contributions=model.top_contributions(scoring[k], contributions[k]) if contributions is not None else None,
                )
            )
    scoring_seconds = time.perf_counter() - started

    if chunk in services.settings.chaos_fail_chunks and attempt == 0:
        # Fault drill (CHAOS_FAIL_CHUNKS): the first attempt dies after writing half of its chunk.
        services.assessments.write(assessments[: len(assessments) // 2])
        raise StoreUnavailable(f"Injected fault in chunk {chunk} of run {run_id} (CHAOS_FAIL_CHUNKS).")
    for start in range(0, len(assessments), WRITE_BATCH):
        services.assessments.write(assessments[start : start + WRITE_BATCH])
    signature = models_signature(versions)
    # What this chunk scored, for drift checks: one profile part per model, replaced if the chunk is retried.
    if services.settings.serving_profiles:
        services.profiles.put(
            chunk_parts(
                run_id,
                chunk,
                assessed_at[:10],
                [
                    (model, scoring, scores) for model, rows, scoring, scores in profiled
                ],
            )
        )
    # Every stored student is marked, failures included: what failed here failed on the stored features,
    # so the student is picked again when those change (or a model does), not every night.
    services.features.mark_scored([ScoredMarker(s.student_id, s.features_hash, signature) for s in students])
    assessed = {a.student_id for a in assessments}
    scored = len(assessed)
    run = services.runs.record_chunk(
        run_id,
        chunk,
        scored,
        [{"student_id": sid, "reason": next(iter(skills.values())), "skills": skills} for sid, skills in failed.items()],
    )
    seconds = time.perf_counter() - started
    services.metrics.observe_batch_chunk(len(student_ids), seconds)
    log.info(
        "chunk scored",
        extra={
            "run_id": run_id,
            "chunk": chunk,
            "attempt": attempt,
            "students": len(student_ids),
            "scored": scored,
            "failed": len(failed),
            "failures_by_skill": failure_counts(failed.values()),
            "assessments": len(assessments),
            "scoring_ms": round(scoring_seconds * 1000, 1),
            "processing_ms": round(seconds * 1000, 1),
            "students_per_second": round(len(student_ids) / seconds, 1) if seconds > 0 else math.inf,
            "run_status": run.status,
        },
    )
    return {"scored": scored, "failed": len(failed)}
