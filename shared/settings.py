"""The service's configuration: one frozen object read once from the environment."""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, Callable, Mapping, TypeVar

from shared.errors import ConfigError

# The folder that holds shared/: the repository in development, the source bundle when deployed.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")

_CLOUD_TASKS_QUEUE = re.compile(r"cloudtasks://projects/[a-z][a-z0-9-]{4,61}[a-z0-9]/locations/[a-z0-9-]+/queues/[A-Za-z0-9-]{1,100}")
# URL schemes whose first part names a cloud resource: gs://BUCKET/PREFIX, firestore://PROJECT/DATABASE.
_NAMED_SCHEMES = {"gs": "bucket", "firestore": "project"}
_MONITORING_PROJECT = re.compile(r"monitoring://[a-z][a-z0-9-]{4,61}[a-z0-9]")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_KIND_NAMES: dict[Callable[[str], Any], str] = {int: "an integer", float: "a number"}  # for errors that read as sentences


@dataclass(frozen=True)
class Settings:
    """Every setting of the service; the README's settings table documents each variable."""

    host: str
    port: int
    server_workers: int
    artifact_store: str
    database_url: str
    skill_catalog: Path
    model_refresh_seconds: float
    max_request_bytes: int
    max_batch_request_bytes: int
    max_batch_items: int
    onnx_threads: int
    batch_threads: int
    log_level: str
    task_queue: str
    worker_url: str
    batch_chunk_size: int
    task_max_attempts: int
    task_min_backoff_seconds: float
    task_dispatch_deadline_seconds: int
    store_contributions: bool
    chaos_fail_chunks: frozenset[int]
    tasks_service_account: str
    tasks_audience: str
    tasks_auth: str
    tasks_auth_audience: str
    tasks_auth_allowed_emails: frozenset[str]
    tasks_auth_certs_url: str
    cloud_tasks_emulator_host: str
    firestore_emulator_host: str
    storage_emulator_host: str
    artifact_cache_dir: Path
    metrics: str
    metrics_flush_seconds: float
    metrics_location: str
    monitoring_emulator_host: str
    service_name: str
    serving_profiles: bool
    profile_flush_seconds: float
    drift_window_days: int
    drift_psi_warn: float
    drift_psi_alert: float
    drift_min_students: int
    drift_min_rated: int
    drift_min_teacher_r: float
    operator: str
    canary_max_error_ratio: float
    canary_max_p99_ratio: float
    canary_min_p99_increase_ms: float
    canary_max_psi: float
    canary_alpha: float
    canary_min_requests: int
    canary_min_students: int
    canary_min_rated: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads every setting; raises ConfigError naming the variable when a value is malformed."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        cores = os.cpu_count() or 1
        host = reader.text("HOST", "127.0.0.1")
        port = reader.number("PORT", 8080, int, minimum=1, maximum=65535)
        worker_url = reader.url("WORKER_URL", f"http://{host}:{port}/tasks/batch-worker")
        # Off locally, where nothing signs tokens; deployed, the second gate after Cloud Run's IAM.
        tasks_auth = reader.choice("TASKS_AUTH", "off", ("off", "oidc"))
        needed_by = "TASKS_AUTH=oidc" if tasks_auth == "oidc" else ""
        task_queue = reader.task_queue("TASK_QUEUE")
        return cls(
            host=host,
            port=port,
            server_workers=reader.number("SERVER_WORKERS", cores, int, minimum=1),
            artifact_store=reader.location("ARTIFACT_STORE", "var/artifacts", ("file", "gs")),
            database_url=reader.location("DATABASE_URL", "var/skills.sqlite3", ("sqlite", "firestore")),
            skill_catalog=Path(reader.location("SKILL_CATALOG", "models/catalog.json", ())),
            model_refresh_seconds=reader.number("MODEL_REFRESH_SECONDS", 30.0, float, minimum=0.0),
            max_request_bytes=reader.number("MAX_REQUEST_BYTES", 1 << 20, int, minimum=1024),
            max_batch_request_bytes=reader.number("MAX_BATCH_REQUEST_BYTES", 32 << 20, int, minimum=1024),
            max_batch_items=reader.number("MAX_BATCH_ITEMS", 10_000, int, minimum=1),
            onnx_threads=reader.number("ONNX_THREADS", 1, int, minimum=1),
            # One per process: the server runs a worker process per core, and OpenMP threads that
            # compete with the other workers for a core cost more than they give (measured 3x slower).
            batch_threads=reader.number("BATCH_THREADS", 1, int, minimum=1),
            log_level=reader.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            task_queue=task_queue,
            worker_url=worker_url,
            batch_chunk_size=reader.number("BATCH_CHUNK_SIZE", 200, int, minimum=1, maximum=10_000),
            task_max_attempts=reader.number("TASK_MAX_ATTEMPTS", 3, int, minimum=1, maximum=100),
            task_min_backoff_seconds=reader.number("TASK_MIN_BACKOFF_SECONDS", 1.0, float, minimum=0.0),
            # Cloud Tasks takes a dispatch deadline of 15 s to 30 min for an HTTP task. The embedded queue
            # takes one from 1 s, so that tests see a dead process's task delivered again within seconds.
            task_dispatch_deadline_seconds=reader.number(
                "TASK_DISPATCH_DEADLINE_SECONDS", 600, int, minimum=1 if task_queue == "local" else 15, maximum=1800
            ),
            store_contributions=reader.flag("STORE_CONTRIBUTIONS", False),
            chaos_fail_chunks=reader.numbers("CHAOS_FAIL_CHUNKS"),
            tasks_service_account=reader.text("TASKS_SERVICE_ACCOUNT", ""),
            tasks_audience=reader.text("TASKS_AUDIENCE", worker_url),
            tasks_auth=tasks_auth,
            tasks_auth_audience=reader.text("TASKS_AUTH_AUDIENCE", "", needed_by=needed_by),
            tasks_auth_allowed_emails=reader.emails("TASKS_AUTH_ALLOWED_EMAILS", needed_by=needed_by),
            tasks_auth_certs_url=reader.url("TASKS_AUTH_CERTS_URL", "https://www.googleapis.com/oauth2/v1/certs"),
            # The Google clients of Firestore and Cloud Storage read their emulator variables themselves;
            # they are read here too so that the settings say which servers the process talks to.
            cloud_tasks_emulator_host=reader.text("CLOUD_TASKS_EMULATOR_HOST", ""),
            firestore_emulator_host=reader.text("FIRESTORE_EMULATOR_HOST", ""),
            storage_emulator_host=reader.text("STORAGE_EMULATOR_HOST", ""),
            artifact_cache_dir=Path(
                reader.location("ARTIFACT_CACHE_DIR", str(Path(tempfile.gettempdir()) / "skill-artifact-cache"), ())
            ),
            metrics=reader.metrics("METRICS"),
            # Cloud Monitoring takes at most one point per series every 5 seconds.
            metrics_flush_seconds=reader.number("METRICS_FLUSH_SECONDS", 60.0, float, minimum=5.0),
            metrics_location=reader.text("METRICS_LOCATION", "global"),
            monitoring_emulator_host=reader.text("MONITORING_EMULATOR_HOST", ""),
            # Cloud Run sets K_SERVICE to the service (function) name.
            service_name=reader.text("K_SERVICE", "skills-local"),
            # A process writes its serving profile parts at most this often: Firestore sustains about
            # one write per second per document.
            serving_profiles=reader.flag("SERVING_PROFILES", True),
            profile_flush_seconds=reader.number("PROFILE_FLUSH_SECONDS", 60.0, float, minimum=1.0),
            drift_window_days=reader.number("DRIFT_WINDOW_DAYS", 7, int, minimum=1, maximum=90),
            drift_psi_warn=reader.number("DRIFT_PSI_WARN", 0.1, float, minimum=0.0),
            drift_psi_alert=reader.number("DRIFT_PSI_ALERT", 0.2, float, minimum=0.0),
            drift_min_students=reader.number("DRIFT_MIN_STUDENTS", 100, int, minimum=1),
            drift_min_rated=reader.number("DRIFT_MIN_RATED", 30, int, minimum=4),
            drift_min_teacher_r=reader.number("DRIFT_MIN_TEACHER_R", 0.5, float, minimum=-1.0, maximum=1.0),
            # Who skillctl records as the author of a registry change (its --actor default); empty: the OS user.
            operator=reader.text("OPERATOR", ""),
            # Canary guardrails: a check that finds one tripped aborts the canary.
            canary_max_error_ratio=reader.number("CANARY_MAX_ERROR_RATIO", 2.0, float, minimum=1.0),
            canary_max_p99_ratio=reader.number("CANARY_MAX_P99_RATIO", 1.5, float, minimum=1.0),
            canary_min_p99_increase_ms=reader.number("CANARY_MIN_P99_INCREASE_MS", 5.0, float, minimum=0.0),
            canary_max_psi=reader.number("CANARY_MAX_PSI", 0.25, float, minimum=0.0),
            canary_alpha=reader.number("CANARY_ALPHA", 0.05, float, minimum=0.0, maximum=0.5),
            canary_min_requests=reader.number("CANARY_MIN_REQUESTS", 100, int, minimum=1),
            canary_min_students=reader.number("CANARY_MIN_STUDENTS", 100, int, minimum=1),
            canary_min_rated=reader.number("CANARY_MIN_RATED", 30, int, minimum=4),
        )

    def replace(self, **changes: object) -> Settings:
        """Returns a copy with some settings changed (for tests and scripts)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ConfigError(f"Unknown settings: {sorted(unknown)}")
        values.update(changes)
        return Settings(**values)


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str, needed_by: str = "") -> str:
        """Returns the value, or the default when empty; raises ConfigError when empty and needed_by names
        the setting that needs it."""
        value = self._env.get(name, "").strip()
        if not value and needed_by:
            raise ConfigError(f"Config {name!r} is missing, and {needed_by} needs it.")
        return value or default

    def emails(self, name: str, needed_by: str = "") -> frozenset[str]:
        """Returns comma-separated email addresses, lower-cased (Google compares them case-insensitively)."""
        raw = self._env.get(name, "").strip()
        emails = frozenset(part.strip().lower() for part in raw.split(",") if part.strip())
        if not emails and needed_by:
            raise ConfigError(f"Config {name!r} is missing, and {needed_by} needs it.")
        for email in sorted(emails):
            if not _EMAIL.fullmatch(email):
                raise ConfigError(f"Config {name!r} must be comma-separated email addresses; got {email!r}.")
        return emails

    def url(self, name: str, default: str) -> str:
        """Returns an http(s) URL."""
        value = self.text(name, default)
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"Config {name!r} must be an http:// or https:// URL; got {value!r}.")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default)
        value = value.upper() if default.isupper() else value.lower()
        if value not in allowed:
            raise ConfigError(f"Config {name!r} must be one of {', '.join(allowed)}; got {value!r}.")
        return value

    def location(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        """Returns a path (relative ones resolved against the project root) or a URL of a known scheme."""
        value = self.text(name, default)
        scheme = urlparse(value).scheme
        if not scheme:
            return str((PROJECT_ROOT / value).resolve())
        if scheme not in schemes:
            known = ", ".join(["a path", *(f"{s}://" for s in schemes)])
            raise ConfigError(f"Config {name!r} has the unknown scheme {scheme!r}; known: {known}.")
        if scheme in _NAMED_SCHEMES and not urlparse(value).netloc:
            raise ConfigError(f"Config {name!r} must name the {_NAMED_SCHEMES[scheme]} after {scheme}://; got {value!r}.")
        return value

    def task_queue(self, name: str) -> str:
        """Returns `local` or a Cloud Tasks queue URL `cloudtasks://projects/P/locations/L/queues/Q`."""
        value = self.text(name, "local")
        if value.lower() == "local":
            return "local"
        if not _CLOUD_TASKS_QUEUE.fullmatch(value):
            raise ConfigError(
                f"Config {name!r} must be local or cloudtasks://projects/PROJECT/locations/LOCATION/queues/QUEUE; "
                f"got {value!r}."
            )
        return value

    def metrics(self, name: str) -> str:
        """Returns `log`, `off` or a Cloud Monitoring project URL `monitoring://PROJECT`."""
        value = self.text(name, "log")
        if value.lower() in ("log", "off"):
            return value.lower()
        if not _MONITORING_PROJECT.fullmatch(value):
            raise ConfigError(f"Config {name!r} must be log, off or monitoring://PROJECT; got {value!r}.")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"Config {name!r} must be true or false; got {raw!r}.")

    def numbers(self, name: str) -> frozenset[int]:
        raw = self._env.get(name, "").strip()
        try:
            return frozenset(int(part) for part in raw.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"Config {name!r} must be comma-separated integers; got {raw!r}.") from None

    def number(
        self,
        name: str,
        default: T,
        kind: Callable[[str], T],
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> T:
        raw = self._env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"Config {name!r} must be {_KIND_NAMES.get(kind, 'a number')}; got {raw!r}.") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Config {name!r} must be a finite number; got {raw!r}.")
        if minimum is not None and value < minimum:  # type: ignore[operator]
            raise ConfigError(f"Config {name!r} must be at least {minimum}; got {raw!r}.")
        if maximum is not None and value > maximum:  # type: ignore[operator]
            raise ConfigError(f"Config {name!r} must be at most {maximum}; got {raw!r}.")
        return value
