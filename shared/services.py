"""Wiring: builds the service's stores and engine from the settings, once per process."""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from shared.artifacts import ArtifactStore, open_artifact_store
from shared.assessments import AssessmentStore, SqliteAssessmentStore
from shared.catalog import SkillCatalog
from shared.engine import InferenceEngine
from shared.errors import ConfigError
from shared.feature_store import FeatureStore, SqliteFeatureStore
from shared.logs import configure_logging
from shared.registry import ModelRegistry, SqliteRegistryBackend
from shared.runs import RunStore, SqliteRunStore
from shared.settings import Settings
from shared.sqlite import SqliteDatabase, open_database, sqlite_path
from shared.task_auth import TaskAuthenticator
from shared.tasks import LocalTaskQueue, TaskQueue

if TYPE_CHECKING:
    from shared.drift import DriftCheckStore
    from shared.gcp.firestore import FirestoreDatabase
    from shared.metrics import MetricsRecorder
    from shared.profiles import ProfileStore, ServingProfiler
    from shared.ratings import TeacherRatingStore


class Services:
    """The process's services; each is built on first use, so a function pays only for what it touches.

    The backend of each store is picked here, from the settings, and nowhere else: DATABASE_URL
    (a SQLite file or firestore://PROJECT/DATABASE) for the registry, features, assessments and runs;
    TASK_QUEUE for the queue. Google clients are imported only when a GCP backend is configured.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def on_firestore(self) -> bool:
        return urlparse(self.settings.database_url).scheme == "firestore"

    @cached_property
    def firestore(self) -> FirestoreDatabase:
        from shared.gcp.firestore import FirestoreDatabase

        parsed = urlparse(self.settings.database_url)
        database = unquote(parsed.path.strip("/")) or "(default)"
        return FirestoreDatabase(parsed.netloc, database, emulator_host=self.settings.firestore_emulator_host)

    @cached_property
    def catalog(self) -> SkillCatalog:
        return SkillCatalog.load(self.settings.skill_catalog)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        return open_artifact_store(
            self.settings.artifact_store, self.settings.artifact_cache_dir, emulator_host=self.settings.storage_emulator_host
        )

    @cached_property
    def database(self) -> SqliteDatabase:
        path = sqlite_path(self.settings.database_url)
        if path is None:
            raise ConfigError(
                f"Config 'DATABASE_URL' names no SQLite database: {self.settings.database_url!r}; "
                "the embedded task queue needs one (a file path or sqlite:///path)."
            )
        return open_database(path)

    @cached_property
    def registry(self) -> ModelRegistry:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreRegistryBackend

            return ModelRegistry(FirestoreRegistryBackend(self.firestore))
        return ModelRegistry(SqliteRegistryBackend(self.database))

    @cached_property
    def features(self) -> FeatureStore:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreFeatureStore

            return FirestoreFeatureStore(self.firestore)
        return SqliteFeatureStore(self.database)

    @cached_property
    def assessments(self) -> AssessmentStore:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreAssessmentStore

            return FirestoreAssessmentStore(self.firestore)
        return SqliteAssessmentStore(self.database)

    @cached_property
    def runs(self) -> RunStore:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreRunStore

            return FirestoreRunStore(self.firestore)
        return SqliteRunStore(self.database)

    @cached_property
    def profiles(self) -> ProfileStore:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreProfileStore

            return FirestoreProfileStore(self.firestore)
        from shared.profiles import SqliteProfileStore

        return SqliteProfileStore(self.database)

    @cached_property
    def profiler(self) -> ServingProfiler:
        from shared.profiles import ServingProfiler

        # The store is reached only when the profiler flushes, in its own thread.
        return ServingProfiler(lambda: self.profiles, self.settings.profile_flush_seconds)

    @cached_property
    def ratings(self) -> TeacherRatingStore:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreTeacherRatingStore

            return FirestoreTeacherRatingStore(self.firestore)
        from shared.ratings import SqliteTeacherRatingStore

        return SqliteTeacherRatingStore(self.database)

    @cached_property
    def drift_checks(self) -> DriftCheckStore:
        if self.on_firestore:
            from shared.gcp.firestore import FirestoreDriftCheckStore

            return FirestoreDriftCheckStore(self.firestore)
        from shared.drift import SqliteDriftCheckStore

        return SqliteDriftCheckStore(self.database)

    @cached_property
    def tasks(self) -> TaskQueue:
        if self.settings.task_queue.startswith("cloudtasks://"):
            from shared.gcp.tasks import CloudTasksQueue

            return CloudTasksQueue(
                self.settings.task_queue.removeprefix("cloudtasks://"),
                service_account=self.settings.tasks_service_account,
                audience=self.settings.tasks_audience,
                emulator_host=self.settings.cloud_tasks_emulator_host,
                dispatch_deadline_seconds=self.settings.task_dispatch_deadline_seconds,
            )
        return LocalTaskQueue(
            self.database,
            max_attempts=self.settings.task_max_attempts,
            min_backoff_seconds=self.settings.task_min_backoff_seconds,
            # Every worker process of the server delivers (deliver_tasks): one task at a time each keeps as
            # many chunks under way as there are workers to score them, and none waiting in the backlog
            # (where its dispatch deadline would run, and online requests would queue behind it).
            concurrency=1,
            request_timeout_seconds=self.settings.task_dispatch_deadline_seconds,
        )

    def deliver_tasks(self) -> LocalTaskQueue | None:
        """Makes this process deliver the embedded queue's tasks for as long as it lives, and returns that queue.

        Every server process does, as Cloud Tasks delivers to whichever instance is up, so a run goes on
        when the process that enqueued it dies. Returns None, starting nothing, when Cloud Tasks delivers
        (TASK_QUEUE) or when there is no SQLite database for the embedded queue (DATABASE_URL).
        """
        if self.settings.task_queue != "local" or sqlite_path(self.settings.database_url) is None:
            return None
        queue = self.tasks
        assert isinstance(queue, LocalTaskQueue)
        queue.keep_delivering()
        return queue

    @cached_property
    def task_auth(self) -> TaskAuthenticator:
        settings = self.settings
        return TaskAuthenticator(
            settings.tasks_auth,
            settings.tasks_auth_audience,
            settings.tasks_auth_allowed_emails,
            settings.tasks_auth_certs_url,
        )

    @cached_property
    def metrics(self) -> MetricsRecorder:
        from shared.metrics import open_metrics

        return open_metrics(self.settings)

    @cached_property
    def engine(self) -> InferenceEngine:
        return InferenceEngine(
            self.catalog,
            self.registry,
            self.artifacts,
            refresh_seconds=self.settings.model_refresh_seconds,
            onnx_threads=self.settings.onnx_threads,
            booster_threads=self.settings.batch_threads,
            profiler=self.profiler if self.settings.serving_profiles else None,
        )


_services: Services | None = None
_lock = threading.Lock()


def get_services() -> Services:
    """Returns the process's services, built from the environment on first call."""
    global _services
    if _services is None:
        with _lock:
            if _services is None:
                settings = Settings.from_env()
                configure_logging(settings.log_level)
                _services = Services(settings)
    return _services


def use_services(services: Services | None) -> None:
    """Makes these the process's services (a server built from explicit settings, or a test)."""
    global _services
    with _lock:
        _services = services
