"""Wiring: builds the service's stores and engine from the settings, once per process."""

from __future__ import annotations

import threading
from functools import cached_property

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
from shared.tasks import LocalTaskQueue, TaskQueue


class Services:
    """The process's services; each is built on first use, so a function pays only for what it touches."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def catalog(self) -> SkillCatalog:
        return SkillCatalog.load(self.settings.skill_catalog)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        return open_artifact_store(self.settings.artifact_store)

    @cached_property
    def database(self) -> SqliteDatabase:
        path = sqlite_path(self.settings.database_url)
        if path is None:
            raise ConfigError(
                f"Config 'DATABASE_URL' has an unknown scheme: {self.settings.database_url!r}; "
                "known: a file path, sqlite:///path (firestore:// arrives with the GCP backends)."
            )
        return open_database(path)

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(SqliteRegistryBackend(self.database))

    @cached_property
    def features(self) -> FeatureStore:
        return SqliteFeatureStore(self.database)

    @cached_property
    def assessments(self) -> AssessmentStore:
        return SqliteAssessmentStore(self.database)

    @cached_property
    def runs(self) -> RunStore:
        return SqliteRunStore(self.database)

    @cached_property
    def tasks(self) -> TaskQueue:
        if self.settings.task_queue != "local":
            raise ConfigError(
                f"Config 'TASK_QUEUE' has the unknown value {self.settings.task_queue!r}; known: local "
                "(Cloud Tasks arrives with the GCP backends)."
            )
        return LocalTaskQueue(
            self.database,
            max_attempts=self.settings.task_max_attempts,
            min_backoff_seconds=self.settings.task_min_backoff_seconds,
            concurrency=self.settings.server_workers,
        )

    @cached_property
    def engine(self) -> InferenceEngine:
        return InferenceEngine(
            self.catalog,
            self.registry,
            self.artifacts,
            refresh_seconds=self.settings.model_refresh_seconds,
            onnx_threads=self.settings.onnx_threads,
            booster_threads=self.settings.batch_threads,
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
