"""The model registry on its SQLite backend: versions, stages, traffic, rollback, history and concurrent writes.

The rollout lifecycle (canaries, rollback during a canary, archive) runs on both backends in
test_canary_lifecycle.py; this file keeps the older entry points (promote with a stage, rollback).
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import shared.registry as registry_module
from shared.errors import Conflict, NotFound, ValidationError
from shared.registry import (
    CANARY_ABORT,
    PROMOTE,
    REGISTER,
    ROLLBACK,
    UNKNOWN_ACTOR,
    Decide,
    ModelRegistry,
    ModelVersion,
    SqliteRegistryBackend,
    listing,
    parse_semver,
)
from shared.sqlite import SqliteDatabase

SKILL = "communication"


@pytest.fixture
def database(tmp_path: Path) -> SqliteDatabase:
    return SqliteDatabase(tmp_path / "registry.sqlite3")


@pytest.fixture
def registry(database: SqliteDatabase) -> ModelRegistry:
    return ModelRegistry(SqliteRegistryBackend(database))


@pytest.fixture
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every registry timestamp strictly later than the one before, however fast the test runs."""
    ticks = itertools.count()

    def now() -> str:
        n = next(ticks)
        return f"2030-01-01T00:{n // 60:02d}:{n % 60:02d}.000Z"

    monkeypatch.setattr(registry_module, "now_iso", now)


Register = Callable[..., ModelVersion]


@pytest.fixture
def register(registry: ModelRegistry) -> Register:
    def register(version: str, skill: str = SKILL) -> ModelVersion:
        return registry.register(
            skill,
            version,
            trained_at="2030-01-01T00:00:00.000Z",
            metrics={"heldout": {"auc": 0.8}},
            artifact_uri=f"file:///store/{skill}/{version}/",
            sha256="ab" * 32,
            checksums={"model.onnx": "cd" * 32},
        )

    return register


def _stages(registry: ModelRegistry, skill: str = SKILL) -> dict[str, tuple[str, float]]:
    return {v.version: (v.stage, v.traffic) for v in registry.versions(skill)}


# -- registering ---------------------------------------------------------------------------------


def test_register_records_a_staging_version(registry: ModelRegistry, register: Register) -> None:
    record = register("1.0.0")
    assert (record.stage, record.traffic, record.promoted_at) == ("staging", 0.0, None)
    stored = registry.get(SKILL, "1.0.0")
    assert stored == record
    assert stored.metrics == {"heldout": {"auc": 0.8}}
    assert stored.checksums == {"model.onnx": "cd" * 32}
    assert registry.serving() == {}


def test_the_registry_survives_a_new_handle(database: SqliteDatabase, register: Register, tmp_path: Path) -> None:
    register("1.0.0")
    reopened = ModelRegistry(SqliteRegistryBackend(SqliteDatabase(tmp_path / "registry.sqlite3")))
    assert [v.version for v in reopened.versions(SKILL)] == ["1.0.0"]


def test_a_duplicate_version_is_a_conflict(registry: ModelRegistry, register: Register) -> None:
    register("1.0.0")
    with pytest.raises(Conflict):
        register("1.0.0")
    assert len(registry.versions(SKILL)) == 1
    # The same version of another skill is a different model.
    register("1.0.0", skill="leadership")
    assert len(registry.versions()) == 2


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0-rc1", "", "1..0", "a.b.c", " 1.0.0"])
def test_a_malformed_version_is_a_validation_error(registry: ModelRegistry, register: Register, version: str) -> None:
    with pytest.raises(ValidationError) as caught:
        register(version)
    assert caught.value.problems[0]["field"] == "version"
    assert registry.versions(SKILL) == []


def test_parse_semver() -> None:
    assert parse_semver("10.2.33") == (10, 2, 33)


def test_next_version(registry: ModelRegistry, register: Register) -> None:
    assert registry.next_version(SKILL) == "1.0.0"
    register("1.0.0")
    assert registry.next_version(SKILL) == "1.1.0"
    assert registry.next_version(SKILL, "minor") == "1.1.0"
    assert registry.next_version(SKILL, "patch") == "1.0.1"
    assert registry.next_version(SKILL, "major") == "2.0.0"
    # The highest version counts numerically, not as text, whatever order they were registered in.
    register("1.10.0")
    register("1.9.3")
    assert registry.next_version(SKILL) == "1.11.0"
    assert registry.next_version(SKILL, "patch") == "1.10.1"
    # Other skills do not count.
    assert registry.next_version("leadership") == "1.0.0"


