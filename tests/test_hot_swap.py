"""Integration: a live two-worker server swaps model versions under load without failing a request."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from shared.catalog import SkillCatalog
from shared.local_stack import LocalServer, free_port
from shared.publishing import publish_version
from shared.services import Services
from shared.synthetic import generate_cohort
from tests.http_traffic import Client

pytestmark = pytest.mark.integration

SKILL = "problem_solving"


@pytest.fixture
def fast_refresh_server(env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[tuple[LocalServer, Services]]:
    """A live server whose workers check the registry every 0.3 s, on this test's stores."""
    env["MODEL_REFRESH_SECONDS"] = "0.3"
    services: Services = request.getfixturevalue("services")
    assert services.settings.model_refresh_seconds == 0.3
    with LocalServer(env, free_port(), workers=2) as server:
        yield server, services


def _healthz_version(server: LocalServer) -> str:
    response = requests.get(server.url + "/healthz", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["models"][SKILL]


def _healthz_settles_on(server: LocalServer, version: str, seconds: float = 10.0) -> bool:
    """Each worker sees a registry change within its refresh interval; a worker that checked just
    before the change may answer with the old version until then, so poll (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # Two answers in a row, so both workers have been asked at least once in most interleavings.
        if _healthz_version(server) == version and _healthz_version(server) == version:
            return True
        time.sleep(0.05)
    return False


def test_publish_promote_and_rollback_under_load(
    fast_refresh_server: tuple[LocalServer, Services], catalog: SkillCatalog, trained_dir: Path
) -> None:
    server, services = fast_refresh_server
    spec = catalog.skill(SKILL)
    cohort = generate_cohort(catalog, 1, seed=99)
    features = {name: float(value) for name, value in zip(spec.feature_names, cohort.matrix(spec)[0])}
    body: dict[str, Any] = {"student_id": "student-hot-swap", "skill": SKILL, "features": features}
    assert _healthz_version(server) == "1.0.0"

    client = Client(server.url + "/api/v1/skills/infer", body)
    client.start()
    try:
        while client.is_alive() and len(client.snapshot()) < 10:
            time.sleep(0.01)
        assert len(client.snapshot()) >= 10, "the client got no answers"

        before_publish = len(client.snapshot())
        record = publish_version(services.registry, services.artifacts, trained_dir / SKILL, force=True)
        assert record.version == "1.1.0"
        services.registry.promote(SKILL, record.version)
        swapped_at = len(client.snapshot())
        assert client.wait_for_run("1.1.0", swapped_at), client.snapshot()[swapped_at:]
        assert _healthz_settles_on(server, "1.1.0")

        restored = services.registry.rollback(SKILL)
        assert restored.version == "1.0.0"
        rolled_back_at = len(client.snapshot())
        assert client.wait_for_run("1.0.0", rolled_back_at), client.snapshot()[rolled_back_at:]
        assert _healthz_settles_on(server, "1.0.0")
    finally:
        client.stop.set()
        client.join(timeout=15)
    assert not client.is_alive()

    answers = client.snapshot()
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    versions = [v for _, v in answers]
    assert set(versions) == {"1.0.0", "1.1.0"}
    # Nothing served the new version before it was promoted.
    assert set(versions[:before_publish]) == {"1.0.0"}
    assert versions.index("1.1.0") >= before_publish
