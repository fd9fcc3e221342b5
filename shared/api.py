"""HTTP plumbing the functions share: reading JSON bodies, rendering answers and errors, one log line and the metrics per request."""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, Callable

import flask

from shared.errors import InvalidJson, MethodNotAllowed, PayloadTooLarge, ServiceError
from shared.services import get_services

log = logging.getLogger("skills.http")

Handler = Callable[[flask.Request], "tuple[Any, int] | Any"]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    return flask.Response(json.dumps(body), status=status, headers=headers, mimetype="application/json")


def error_response(error: ServiceError) -> flask.Response:
    return json_response(error.to_dict(), error.status, error.headers() or None)


def read_json(request: flask.Request, max_bytes: int, allow_empty: bool = False) -> Any:
    """Returns the parsed JSON body (None for an empty body if allow_empty); raises PayloadTooLarge past
    max_bytes, InvalidJson if it does not parse."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"The request body has {request.content_length} bytes; the limit is {max_bytes}.", {"limit_bytes": max_bytes}
        )
    # Read what was announced (plus one byte to notice a body longer than announced), not the limit:
    # the server allocates a buffer of the size asked for.
    announced = request.content_length
    data = request.stream.read((announced if announced is not None else max_bytes) + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The request body exceeds the limit of {max_bytes} bytes.", {"limit_bytes": max_bytes})
    if not data.strip():
        if allow_empty:
            return None
        raise InvalidJson("The request body is empty; send a JSON object.")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise InvalidJson("The request body nests JSON too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        # e.g. bytes that are not UTF-8, or an integer literal longer than Python parses
        raise InvalidJson("The request body is not valid UTF-8 JSON.") from None


def log_fields(**fields: Any) -> None:
    """Adds fields (skill, model version, ...) to this request's log line."""
    flask.g.setdefault("log_fields", {}).update(fields)


def endpoint(*methods: str, task: bool = False) -> Callable[[Handler], Callable[[flask.Request], flask.Response]]:
    """Makes a handler a function target: checks the method, renders its result or error as JSON, logs one
    line and records the request's metrics (latency per skill and model version, status, error code).

    A `task` target (called by Cloud Scheduler or Cloud Tasks) first checks its caller's ID token
    (setting TASKS_AUTH): 401 `unauthenticated`, 403 `forbidden`. The handler returns a body (status 200)
    or (body, status). A ServiceError becomes its JSON error; any other exception is logged with its
    traceback and answered with a generic 500.
    """
    allowed = list(methods)
    # HEAD is GET without the body (the server drops the body): load balancers and uptime checks send it.
    accepted = set(allowed) | ({"HEAD"} if "GET" in allowed else set())

    def decorate(handler: Handler) -> Callable[[flask.Request], flask.Response]:
        @functools.wraps(handler)
        def target(request: flask.Request) -> flask.Response:
            started = time.perf_counter()
            try:
                if task:
                    # Per target, not per path: a deployed function answers every path it receives.
                    # Before the method check, so that a stranger learns nothing about the endpoint.
                    caller = get_services().task_auth.verify(request.headers.get("Authorization"))
                    if caller is not None:
                        log_fields(caller=caller)
                if request.method not in accepted:
                    raise MethodNotAllowed(request.method, allowed)
                result = handler(request)
                body, status = result if isinstance(result, tuple) else (result, 200)
                response = json_response(body, status)
            except ServiceError as exc:
                response = error_response(exc)
                log_fields(error_code=exc.code)
            except Exception:
                log.exception("unhandled error", extra={"path": request.path})
                response = json_response(
                    {"error": {"code": "internal", "message": "The service failed to answer; the failure is logged."}},
                    500,
                )
                log_fields(error_code="internal")
            latency = time.perf_counter() - started
            status = response.status_code
            request_fields = flask.g.get("log_fields", {})
            _record_metrics(handler.__name__, status, latency, request_fields)
            if log.isEnabledFor(logging.INFO):
                fields = {
                    "httpRequest": {
                        "requestMethod": request.method,
                        "requestUrl": request.path,
                        "status": status,
                        "latency": f"{latency:.6f}s",
                    },
                    "function": handler.__name__,
                    "status": status,
                    "latency_ms": round(latency * 1000, 3),
                    **request_fields,
                }
                log.info(f"{request.method} {request.path} {status}", extra={"fields": fields})
            return response

        return target

    return decorate


_metrics_failed = False


def _record_metrics(function: str, status: int, latency: float, fields: dict[str, Any]) -> None:
    """Records a request's metrics (in memory: the writes happen in the background); never fails the request."""
    global _metrics_failed
    try:
        get_services().metrics.record_request(
            function, status, latency, fields.get("skill"), fields.get("model_version"), fields.get("error_code")
        )
    except Exception:
        # A broken metrics setup must not fail requests, nor flood the log with one traceback each.
        if not _metrics_failed:
            _metrics_failed = True
            log.exception("recording request metrics failed; later failures are not logged")