def test_get_of_a_missing_version_is_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(NotFound):
        registry.get(SKILL, "9.9.9")


# -- promotion -----------------------------------------------------------------------------------


def test_promote_to_production_archives_the_previous(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    first = registry.promote(SKILL, "1.0.0")
    assert (first.stage, first.traffic) == ("production", 1.0)
    assert first.promoted_at is not None
    registry.promote(SKILL, "1.1.0", "production")
    assert _stages(registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0)}
    assert [v.version for v in registry.serving()[SKILL]] == ["1.1.0"]


def test_promote_rejects_an_unknown_stage_or_version(registry: ModelRegistry, register: Register) -> None:
    register("1.0.0")
    with pytest.raises(ValidationError):
        registry.promote(SKILL, "1.0.0", "live")
    with pytest.raises(NotFound):
        registry.promote(SKILL, "2.0.0")


def test_a_canary_takes_its_traffic_and_production_the_rest(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    canary = registry.promote(SKILL, "1.1.0", "canary", 0.25)
    assert (canary.stage, canary.traffic) == ("canary", 0.25)
    assert _stages(registry) == {"1.0.0": ("production", 0.75), "1.1.0": ("canary", 0.25)}
    serving = registry.serving()[SKILL]
    assert [(v.version, v.stage) for v in serving] == [("1.0.0", "production"), ("1.1.0", "canary")]
    assert sum(v.traffic for v in serving) == pytest.approx(1.0)


def test_serving_lists_production_first_even_when_the_canary_is_older(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.1.0")
    registry.promote(SKILL, "1.0.0", "canary", 0.1)
    assert [v.version for v in registry.serving()[SKILL]] == ["1.1.0", "1.0.0"]


def test_a_second_canary_is_refused_while_one_runs(registry: ModelRegistry, register: Register, ticking_clock: None) -> None:
    """One canary at a time: replacing it silently would end a comparison nobody decided to end."""
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        register(version)
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0", "canary", 0.2)
    with pytest.raises(Conflict, match="already has a canary running"):
        registry.promote(SKILL, "1.2.0", "canary", 0.4)
    assert _stages(registry) == {
        "1.0.0": ("production", 0.8),
        "1.1.0": ("canary", 0.2),
        "1.2.0": ("staging", 0.0),
    }


@pytest.mark.parametrize("traffic", [None, 0.0, 1.0, 1.5, -0.1])
def test_a_canary_needs_traffic_between_0_and_1(
    registry: ModelRegistry, register: Register, traffic: float | None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    with pytest.raises(ValidationError):
        registry.promote(SKILL, "1.1.0", "canary", traffic)
    assert _stages(registry)["1.1.0"] == ("staging", 0.0)


def test_a_canary_needs_another_version_in_production(registry: ModelRegistry, register: Register) -> None:
    register("1.0.0")
    with pytest.raises(Conflict):
        registry.promote(SKILL, "1.0.0", "canary", 0.5)
    registry.promote(SKILL, "1.0.0")
    with pytest.raises(Conflict):
        registry.promote(SKILL, "1.0.0", "canary", 0.5)


def test_promoting_the_canary_to_production(registry: ModelRegistry, register: Register, ticking_clock: None) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0", "canary", 0.3)
    promoted = registry.promote(SKILL, "1.1.0", "production")
    assert (promoted.stage, promoted.traffic) == ("production", 1.0)
    assert _stages(registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0)}
    assert [v.version for v in registry.serving()[SKILL]] == ["1.1.0"]


def test_promoting_a_third_version_during_a_canary_is_refused(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        register(version)
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0", "canary", 0.3)
    with pytest.raises(Conflict, match="has a canary running"):
        registry.promote(SKILL, "1.2.0", "production")
    assert _stages(registry) == {
        "1.0.0": ("production", 0.7),
        "1.1.0": ("canary", 0.3),
        "1.2.0": ("staging", 0.0),
    }


def test_withdrawing_the_canary_gives_production_all_traffic(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0", "canary", 0.3)
    registry.promote(SKILL, "1.1.0", "archived")
    assert _stages(registry) == {"1.0.0": ("production", 1.0), "1.1.0": ("archived", 0.0)}


def test_production_cannot_be_demoted_directly(registry: ModelRegistry, register: Register) -> None:
    register("1.0.0")
    registry.promote(SKILL, "1.0.0")
    with pytest.raises(Conflict):
        registry.promote(SKILL, "1.0.0", "archived")
    assert _stages(registry) == {"1.0.0": ("production", 1.0)}


# -- rollback ------------------------------------------------------------------------------------


def test_rollback_restores_the_previous_production(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0")
    restored = registry.rollback(SKILL)
    assert (restored.version, restored.stage, restored.traffic) == ("1.0.0", "production", 1.0)
    assert _stages(registry) == {"1.0.0": ("production", 1.0), "1.1.0": ("archived", 0.0)}


def test_rollback_never_restores_a_version_that_never_served(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.1.0")
    with pytest.raises(Conflict):
        registry.rollback(SKILL)
    assert _stages(registry) == {"1.0.0": ("staging", 0.0), "1.1.0": ("production", 1.0)}


def test_rollback_keeps_the_canary_share(registry: ModelRegistry, register: Register, ticking_clock: None) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        register(version)
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0")
    registry.promote(SKILL, "1.2.0", "canary", 0.2)
    registry.rollback(SKILL)
    assert _stages(registry) == {
        "1.0.0": ("production", 0.8),
        "1.1.0": ("archived", 0.0),
        "1.2.0": ("canary", 0.2),
    }


def test_rollback_twice_with_one_earlier_version_then_conflicts(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    """1.1.0 replaced 1.0.0; a rollback restores 1.0.0; nothing served before 1.0.0, so a second one
    must refuse rather than bring back the version that was just rolled back."""
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0")
    assert registry.rollback(SKILL).version == "1.0.0"
    with pytest.raises(Conflict):
        registry.rollback(SKILL)
    assert _stages(registry)["1.0.0"] == ("production", 1.0)


def test_rollback_twice_walks_further_back(registry: ModelRegistry, register: Register, ticking_clock: None) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        register(version)
        registry.promote(SKILL, version)
    assert registry.rollback(SKILL).version == "1.1.0"
    assert registry.rollback(SKILL).version == "1.0.0"
    assert _stages(registry) == {
        "1.0.0": ("production", 1.0),
        "1.1.0": ("archived", 0.0),
        "1.2.0": ("archived", 0.0),
    }


def test_rollback_does_not_depend_on_the_clock_resolution(
    registry: ModelRegistry, register: Register, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promotions within one millisecond (timestamps are stored to the millisecond) still roll back in order."""
    monkeypatch.setattr(registry_module, "now_iso", lambda: "2030-01-01T00:00:00.000Z")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        register(version)
        registry.promote(SKILL, version)
    assert registry.rollback(SKILL).version == "1.1.0"


def test_rollback_without_production_is_a_conflict(registry: ModelRegistry, register: Register) -> None:
    with pytest.raises(Conflict):
        registry.rollback(SKILL)
    register("1.0.0")
    with pytest.raises(Conflict):
        registry.rollback(SKILL)


# -- history -------------------------------------------------------------------------------------


def test_the_older_entry_points_record_their_changes_too(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0", actor="alice", reason="better AUC")
    registry.rollback(SKILL, actor="bob", reason="complaints")
    history = registry.history(SKILL)
    assert [(e.sequence, e.action, e.actor, e.reason) for e in history] == [
        (1, REGISTER, UNKNOWN_ACTOR, None),
        (2, REGISTER, UNKNOWN_ACTOR, None),
        (3, PROMOTE, UNKNOWN_ACTOR, None),
        (4, PROMOTE, "alice", "better AUC"),
        (5, ROLLBACK, "bob", "complaints"),
    ]
    assert [t.describe() for t in history[4].changes] == ["1.0.0: archived -> production 100%", "1.1.0: production 100% -> archived"]
    # Timestamps are the registry clock's, in commit order.
    assert [e.at for e in history] == sorted(e.at for e in history)


def test_withdrawing_the_canary_through_promote_is_recorded_as_an_abort(
    registry: ModelRegistry, register: Register, ticking_clock: None
) -> None:
    register("1.0.0")
    register("1.1.0")
    registry.promote(SKILL, "1.0.0")
    registry.promote(SKILL, "1.1.0", "canary", 0.3)
    registry.promote(SKILL, "1.1.0", "staging")
    assert _stages(registry) == {"1.0.0": ("production", 1.0), "1.1.0": ("staging", 0.0)}
    last = registry.history(SKILL)[-1]
    assert last.action == CANARY_ABORT and last.note == "the running canary was moved to staging, which aborts it"


def test_the_history_is_kept_in_its_own_table_and_survives_a_new_handle(
    registry: ModelRegistry, register: Register, tmp_path: Path
) -> None:
    register("1.0.0")
    registry.promote(SKILL, "1.0.0", actor="alice")
    reopened = ModelRegistry(SqliteRegistryBackend(SqliteDatabase(tmp_path / "registry.sqlite3")))
    assert reopened.history(SKILL) == registry.history(SKILL)
    assert [e.actor for e in reopened.history(SKILL)] == [UNKNOWN_ACTOR, "alice"]


# -- listing -------------------------------------------------------------------------------------

VERSION_KEYS = {"version", "stage", "traffic", "created_at", "trained_at", "metrics", "artifact_uri", "sha256"}


def test_listing_one_skill(registry: ModelRegistry, register: Register, ticking_clock: None) -> None:
    register("1.0.0")
    register("1.1.0")
    register("1.0.0", skill="leadership")
    registry.promote(SKILL, "1.1.0")
    entries = listing(registry, [SKILL])
    assert len(entries) == 1
    entry = entries[0]
    assert set(entry) == {"skill", "deployed_version", "versions"}
    assert (entry["skill"], entry["deployed_version"]) == (SKILL, "1.1.0")
    assert [v["version"] for v in entry["versions"]] == ["1.0.0", "1.1.0"]
    for version in entry["versions"]:
        assert set(version) == VERSION_KEYS
    assert entry["versions"][1]["stage"] == "production"
    assert entry["versions"][0]["metrics"] == {"heldout": {"auc": 0.8}}


def test_listing_all_skills(registry: ModelRegistry, register: Register, ticking_clock: None) -> None:
    register("1.0.0")
    register("2.0.0", skill="leadership")
    registry.promote("leadership", "2.0.0")
    entries = listing(registry, [SKILL, "leadership", "creativity"])
    assert [e["skill"] for e in entries] == [SKILL, "leadership", "creativity"]
    assert [e["deployed_version"] for e in entries] == [None, "2.0.0", None]
    assert [[v["version"] for v in e["versions"]] for e in entries] == [["1.0.0"], ["2.0.0"], []]
    for entry in entries:
        assert set(entry) == {"skill", "deployed_version", "versions"}
        for version in entry["versions"]:
            assert set(version) == VERSION_KEYS


# -- concurrency ---------------------------------------------------------------------------------


def test_concurrent_registrations_both_land(registry: ModelRegistry, register: Register) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(versions: list[str]) -> None:
        try:
            barrier.wait(timeout=10)
            for version in versions:
                register(version)
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=([f"1.{i}.0" for i in range(0, 40, 2)],)),
        threading.Thread(target=work, args=([f"1.{i}.0" for i in range(1, 40, 2)],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(v.version for v in registry.versions(SKILL)) == sorted(f"1.{i}.0" for i in range(40))


class ReadTogetherBackend:
    """Delegates to a real backend, but holds each thread inside its first update, once it has read the
    versions, until the other thread has read too (or a moment passed): the interleaving two operators
    promoting at once could hit. SQLite lets the second begin only once the first has committed, so
    here the wait always times out, which is the point."""

    def __init__(self, inner: SqliteRegistryBackend, parties: int) -> None:
        self.inner = inner
        self.barrier = threading.Barrier(parties, timeout=0.5)
        self.local = threading.local()

    def update(self, skill: str, decide: Decide) -> None:
        def together(stored: list[ModelVersion]) -> Any:
            if not getattr(self.local, "has_read", False):
                self.local.has_read = True
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    pass  # a registry that serializes promotions never lets both threads read first
            return decide(stored)

        self.inner.update(skill, together)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_concurrent_promotions_leave_exactly_one_production(database: SqliteDatabase, ticking_clock: None) -> None:
    """Promotion is a read-decide-write; two at once must not both archive the same old version and
    both become production."""
    setup = ModelRegistry(SqliteRegistryBackend(database))
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        setup.register(
            SKILL, version, trained_at="t", metrics={}, artifact_uri=f"file:///s/{version}/", sha256="0" * 64, checksums={}
        )
    setup.promote(SKILL, "1.0.0")
    racing = ModelRegistry(ReadTogetherBackend(SqliteRegistryBackend(database), parties=2))
    errors: list[BaseException] = []

    def work(version: str) -> None:
        try:
            racing.promote(SKILL, version)
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in ("1.1.0", "1.2.0")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    stages = _stages(setup)
    production = [v for v, (stage, _) in stages.items() if stage == "production"]
    assert len(production) == 1, stages
    assert sum(traffic for _, traffic in stages.values()) == pytest.approx(1.0)
