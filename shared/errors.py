"""The service's one error hierarchy: every error a caller can see has a stable code and an HTTP status."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a caller.

    Subclasses fix `code` (stable, snake_case) and `status` (the HTTP status);
    `details` carries machine-readable context such as the offending fields.
    """

    code = "internal"
    status = 500

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """Returns the error as the body of an HTTP answer."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}

    def headers(self) -> dict[str, str]:
        """Returns the HTTP headers the answer must carry besides its body (none by default)."""
        return {}


class InvalidJson(ServiceError):
    code = "invalid_json"
    status = 400


class ValidationError(ServiceError):
    """The input is well-formed JSON but breaks the contract; details list `{"field", "problem"}`."""

    code = "validation_error"
    status = 400

    def __init__(self, problems: list[dict[str, str]], message: str | None = None) -> None:
        if message is None:
            fields = ", ".join(p["field"] for p in problems[:5])
            message = f"The request has {len(problems)} invalid field(s): {fields}."
        super().__init__(message, problems)
        self.problems = problems


class UnknownSkill(ServiceError):
    code = "unknown_skill"
    status = 400

    def __init__(self, skill: str, valid_skills: list[str]) -> None:
        super().__init__(f"Unknown skill {skill!r}.", {"valid_skills": valid_skills})


class Unauthenticated(ServiceError):
    """The request carries no credentials, or ones that fail verification (signature, expiry, audience, issuer)."""

    code = "unauthenticated"
    status = 401

    def __init__(self, message: str, token_presented: bool = False) -> None:
        super().__init__(message)
        self.token_presented = token_presented

    def headers(self) -> dict[str, str]:
        # RFC 6750 section 3: a 401 names the scheme it wants; `invalid_token` only when a token was sent.
        return {"WWW-Authenticate": 'Bearer error="invalid_token"' if self.token_presented else "Bearer"}


class Forbidden(ServiceError):
    """The caller is authenticated but is not one of the accounts allowed here."""

    code = "forbidden"
    status = 403


class NotFound(ServiceError):
    code = "not_found"
    status = 404


class Conflict(ServiceError):
    code = "conflict"
    status = 409


class MethodNotAllowed(ServiceError):
    code = "method_not_allowed"
    status = 405

    def __init__(self, method: str, allowed: list[str]) -> None:
        super().__init__(
            f"Method {method} is not allowed here; use {', '.join(allowed)}.", {"allowed": allowed}
        )
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"
    status = 413


class TaskTooLarge(ServiceError):
    """A task the service built exceeds the queue's size limit: a setting (BATCH_CHUNK_SIZE) is too
    large for the ids stored, not the caller's mistake."""

    code = "task_too_large"
    status = 500


class ModelUnavailable(ServiceError):
    code = "model_unavailable"
    status = 503


class StoreUnavailable(ServiceError):
    """A store or queue could not be reached; the operation may succeed if retried.

    The answer says when to retry (Retry-After): Cloud Tasks takes it into account when it backs off a
    task answered 503, and a caller of the API can follow it. Cloud Scheduler keeps its own backoff.
    """

    code = "store_unavailable"
    status = 503
    retry_after_seconds = 10

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class ArtifactIntegrityError(ServiceError):
    """An artifact does not match its recorded sha256 or its format contract."""

    code = "artifact_integrity"
    status = 500


class ConfigError(Exception):
    """A setting is missing or malformed; raised at start-up, never to a caller."""
