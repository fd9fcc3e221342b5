"""Who may call the task endpoints: verification of the Google-signed OIDC ID token Cloud Scheduler and Cloud Tasks send."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, cast

from shared.errors import ConfigError, Forbidden, StoreUnavailable, Unauthenticated

if TYPE_CHECKING:
    from google.auth import transport

log = logging.getLogger(__name__)

MODES = ("off", "oidc")
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
# Google signs ID tokens with either spelling of its issuer.
GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
# Tolerated drift between Google's clock and ours, for both `iat` and `exp`.
CLOCK_SKEW_SECONDS = 10
# How long certificates are kept when their answer names no max-age; Google's answer names one (hours).
DEFAULT_CERTS_MAX_AGE_SECONDS = 300.0
# google-auth's own default is 120 s: far past the deadline of the request that waits for it.
CERTS_FETCH_TIMEOUT_SECONDS = 5.0

# Three base64url segments. Checked before google-auth parses the token, because its parse errors quote
# the raw input, which must not reach the logs if it is some other credential sent by mistake.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# What Google's front end puts in place of a signature it strips before forwarding a token.
_SIGNATURE_REMOVED = ".SIGNATURE_REMOVED_BY_GOOGLE"
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*(\d+)", re.IGNORECASE)

_INVALID_TOKEN = "The bearer token is not a valid Google-signed ID token for this endpoint."


class TaskAuthenticator:
    """Checks the `Authorization: Bearer <ID token>` of a task request against the configured callers.

    In mode `oidc` a token passes when Google's key signed it (certificates from `certs_url`, kept in
    memory for their max-age), it has not expired (10 s of clock skew allowed), its audience is
    `audience`, its issuer is Google, and its verified `email` is one of `allowed_emails`. In mode `off`
    every request passes and google-auth is never imported. Safe to share between threads.
    """

    def __init__(
        self,
        mode: str,
        audience: str = "",
        allowed_emails: frozenset[str] = frozenset(),
        certs_url: str = GOOGLE_CERTS_URL,
    ) -> None:
        """Raises ConfigError for an unknown mode, or mode `oidc` without an audience or an allowed account."""
        if mode not in MODES:
            raise ConfigError(f"Task authentication mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if mode == "oidc" and not audience:
            raise ConfigError("Task authentication (oidc) needs the audience the callers' tokens carry.")
        if mode == "oidc" and not allowed_emails:
            raise ConfigError("Task authentication (oidc) needs at least one allowed service account email.")
        self.mode = mode
        self.audience = audience
        # Google treats email addresses case-insensitively; its tokens carry them in lower case.
        self.allowed_emails = frozenset(email.strip().lower() for email in allowed_emails)
        self.certs_url = certs_url
        self._certs = _CertificateCache(certs_url)

    def verify(self, authorization: str | None) -> str | None:
        """Returns the caller's email, or None when authentication is off.

        Raises Unauthenticated (401) for a missing, non-Bearer, malformed, badly signed, expired,
        wrong-audience or wrong-issuer token; Forbidden (403) for a valid token of an account not
        allowed; StoreUnavailable (503) when Google's certificates cannot be fetched (our failure,
        not the caller's: the queue retries).
        """
        if self.mode == "off":
            return None
        token = _bearer_token(authorization)
        # Imported here so that a process with authentication off never pays for google-auth.
        from google.oauth2 import id_token

        try:
            claims = id_token.verify_token(
                token,
                # The cache has the transport's call signature without subclassing it, which would
                # import google-auth with this module.
                cast("transport.Request", self._certs),
                audience=self.audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
            )
        except ValueError as exc:
            # google-auth's errors (bad signature, expired, wrong audience, unknown key id, malformed
            # segment) are all ValueErrors. The caller gets one message; the reason goes to the log,
            # where an operator can tell a misconfigured audience from an attack.
            _reject(str(exc))
        issuer = claims.get("iss")
        if issuer not in GOOGLE_ISSUERS:
            _reject(f"Token issuer {issuer!r} is not Google's.")
        email = claims.get("email")
        # An unverified email proves nothing about who holds the account.
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            log.warning("task caller has no verified email", extra={"subject": claims.get("sub")})
            raise Forbidden("The token names no verified account; task endpoints accept only their configured callers.")
        if email.lower() not in self.allowed_emails:
            log.warning("task caller not allowed", extra={"email": email})
            raise Forbidden(f"The account {email} may not call this endpoint.")
        return email


def _bearer_token(authorization: str | None) -> str:
    """Returns the token of a `Bearer <token>` header; raises Unauthenticated for anything else."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated("The request has no Authorization header; send a Google-signed ID token as Bearer.")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    # The scheme name is case-insensitive (RFC 7235 section 2.1).
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("The Authorization header is not a Bearer token.")
    if token.endswith(_SIGNATURE_REMOVED):
        # Never accepted: anyone can write this suffix. Seen when a Google front end verified the token
        # itself and stripped its signature; then this check must be off or the token sent another way.
        _reject("Google removed the token's signature before forwarding it; it cannot be verified here.")
    if not _JWT_SHAPE.fullmatch(token):
        _reject("The bearer token is not a JWT (three base64url segments).")
    return token


