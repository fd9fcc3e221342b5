"""Function targets: each parses its request, calls the core in shared/, and renders the answer.

Deploy: one source bundle, one entry point per function (e.g. `--entry-point=infer`).
Locally: `functions-framework --target=infer --source=functions/main.py`, or all of them at
their paths through functions/local_server.py.
"""

from __future__ import annotations

from typing import Any

import flask

from shared import batch, canary, drift
from shared.api import endpoint, log_fields, read_json
from shared.engine import parse_inference_request
from shared.registry import listing
from shared.request_fields import SKILL_NAME, TASK_ATTEMPT, header_integer, parameter
from shared.services import get_services


@endpoint("POST")
def infer(request: flask.Request) -> Any:
    """POST /api/v1/skills/infer: one student scored on one skill."""
    services = get_services()
    body = read_json(request, services.settings.max_request_bytes)
    inference = parse_inference_request(body, services.catalog)
    log_fields(skill=inference.skill)
    result = services.engine.infer(inference)
    log_fields(model_version=result["model_version"])
    services.metrics.record_score(result["skill"], result["model_version"], result["score"])
    return result


@endpoint("GET")
def list_skills(request: flask.Request) -> Any:
    """GET /api/v1/skills: the skill catalog, so callers can build valid requests."""
    return get_services().catalog.to_dict()


@endpoint("GET")
def list_models(request: flask.Request) -> Any:
    """GET /api/v1/skills/models[?skill=NAME]: every registered version, from the registry alone."""
    services = get_services()
    skill = request.args.get("skill")
    if skill is None:
        skills = services.catalog.names
    else:
        skills = [services.catalog.skill(parameter("skill", skill, SKILL_NAME)).skill]
    return {"skills": listing(services.registry, skills)}


@endpoint("GET")
def healthz(request: flask.Request) -> Any:
    """GET /healthz: 200 with the serving version per skill, 503 if any skill has no loadable model.

    Problems that leave every skill served answer 200 `degraded`, so that a probe never takes away an
    instance that serves: a newer production version that failed to load (`refresh_problems`, the
    older version serving meanwhile) and a canary that cannot be loaded (`canary_problems`, production
    serving its share)."""
    engine = get_services().engine
    versions, problems = engine.status()
    unserved = {skill: why for skill, why in problems.items() if skill not in versions}
    stale = {skill: why for skill, why in problems.items() if skill in versions}
    canary_problems = engine.canary_problems()
    extra = {
        **({"refresh_problems": stale} if stale else {}),
        **({"canary_problems": canary_problems} if canary_problems else {}),
    }
    if unserved:
        return {"status": "unavailable", "models": versions, "problems": unserved, **extra}, 503
    return {"status": "degraded" if extra else "ok", "models": versions, **extra}


@endpoint("POST")
def infer_batch(request: flask.Request) -> Any:
    """POST /api/v1/skills/infer/batch: many requests, one vectorized call per skill; bad items fail alone."""
    services = get_services()
    body = read_json(request, services.settings.max_batch_request_bytes)
    result = batch.infer_batch(services, body)
    log_fields(items=len(result["results"]), succeeded=result["succeeded"], failed=result["failed"])
    services.metrics.record_results(result["results"])
    return result


@endpoint("POST", task=True)
def nightly(request: flask.Request) -> Any:
    """POST /tasks/nightly (Cloud Scheduler): picks students with new data and enqueues one task per chunk."""
    services = get_services()
    body = read_json(request, services.settings.max_request_bytes, allow_empty=True)
    full, run_id = batch.parse_nightly_request(body)
    result = batch.dispatch_nightly(services, full=full, run_id=run_id)
    log_fields(run_id=result["run_id"], students=result["students"], tasks=result["tasks"])
    return result, 202


@endpoint("POST", task=True)
def batch_worker(request: flask.Request) -> Any:
    """POST /tasks/batch-worker (Cloud Tasks): scores one chunk; answers only after its writes are committed."""
    services = get_services()
    body = read_json(request, services.settings.max_batch_request_bytes)
    run_id, chunk, student_ids = batch.parse_chunk_request(body)
    # Set by Cloud Tasks, informational: a malformed value counts as a first attempt rather than failing the task.
    attempt = header_integer(request.headers.get("X-CloudTasks-TaskRetryCount"), TASK_ATTEMPT, 0)
    log_fields(run_id=run_id, chunk=chunk, task=request.headers.get("X-CloudTasks-TaskName"), attempt=attempt)
    return batch.score_chunk(services, run_id, chunk, student_ids, attempt)


@endpoint("GET")
def batch_run_status(request: flask.Request) -> Any:
    """GET /api/v1/batch/runs/{run_id}: a run's progress (the run id is the path's last segment)."""
    run_id = request.path.rstrip("/").rsplit("/", 1)[-1]
    return batch.run_status(get_services(), run_id)


@endpoint("POST", task=True)
def drift_check(request: flask.Request) -> Any:
    """POST /tasks/drift-check (Cloud Scheduler): checks every serving version for drift; stores the check and its report."""
    services = get_services()
    body = read_json(request, services.settings.max_request_bytes, allow_empty=True)
    window_days, skills = drift.parse_drift_request(body, services.catalog.names, services.settings.drift_window_days)
    check = drift.run_drift_check(services, window_days, skills)
    log_fields(check_id=check["check_id"], alerts=sum(len(s["alerts"]) for s in check["skills"]))
    return check


@endpoint("GET")
def drift_checks(request: flask.Request) -> Any:
    """GET /api/v1/drift/checks/{check_id}: a stored drift check; `latest` for the most recent."""
    check_id = request.path.rstrip("/").rsplit("/", 1)[-1]
    return drift.get_check(get_services(), check_id)


@endpoint("POST", task=True)
def canary_check(request: flask.Request) -> Any:
    """POST /tasks/canary-check (Cloud Scheduler): compares each running canary with production; aborts one that trips a guardrail."""
    services = get_services()
    body = read_json(request, services.settings.max_request_bytes, allow_empty=True)
    minutes, days, skills = canary.parse_canary_check_request(body, services.catalog.names)
    check = canary.run_canary_check(services, window_minutes=minutes, window_days=days, skills=skills)
    log_fields(decisions={s["skill"]: s["decision"] for s in check["skills"]})
    return check
