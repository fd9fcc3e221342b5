"""Task endpoint authentication end to end: tokens signed by a test key, verified by the real google-auth code
against certificates a local HTTP server publishes the way Google's v1 certs endpoint does."""

from __future__ import annotations

import base64
import datetime
import functools
import http.server
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import flask
import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from shared.api import error_response, json_response
from shared.errors import ConfigError, Forbidden, ServiceError, StoreUnavailable, Unauthenticated
from shared.local_stack import free_port
from shared.settings import PROJECT_ROOT
from shared.task_auth import TaskAuthenticator
from tests.openapi_contract import json_schema_document

AUDIENCE = "https://skills-nightly-abc123-ew.a.run.app/tasks/nightly"
CALLER = "skills-invoker@demo-project.iam.gserviceaccount.com"
STRANGER = "someone-else@demo-project.iam.gserviceaccount.com"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_pem: bytes
    certificate_pem: str

    @functools.cached_property
    def signer(self) -> crypt.RSASigner:
        # Loading a private key costs about 0.1 s (cryptography checks it); signing, a few ms.
        return crypt.RSASigner.from_string(self.private_pem, key_id=self.kid)

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(self.signer, claims).decode()


def _signing_key(kid: str) -> SigningKey:
    """An RSA key and a self-signed certificate of it, as Google publishes its token keys."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{kid}.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SigningKey(kid, private_pem, certificate.public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture(scope="session")
def google_key() -> SigningKey:
    """The key the certs server publishes: it stands for Google's."""
    return _signing_key("test-google-key")


@pytest.fixture(scope="session")
def forger_key() -> SigningKey:
    """A key nobody publishes, under the same key id as the published one."""
    return _signing_key("test-google-key")


class CertsServer:
    """Google's v1 certs endpoint on 127.0.0.1: `{kid: PEM}` with a Cache-Control max-age; counts its requests."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.body = json.dumps({key.kid: key.certificate_pem for key in keys}).encode()
        self.status = 200
        self.cache_control = "public, max-age=19000, must-revalidate, no-transform"
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                server.requests += 1
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Cache-Control", server.cache_control)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/oauth2/v1/certs"
        # A short poll interval: shutdown() waits for the loop to notice, 0.5 s by default.
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> CertsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


@pytest.fixture
def certs_server(google_key: SigningKey) -> Iterator[CertsServer]:
    with CertsServer([google_key]) as server:
        yield server


@pytest.fixture
def authenticator(certs_server: CertsServer) -> TaskAuthenticator:
    # Upper case in the setting on purpose: Google compares email addresses case-insensitively.
    return TaskAuthenticator("oidc", AUDIENCE, frozenset({CALLER.upper()}), certs_server.url)


def claims(**changes: Any) -> dict[str, Any]:
    """The claims of an ID token Cloud Scheduler or Cloud Tasks sends, with some changed (None drops one)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "azp": "104935573845722220950",
        "sub": "104935573845722220950",
        "email": CALLER,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def bearer(key: SigningKey, **changes: Any) -> str:
    return f"Bearer {key.sign(claims(**changes))}"


def rejected(authenticator: TaskAuthenticator, authorization: str | None) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        authenticator.verify(authorization)
    return raised.value


# -- the right caller ------------------------------------------------------------------------


def test_the_allowed_account_is_returned(authenticator: TaskAuthenticator, google_key: SigningKey) -> None:
    assert authenticator.verify(bearer(google_key)) == CALLER