def _reject(reason: str) -> NoReturn:
    """Logs why a token was refused and raises the one Unauthenticated every bad token gets."""
    log.warning("task token rejected", extra={"reason": reason})
    raise Unauthenticated(_INVALID_TOKEN, token_presented=True)


@dataclass(frozen=True)
class _CertsResponse:
    """The part of a google-auth transport response that `id_token.verify_token` reads."""

    data: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


class _CertificateCache:
    """A google-auth transport (`google.auth.transport.Request`) for one certificates URL that answers from
    memory while its last good answer is fresh (the answer's Cache-Control max-age, else 5 minutes), so
    verifying a token costs no network call. A failed fetch raises StoreUnavailable and is not kept.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        # One lock, held during a fetch: concurrent requests at expiry wait for one fetch instead of each making one.
        self._lock = threading.Lock()
        self._data: bytes | None = None
        self._expires_at = 0.0
        self._transport: Any = None

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _CertsResponse:
        if url != self.url or method != "GET":
            # google-auth only ever GETs the certificates URL it was given; anything else is a bug here.
            raise RuntimeError(f"The certificate cache of {self.url} was asked for {method} {url}.")
        with self._lock:
            now = time.monotonic()
            if self._data is None or now >= self._expires_at:
                self._data, max_age = self._fetch()
                self._expires_at = now + max_age
            return _CertsResponse(self._data)

    def _fetch(self) -> tuple[bytes, float]:
        """Returns the certificates document and how long it may be kept; raises StoreUnavailable."""
        from google.auth import exceptions as auth_exceptions
        from google.auth.transport.requests import Request

        if self._transport is None:
            # Its requests.Session keeps the connection to the certificates host between refreshes.
            self._transport = Request()
        try:
            response = self._transport(self.url, method="GET", timeout=CERTS_FETCH_TIMEOUT_SECONDS)
        except auth_exceptions.TransportError as exc:
            raise _unavailable(f"fetching {self.url} failed: {exc}") from None
        if response.status != 200:
            raise _unavailable(f"{self.url} answered HTTP {response.status}")
        data = bytes(response.data)
        try:
            certs = json.loads(data)
        except ValueError:
            raise _unavailable(f"{self.url} answered something that is not JSON") from None
        # verify_token would take a JWK set too, through PyJWT, which is not installed: accept only the
        # v1 format, a map of key id to PEM certificate.
        if not certs or not isinstance(certs, dict) or not all(isinstance(v, str) for v in certs.values()):
            raise _unavailable(f"{self.url} answered no {{key id: PEM certificate}} map")
        match = _MAX_AGE.search(response.headers.get("Cache-Control", "") or "")
        return data, float(match.group(1)) if match else DEFAULT_CERTS_MAX_AGE_SECONDS


def _unavailable(reason: str) -> StoreUnavailable:
    log.warning("token certificates unavailable", extra={"reason": reason})
    return StoreUnavailable("The certificates that verify the caller's token could not be fetched; retry later.")
