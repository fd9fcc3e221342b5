"""The local stack's one server: every function at its public path, on the embedded backends by default."""

from __future__ import annotations

from typing import Callable

import flask

from functions import main
from shared.api import json_response
from shared.errors import MethodNotAllowed, NotFound

ROUTES: dict[str, Callable[[flask.Request], flask.Response]] = {
    "/healthz": main.healthz,
    "/api/v1/skills": main.list_skills,
    "/api/v1/skills/models": main.list_models,
    "/api/v1/skills/infer": main.infer,
    "/api/v1/skills/infer/batch": main.infer_batch,
    "/api/v1/batch/runs/<run_id>": main.batch_run_status,
    "/tasks/nightly": main.nightly,
    "/tasks/batch-worker": main.batch_worker,
    "/tasks/drift-check": main.drift_check,
    "/tasks/canary-check": main.canary_check,
    "/api/v1/drift/checks/<check_id>": main.drift_checks,
}
# Benchmarks compare every endpoint with this one: the framework's own cost for a JSON answer.
FLOOR_PATH = "/_bench/constant"
_FLOOR_BODY = b'{"status": "ok"}'
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def create_app() -> flask.Flask:
    """Returns the WSGI app that routes each public path to its function target."""
    app = flask.Flask("skill_inference")
    for path, target in ROUTES.items():
        # Every method reaches the target, which answers 405 itself: the same behavior as when deployed alone.
        app.add_url_rule(path, endpoint=target.__name__, view_func=_view(target), methods=_ALL_METHODS)
    app.add_url_rule(FLOOR_PATH, endpoint="floor", view_func=_floor, methods=["GET"])

    @app.errorhandler(404)
    def not_found(_: Exception) -> flask.Response:
        error = NotFound(f"No endpoint at {flask.request.path}.")
        return json_response(error.to_dict(), error.status)

    @app.errorhandler(405)
    def wrong_method(_: Exception) -> flask.Response:
        error = MethodNotAllowed(flask.request.method, ["GET"])
        return json_response(error.to_dict(), error.status, {"Allow": "GET"})

    return app


def _view(target: Callable[[flask.Request], flask.Response]) -> Callable[..., flask.Response]:
    def view(**_: str) -> flask.Response:
        return target(flask.request)

    return view


def _floor() -> flask.Response:
    return flask.Response(_FLOOR_BODY, mimetype="application/json")


app = create_app()