def test_both_spellings_of_googles_issuer_and_any_case_of_the_scheme_pass(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    assert authenticator.verify(bearer(google_key, iss="accounts.google.com")) == CALLER
    assert authenticator.verify("bearer  " + google_key.sign(claims())) == CALLER


def test_a_token_just_past_its_expiry_passes_within_the_clock_skew(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    now = int(time.time())
    assert authenticator.verify(bearer(google_key, iat=now - 3600, exp=now - 3)) == CALLER


def test_auth_off_needs_no_header_and_never_imports_google_auth() -> None:
    assert TaskAuthenticator("off").verify(None) is None
    # In a fresh interpreter: this one imported google.auth to sign the test tokens.
    script = (
        "import sys\n"
        "from shared.task_auth import TaskAuthenticator\n"
        "assert TaskAuthenticator('off').verify(None) is None\n"
        "assert TaskAuthenticator('off').verify('Basic whatever') is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('google.auth', 'google.oauth2')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, check=True, timeout=60)


# -- 401: no token, or one that fails verification -------------------------------------------


def test_no_header_is_unauthenticated(authenticator: TaskAuthenticator) -> None:
    for header in (None, "", "   "):
        error = rejected(authenticator, header)
        assert isinstance(error, Unauthenticated) and error.status == 401 and error.code == "unauthenticated"
        assert error.headers() == {"WWW-Authenticate": "Bearer"}


def test_a_header_that_is_not_a_bearer_token_is_unauthenticated(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    token = google_key.sign(claims())
    for header in (f"Basic {token}", token, "Bearer", "Bearer   "):
        assert isinstance(rejected(authenticator, header), Unauthenticated), header
    for header in ("Bearer not-a-jwt", "Bearer a.b", "Bearer ya29.a0AfH6SMB-access-token-not-an-id-token"):
        error = rejected(authenticator, header)
        assert isinstance(error, Unauthenticated), header
        assert error.headers() == {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def test_a_token_signed_by_another_key_is_unauthenticated(
    authenticator: TaskAuthenticator, google_key: SigningKey, forger_key: SigningKey
) -> None:
    assert isinstance(rejected(authenticator, bearer(forger_key)), Unauthenticated)
    # The right key's signature over other claims: a token edited after signing.
    header, _, signature = google_key.sign(claims()).split(".")
    _, payload, _ = google_key.sign(claims(email="Admin@demo-project.iam.gserviceaccount.com")).split(".")
    assert isinstance(rejected(authenticator, f"Bearer {header}.{payload}.{signature}"), Unauthenticated)
    # A key id the certificates do not list.
    other_kid = SigningKey("unknown-kid", forger_key.private_pem, forger_key.certificate_pem)
    assert isinstance(rejected(authenticator, bearer(other_kid)), Unauthenticated)


def test_an_unsigned_token_is_unauthenticated(authenticator: TaskAuthenticator, google_key: SigningKey) -> None:
    header, payload, _ = google_key.sign(claims()).split(".")
    # What Google's front end forwards after stripping a signature: anyone can write it, so it never passes.
    assert isinstance(rejected(authenticator, f"Bearer {header}.{payload}.SIGNATURE_REMOVED_BY_GOOGLE"), Unauthenticated)
    none_header = base64.urlsafe_b64encode(b'{"alg": "none", "typ": "JWT"}').rstrip(b"=").decode()
    assert isinstance(rejected(authenticator, f"Bearer {none_header}.{payload}."), Unauthenticated)
    assert isinstance(rejected(authenticator, f"Bearer {none_header}.{payload}.x"), Unauthenticated)


def test_an_expired_token_is_unauthenticated(authenticator: TaskAuthenticator, google_key: SigningKey) -> None:
    now = int(time.time())
    assert isinstance(rejected(authenticator, bearer(google_key, iat=now - 3700, exp=now - 60)), Unauthenticated)
    # Without an expiry at all.
    assert isinstance(rejected(authenticator, bearer(google_key, exp=None)), Unauthenticated)


def test_a_token_issued_in_the_future_is_unauthenticated(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    now = int(time.time())
    assert isinstance(rejected(authenticator, bearer(google_key, iat=now + 600, exp=now + 4200)), Unauthenticated)


def test_a_token_for_another_audience_is_unauthenticated(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    for audience in ("https://skills-infer-abc123-ew.a.run.app", AUDIENCE + "/", None):
        assert isinstance(rejected(authenticator, bearer(google_key, aud=audience)), Unauthenticated), audience


def test_a_token_from_another_issuer_is_unauthenticated(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    for issuer in ("https://securetoken.google.com/demo-project", "https://accounts.google.com.evil.test", None):
        assert isinstance(rejected(authenticator, bearer(google_key, iss=issuer)), Unauthenticated), issuer


# -- 403: a valid token of an account not allowed --------------------------------------------


def test_another_account_is_forbidden(authenticator: TaskAuthenticator, google_key: SigningKey) -> None:
    error = rejected(authenticator, bearer(google_key, email=STRANGER))
    assert isinstance(error, Forbidden) and error.status == 403 and error.code == "forbidden"
    assert STRANGER in error.message and CALLER not in error.message.lower()
    assert error.headers() == {}


def test_an_account_without_a_verified_email_is_forbidden(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    for changes in ({"email_verified": False}, {"email_verified": None}, {"email_verified": "true"}, {"email": None}):
        assert isinstance(rejected(authenticator, bearer(google_key, **changes)), Forbidden), changes


# -- certificates ------------------------------------------------------------------------------


def test_certificates_are_fetched_once_for_many_verifications(
    authenticator: TaskAuthenticator, certs_server: CertsServer, google_key: SigningKey, forger_key: SigningKey
) -> None:
    for _ in range(20):
        assert authenticator.verify(bearer(google_key)) == CALLER
        rejected(authenticator, bearer(forger_key))
    assert certs_server.requests == 1


def test_certificates_are_fetched_again_once_their_max_age_passes(
    authenticator: TaskAuthenticator, certs_server: CertsServer, google_key: SigningKey
) -> None:
    certs_server.cache_control = "public, max-age=0"
    for _ in range(3):
        assert authenticator.verify(bearer(google_key)) == CALLER
    assert certs_server.requests == 3


def test_certificates_that_cannot_be_fetched_are_store_unavailable_and_not_kept(
    authenticator: TaskAuthenticator, certs_server: CertsServer, google_key: SigningKey
) -> None:
    good_body = certs_server.body
    for status, body in ((500, good_body), (200, b"<html>not json</html>"), (200, b"{}"), (200, b'{"keys": []}')):
        certs_server.status, certs_server.body = status, body
        error = rejected(authenticator, bearer(google_key))
        assert isinstance(error, StoreUnavailable) and error.status == 503, (status, body)
    # The next request after the endpoint recovers fetches again and passes.
    certs_server.status, certs_server.body = 200, good_body
    assert authenticator.verify(bearer(google_key)) == CALLER


def test_an_unreachable_certificates_server_is_store_unavailable(google_key: SigningKey) -> None:
    nobody = TaskAuthenticator("oidc", AUDIENCE, frozenset({CALLER}), f"http://127.0.0.1:{free_port()}/certs")
    assert isinstance(rejected(nobody, bearer(google_key)), StoreUnavailable)


def test_a_bad_token_is_refused_before_any_certificate_fetch(
    authenticator: TaskAuthenticator, certs_server: CertsServer
) -> None:
    for header in (None, "Basic dXNlcjpwYXNz", "Bearer not-a-jwt"):
        rejected(authenticator, header)
    assert certs_server.requests == 0


# -- configuration -----------------------------------------------------------------------------


def test_oidc_needs_an_audience_and_allowed_accounts_and_modes_are_known() -> None:
    with pytest.raises(ConfigError, match="audience"):
        TaskAuthenticator("oidc", "", frozenset({CALLER}))
    with pytest.raises(ConfigError, match="service account"):
        TaskAuthenticator("oidc", AUDIENCE, frozenset())
    with pytest.raises(ConfigError, match="off, oidc"):
        TaskAuthenticator("iap")


# -- through HTTP ------------------------------------------------------------------------------


def test_a_flask_app_answers_401_and_403_in_the_error_envelope(
    authenticator: TaskAuthenticator, google_key: SigningKey
) -> None:
    app = flask.Flask(__name__)

    @app.post("/tasks/nightly")
    def nightly() -> flask.Response:
        try:
            caller = authenticator.verify(flask.request.headers.get("Authorization"))
        except ServiceError as exc:
            return error_response(exc)
        return json_response({"caller": caller}, 202)

    client = app.test_client()
    error_envelope = jsonschema.Draft4Validator({**json_schema_document(), "$ref": "#/components/schemas/Error"})

    answer = client.post("/tasks/nightly", headers={"Authorization": bearer(google_key)})
    assert answer.status_code == 202 and answer.get_json() == {"caller": CALLER}

    for headers, status, code in (
        ({}, 401, "unauthenticated"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unauthenticated"),
        ({"Authorization": bearer(google_key, aud="https://elsewhere.test")}, 401, "unauthenticated"),
        ({"Authorization": bearer(google_key, email=STRANGER)}, 403, "forbidden"),
    ):
        answer = client.post("/tasks/nightly", headers=headers)
        assert answer.status_code == status, headers
        assert answer.mimetype == "application/json"
        body = answer.get_json()
        error_envelope.validate(body)
        assert body["error"]["code"] == code and body["error"]["message"]


# -- the real function targets (after TASKS_AUTH reaches the settings and the endpoint decorator) --------


@pytest.fixture
def env(env: dict[str, str], certs_server: CertsServer) -> dict[str, str]:
    """The conftest's embedded stack, with task authentication on against the local certs server."""
    return {
        **env,
        "TASKS_AUTH": "oidc",
        "TASKS_AUTH_AUDIENCE": AUDIENCE,
        "TASKS_AUTH_ALLOWED_EMAILS": f"{CALLER}, backup-invoker@demo-project.iam.gserviceaccount.com",
        "TASKS_AUTH_CERTS_URL": certs_server.url,
    }


def test_the_task_targets_accept_only_their_callers(client: Any, google_key: SigningKey) -> None:
    from tests.openapi_contract import assert_matches_spec

    for path in ("/tasks/nightly", "/tasks/batch-worker"):
        for headers, status, code in (
            ({}, 401, "unauthenticated"),
            ({"Authorization": bearer(google_key, aud="https://elsewhere.test")}, 401, "unauthenticated"),
            ({"Authorization": bearer(google_key, email=STRANGER)}, 403, "forbidden"),
        ):
            answer = client.post(path, json={}, headers=headers)
            assert answer.status_code == status, (path, headers, answer.get_data(as_text=True))
            assert answer.get_json()["error"]["code"] == code
            assert_matches_spec("POST", path, status, answer.get_json())
            if status == 401:
                assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        # Authentication comes before the method check: a stranger learns nothing about the endpoint.
        assert client.get(path).status_code == 401
    answer = client.post("/tasks/nightly", json={"run_id": "auth-1"}, headers={"Authorization": bearer(google_key)})
    assert answer.status_code == 202, answer.get_data(as_text=True)
    # The public API stays open.
    assert client.get("/api/v1/skills").status_code == 200
