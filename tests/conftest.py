"""Shared fixtures: a real catalog, models trained once per session, per-test embedded stores, live servers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from functions.local_server import create_app
from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer, ensure_demo_models, free_port
from shared.services import Services, use_services
from shared.settings import PROJECT_ROOT, Settings
from shared.training import TrainingConfig, train_catalog, write_trained


@pytest.fixture(scope="session")
def catalog() -> SkillCatalog:
    return SkillCatalog.load(PROJECT_ROOT / "models" / "catalog.json")


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, catalog: SkillCatalog) -> Path:
    """All seven skills trained once per session with the default config, as `make run` trains them."""
    out = tmp_path_factory.mktemp("trained")
    for result in train_catalog(catalog, TrainingConfig()).values():
        write_trained(result, out)
    return out


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Environment of an embedded stack in this test's own folder (edit it before `settings` is built)."""
    return {
        "ARTIFACT_STORE": str(tmp_path / "artifacts"),
        "DATABASE_URL": str(tmp_path / "skills.sqlite3"),
        "MODEL_REFRESH_SECONDS": "30",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def services(settings: Settings, trained_dir: Path) -> Iterator[Services]:
    """Services on the embedded stores, with every skill's demo model published and in production."""
    services = Services(settings)
    ensure_demo_models(services, trained_dir)
    use_services(services)
    yield services
    use_services(None)


@pytest.fixture
def client(services: Services):  # type: ignore[no-untyped-def]
    """A Flask test client of the local server's app, on this test's services."""
    return create_app().test_client()


@pytest.fixture
def live_server(services: Services, env: dict[str, str]) -> Iterator[LocalServer]:
    """The real server (gunicorn, two workers) on a free port of 127.0.0.1, on this test's stores."""
    with LocalServer(env, free_port(), workers=2) as server:
        yield server
