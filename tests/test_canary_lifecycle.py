"""The rollout lifecycle on both registry backends (SQLite and the Firestore emulator): canaries started,
re-weighted, promoted and aborted, rollback during a canary, archiving, the history each change leaves,
and a canary promotion racing its abort."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from dataclasses import replace
from typing import Any

import pytest

from shared.artifacts import BOOSTER_FILE, METADATA_FILE, ONNX_FILE, SCALER_FILE, LocalArtifactStore, sha256_hex
from shared.errors import Conflict, NotFound, StoreUnavailable, ValidationError
from shared.gcp.firestore import FirestoreRegistryBackend
from shared.registry import (
    ABANDON,
    ARCHIVE,
    CANARY_ABORT,
    CANARY_PROMOTE,
    CANARY_START,
    CANARY_TRAFFIC,
    COMPLETE,
    PROMOTE,
    REGISTER,
    RESERVE,
    ROLLBACK,
    Decide,
    HistoryEvent,
    ModelRegistry,
    ModelVersion,
    RegistryBackend,
    SqliteRegistryBackend,
)
from shared.publishing import AlreadyPublished, publish_version
from shared.sqlite import SqliteDatabase
from tests.emulators.firestore import (  # noqa: F401 - fixtures
    firestore_database,
    firestore_emulator,
    firestore_session_database,
)

SKILL = "leadership"
ALICE = "alice@school.example"


@pytest.fixture(params=["sqlite", "firestore"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> RegistryBackend:
    if request.param == "sqlite":
        return SqliteRegistryBackend(SqliteDatabase(tmp_path / "registry.sqlite3"))
    # Requested only here, so the SQLite half never starts (or needs) the emulator.
    return FirestoreRegistryBackend(request.getfixturevalue("firestore_database"))


@pytest.fixture
def registry(backend: RegistryBackend) -> ModelRegistry:
    """1.0.0 in production, 1.1.0 and 1.2.0 in staging."""
    registry = ModelRegistry(backend)
    set_up(registry, SKILL)
    return registry


def set_up(registry: ModelRegistry, skill: str, versions: tuple[str, ...] = ("1.0.0", "1.1.0", "1.2.0")) -> None:
    for n, version in enumerate(versions):
        registry.register(
            skill, version, trained_at="2030-01-01T00:00:00.000Z", metrics={}, artifact_uri=f"file:///m/{skill}/{version}/",
            sha256=f"{n:064d}", checksums={}, actor="setup",
        )
    registry.make_production(skill, versions[0], actor="setup")


def stages(registry: ModelRegistry, skill: str = SKILL) -> dict[str, tuple[str, float]]:
    return {v.version: (v.stage, v.traffic) for v in registry.versions(skill)}


def moves(event: HistoryEvent | None) -> list[tuple[str, tuple[str, float] | None, tuple[str, float]]]:
    """An event's changes as (version, (stage, traffic) before or None, (stage, traffic) after)."""
    assert event is not None
    return [
        (t.version, (t.before.stage, t.before.traffic) if t.before else None, (t.after.stage, t.after.traffic))
        for t in event.changes
    ]


def actions(registry: ModelRegistry, skill: str = SKILL) -> list[str]:
    return [e.action for e in registry.history(skill)]


SETUP_ACTIONS = [REGISTER, REGISTER, REGISTER, PROMOTE]


# -- a canary from start to end ----------------------------------------------------------------------


def test_start_set_and_promote_a_canary(registry: ModelRegistry) -> None:
    started = registry.start_canary(SKILL, "1.1.0", 0.1, actor=ALICE, reason="new features")
    assert stages(registry) == {"1.0.0": ("production", 0.9), "1.1.0": ("canary", 0.1), "1.2.0": ("staging", 0.0)}
    assert [(v.version, v.stage) for v in registry.serving()[SKILL]] == [("1.0.0", "production"), ("1.1.0", "canary")]
    assert moves(started) == [("1.0.0", ("production", 1.0), ("production", 0.9)), ("1.1.0", ("staging", 0.0), ("canary", 0.1))]
    status = registry.status(SKILL)
    assert status.production is not None and status.canary is not None
    assert (status.production.version, status.canary.version, status.canary.traffic) == ("1.0.0", "1.1.0", 0.1)
    assert started is not None and status.canary_since == started.at

    reweighted = registry.set_canary_traffic(SKILL, 0.25, actor="bob", reason="no errors so far")
    assert stages(registry)["1.0.0"] == ("production", 0.75) and stages(registry)["1.1.0"] == ("canary", 0.25)
    assert moves(reweighted) == [("1.0.0", ("production", 0.9), ("production", 0.75)), ("1.1.0", ("canary", 0.1), ("canary", 0.25))]
    assert registry.status(SKILL).canary_since == started.at  # the canary's start, not its last re-weighting
    assert registry.set_canary_traffic(SKILL, 0.25, actor="bob") is None  # the same share changes nothing

    promoted = registry.promote_canary(SKILL, actor=ALICE, reason="AUC holds")
    assert stages(registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0), "1.2.0": ("staging", 0.0)}
    assert moves(promoted) == [("1.0.0", ("production", 0.75), ("archived", 0.0)), ("1.1.0", ("canary", 0.25), ("production", 1.0))]
    status = registry.status(SKILL)
    assert status.production is not None and status.production.version == "1.1.0" and status.canary is None
    assert promoted is not None and status.production_since == promoted.at
    assert registry.get(SKILL, "1.1.0").promoted_at is not None

    history = registry.history(SKILL)
    assert [e.action for e in history] == SETUP_ACTIONS + [CANARY_START, CANARY_TRAFFIC, CANARY_PROMOTE]
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert [(e.actor, e.reason) for e in history[-3:]] == [
        (ALICE, "new features"), ("bob", "no errors so far"), (ALICE, "AUC holds"),
    ]
    assert history[-1] == replace(promoted, sequence=len(history))  # what was returned is what was stored


def test_abort_a_canary_gives_production_all_traffic_back(registry: ModelRegistry) -> None:
    registry.start_canary(SKILL, "1.1.0", 0.3, actor=ALICE)
    aborted = registry.abort_canary(SKILL, actor=ALICE, reason="latency regression")
    assert stages(registry) == {"1.0.0": ("production", 1.0), "1.1.0": ("archived", 0.0), "1.2.0": ("staging", 0.0)}
    assert moves(aborted) == [("1.0.0", ("production", 0.7), ("production", 1.0)), ("1.1.0", ("canary", 0.3), ("archived", 0.0))]
    assert [v.version for v in registry.serving()[SKILL]] == ["1.0.0"]
    assert actions(registry)[-1] == CANARY_ABORT and registry.history(SKILL)[-1].reason == "latency regression"
    assert registry.status(SKILL).canary is None


def test_a_second_canary_is_refused_and_the_message_says_how_to_end_the_first(registry: ModelRegistry) -> None:
    registry.start_canary(SKILL, "1.1.0", 0.1, actor=ALICE)
    before, history = stages(registry), registry.history(SKILL)
    for version in ("1.2.0", "1.1.0"):
        with pytest.raises(Conflict) as refused:
            registry.start_canary(SKILL, version, 0.2, actor=ALICE)
        assert "already has a canary running: 1.1.0 at 10%" in refused.value.message
        assert f"canary promote {SKILL}" in refused.value.message and f"canary abort {SKILL}" in refused.value.message
    assert stages(registry) == before and registry.history(SKILL) == history


def test_a_gradual_rollout_advances_step_by_step_and_its_last_step_promotes(registry: ModelRegistry) -> None:
    started = registry.start_canary(SKILL, "1.1.0", steps=(0.05, 0.25, 0.5, 1.0), actor=ALICE, reason="new features")
    assert stages(registry)["1.1.0"] == ("canary", 0.05) and stages(registry)["1.0.0"] == ("production", 0.95)
    assert started is not None and started.changes[-1].plan == (0.05, 0.25, 0.5, 1.0)
    assert "steps 5%, 25%, 50%, 100%" in started.describe()
    status = registry.status(SKILL)
    assert (status.canary_plan, status.next_step()) == ((0.05, 0.25, 0.5, 1.0), 0.25)

    shares = []
    for _ in range(2):
        event = registry.advance_canary(SKILL, "1.1.0", actor="canary-check", reason="every guardrail passed")
        assert event is not None and event.action == CANARY_TRAFFIC
        shares.append(stages(registry)["1.1.0"])
    assert shares == [("canary", 0.25), ("canary", 0.5)]
    assert registry.status(SKILL).canary_plan == (0.05, 0.25, 0.5, 1.0)  # the plan outlives the re-weightings

    promoted = registry.advance_canary(SKILL, "1.1.0", actor="canary-check", reason="every guardrail passed")
    assert promoted is not None and promoted.action == CANARY_PROMOTE and "step 4 of 4" in (promoted.note or "")
    assert stages(registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0), "1.2.0": ("staging", 0.0)}
    history = registry.history(SKILL)
    assert [e.action for e in history[-4:]] == [CANARY_START, CANARY_TRAFFIC, CANARY_TRAFFIC, CANARY_PROMOTE]
    assert [e.actor for e in history[-4:]] == [ALICE, "canary-check", "canary-check", "canary-check"]
    assert history[-4].changes[-1].plan == (0.05, 0.25, 0.5, 1.0)  # the plan is stored with the start


def test_an_operator_re_weighting_a_gradual_rollout_moves_it_to_the_step_after_its_share(registry: ModelRegistry) -> None:
    registry.start_canary(SKILL, "1.1.0", steps=(0.1, 0.5, 1.0), actor=ALICE)
    registry.set_canary_traffic(SKILL, 0.3, actor="bob")
    assert registry.status(SKILL).next_step() == 0.5
    registry.advance_canary(SKILL, "1.1.0", actor="canary-check")
    assert stages(registry)["1.1.0"] == ("canary", 0.5)


def test_advancing_refuses_a_canary_without_steps_or_another_version(registry: ModelRegistry) -> None:
    registry.start_canary(SKILL, "1.1.0", 0.1, actor=ALICE)
    with pytest.raises(Conflict, match="without steps"):
        registry.advance_canary(SKILL, "1.1.0", actor="canary-check")
    with pytest.raises(Conflict, match="not the running canary"):
        registry.advance_canary(SKILL, "1.2.0", actor="canary-check")
    registry.abort_canary(SKILL, actor=ALICE)
    with pytest.raises(Conflict):
        registry.advance_canary(SKILL, "1.1.0", actor="canary-check")
    assert registry.status(SKILL).canary is None


@pytest.mark.parametrize(
    "steps, traffic",
    [((0.05,), None), ((0.5, 0.25, 1.0), None), ((0.05, 0.5), None), ((0.0, 1.0), None), ((0.1, 1.5), None), ((0.1, 1.0), 0.2)],
)
def test_rollout_steps_must_increase_to_100_percent(registry: ModelRegistry, steps: tuple[float, ...], traffic: float | None) -> None:
    with pytest.raises(ValidationError) as refused:
        registry.start_canary(SKILL, "1.1.0", traffic, steps=steps, actor=ALICE)
    assert refused.value.problems[0]["field"] == "steps"
    assert registry.status(SKILL).canary is None and actions(registry) == SETUP_ACTIONS


@pytest.mark.parametrize("traffic", [0.0, 1.0, 1.5, -0.1, math.nan])
def test_canary_traffic_must_be_strictly_between_0_and_1(registry: ModelRegistry, traffic: float) -> None:
    with pytest.raises(ValidationError):
        registry.start_canary(SKILL, "1.1.0", traffic, actor=ALICE)
    registry.start_canary(SKILL, "1.1.0", 0.1, actor=ALICE)
    with pytest.raises(ValidationError):
        registry.set_canary_traffic(SKILL, traffic, actor=ALICE)
    assert stages(registry)["1.1.0"] == ("canary", 0.1)


def test_canary_changes_without_a_canary_are_refused(registry: ModelRegistry) -> None:
    for change in (
        lambda: registry.set_canary_traffic(SKILL, 0.2, actor=ALICE),
        lambda: registry.promote_canary(SKILL, actor=ALICE),
        lambda: registry.abort_canary(SKILL, actor=ALICE),
    ):
        with pytest.raises(Conflict, match="no canary running"):
            change()
    assert actions(registry) == SETUP_ACTIONS


def test_a_canary_needs_another_version_in_production(backend: RegistryBackend) -> None:
    registry = ModelRegistry(backend)
    registry.register(SKILL, "1.0.0", trained_at="t", metrics={}, artifact_uri="file:///m/", sha256="0" * 64, checksums={})
    with pytest.raises(Conflict, match="needs another version in production"):
        registry.start_canary(SKILL, "1.0.0", 0.5, actor=ALICE)
    registry.make_production(SKILL, "1.0.0", actor=ALICE)
    with pytest.raises(Conflict, match="needs another version in production"):
        registry.start_canary(SKILL, "1.0.0", 0.5, actor=ALICE)
    with pytest.raises(NotFound):
        registry.start_canary(SKILL, "9.9.9", 0.5, actor=ALICE)


# -- promote, rollback and archive around a canary ---------------------------------------------------------


def test_promoting_another_version_during_a_canary_is_refused(registry: ModelRegistry) -> None:
    registry.start_canary(SKILL, "1.1.0", 0.2, actor=ALICE)
    with pytest.raises(Conflict) as refused:
        registry.make_production(SKILL, "1.2.0", actor=ALICE)
    assert "has a canary running: 1.1.0 at 20%" in refused.value.message and "canary abort" in refused.value.message
    assert stages(registry)["1.2.0"] == ("staging", 0.0)


def test_promoting_the_canary_version_promotes_the_canary(registry: ModelRegistry) -> None:
    registry.start_canary(SKILL, "1.1.0", 0.2, actor=ALICE)
    event = registry.make_production(SKILL, "1.1.0", actor=ALICE)
    assert event is not None and event.action == CANARY_PROMOTE
    assert stages(registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0), "1.2.0": ("staging", 0.0)}
    assert registry.make_production(SKILL, "1.1.0", actor=ALICE) is None  # already production: nothing to record


def test_rollback_during_a_canary_aborts_the_canary_and_records_that(registry: ModelRegistry) -> None:
    registry.make_production(SKILL, "1.1.0", actor=ALICE)
    registry.start_canary(SKILL, "1.2.0", 0.1, actor=ALICE)

    first = registry.revert(SKILL, actor="bob", reason="pager")
    assert first is not None and first.action == CANARY_ABORT
    assert first.note is not None and "rollback during a canary aborts the canary" in first.note
    assert "production 1.1.0 was not rolled back" in first.note
    assert stages(registry) == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0), "1.2.0": ("archived", 0.0)}
    assert registry.history(SKILL)[-1].note == first.note and registry.history(SKILL)[-1].actor == "bob"

    # No canary now: the next rollback rolls production back.
    second = registry.revert(SKILL, actor="bob")
    assert second is not None and second.action == ROLLBACK
    assert moves(second) == [("1.0.0", ("archived", 0.0), ("production", 1.0)), ("1.1.0", ("production", 1.0), ("archived", 0.0))]
    with pytest.raises(Conflict, match="no earlier production version"):
        registry.revert(SKILL, actor="bob")


def test_archive_withdraws_abandons_or_aborts_but_never_archives_production(registry: ModelRegistry) -> None:
    assert moves(registry.archive(SKILL, "1.2.0", actor=ALICE)) == [("1.2.0", ("staging", 0.0), ("archived", 0.0))]
    assert actions(registry)[-1] == ARCHIVE
    assert registry.archive(SKILL, "1.2.0", actor=ALICE) is None
    with pytest.raises(Conflict, match="is in production"):
        registry.archive(SKILL, "1.0.0", actor=ALICE)

    registry.start_canary(SKILL, "1.1.0", 0.1, actor=ALICE)
    aborted = registry.archive(SKILL, "1.1.0", actor=ALICE)
    assert aborted is not None and aborted.action == CANARY_ABORT and aborted.note is not None
    assert stages(registry)["1.0.0"] == ("production", 1.0)

    registry.reserve(SKILL, "2.0.0", trained_at="t", metrics={}, artifact_uri="file:///m/2/", sha256="2" * 64, checksums={}, actor="ci")
    abandoned = registry.archive(SKILL, "2.0.0", actor=ALICE, reason="publisher died")
    assert abandoned is not None and abandoned.action == ABANDON
    assert moves(abandoned) == [("2.0.0", ("reserved", 0.0), ("archived", 0.0))]


# -- publishing in the history ---------------------------------------------------------------------------


def test_publishing_records_reserve_complete_and_abandon(backend: RegistryBackend) -> None:
    registry = ModelRegistry(backend)
    for version in ("1.0.0", "1.1.0"):
        registry.reserve(
            SKILL, version, trained_at="t", metrics={}, artifact_uri=f"file:///m/{version}/", sha256="0" * 64, checksums={},
            actor="ci", reason="nightly retrain", note="a note",
        )
    registry.complete(SKILL, "1.0.0", actor="ci")
    registry.abandon(SKILL, "1.1.0", actor="ci", reason="upload failed")
    registry.abandon(SKILL, "1.0.0", actor="ci")  # not reserved: nothing changes, nothing is recorded
    history = registry.history(SKILL)
    assert [(e.sequence, e.action, e.actor) for e in history] == [
        (1, RESERVE, "ci"), (2, RESERVE, "ci"), (3, COMPLETE, "ci"), (4, ABANDON, "ci"),
    ]
    assert moves(history[0]) == [("1.0.0", None, ("reserved", 0.0))]
    assert (history[0].reason, history[0].note) == ("nightly retrain", "a note")
    assert moves(history[2]) == [("1.0.0", ("reserved", 0.0), ("staging", 0.0))]
    assert moves(history[3]) == [("1.1.0", ("reserved", 0.0), ("archived", 0.0))]
    assert registry.history("creativity") == []


def trained_folder(root: Path, model: bytes) -> Path:
    """A training output folder of SKILL whose model files are `model`-derived bytes: publishable (its
    checksums match its metadata), never loaded here."""
    folder = root / SKILL
    folder.mkdir(parents=True)
    files = {BOOSTER_FILE: b"ubj " + model, ONNX_FILE: b"onnx " + model, SCALER_FILE: b'{"scaler": "%s"}' % model}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    metadata = {
        "schema_version": 2, "skill": SKILL, "version": None, "trained_at": "2030-01-01T00:00:00.000Z",
        "metrics": {"auc": 0.8}, "baseline_metrics": {"auc": 0.7},
        "artifacts": {name: sha256_hex(data) for name, data in files.items()},
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    return folder


class UploadFails(LocalArtifactStore):
    def put(self, key: str, data: bytes) -> str:
        raise StoreUnavailable("the bucket is down")


def test_publishing_identical_model_files_is_refused_unless_forced(backend: RegistryBackend, tmp_path: Path) -> None:
    registry, store = ModelRegistry(backend), LocalArtifactStore(tmp_path / "store")
    folder = trained_folder(tmp_path / "trained", b"model A")
    # A publish whose upload failed was abandoned: its files may be incomplete, so it does not count.
    with pytest.raises(StoreUnavailable):
        publish_version(registry, UploadFails(tmp_path / "down"), folder, actor="ci")
    first = publish_version(registry, store, folder, actor="ci")
    assert first.version == "1.1.0"

    with pytest.raises(AlreadyPublished) as refused:
        publish_version(registry, store, folder, actor="ci")
    assert isinstance(refused.value, Conflict) and refused.value.existing.version == "1.1.0"
    assert "already published as 1.1.0 (staging)" in refused.value.message
    assert refused.value.details == {"skill": SKILL, "existing_version": "1.1.0", "stage": "staging"}
    # metadata.json alone differing (a new trained_at, say) does not make the model new.
    metadata = json.loads((folder / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps({**metadata, "trained_at": "2031-01-01T00:00:00.000Z"}))
    with pytest.raises(AlreadyPublished):
        publish_version(registry, store, folder, actor="ci", version="5.0.0")
    assert [v.version for v in registry.versions(SKILL)] == ["1.0.0", "1.1.0"]

    forced = publish_version(registry, store, folder, force=True, actor="alice", reason="re-upload")
    assert forced.version == "1.2.0" and forced.checksums[ONNX_FILE] == first.checksums[ONNX_FILE]
    reserve = [e for e in registry.history(SKILL) if e.action == RESERVE][-1]
    assert (reserve.actor, reserve.reason, reserve.note) == ("alice", "re-upload", "the same model files as 1.1.0, published again (force)")
    assert publish_version(registry, store, trained_folder(tmp_path / "retrained", b"model B"), actor="ci").version == "1.3.0"
    assert actions(registry) == [RESERVE, ABANDON, RESERVE, COMPLETE, RESERVE, COMPLETE, RESERVE, COMPLETE]


def test_each_skill_has_its_own_history(backend: RegistryBackend) -> None:
    registry = ModelRegistry(backend)
    set_up(registry, SKILL, ("1.0.0", "1.1.0"))
    set_up(registry, "creativity", ("3.0.0",))
    assert [e.sequence for e in registry.history(SKILL)] == [1, 2, 3]
    assert [(e.sequence, e.skill) for e in registry.history("creativity")] == [(1, "creativity"), (2, "creativity")]


# -- a canary promotion racing its abort ------------------------------------------------------------------


class DecideTogether:
    """A registry backend whose updates each hold their first decide until the other racer's decide has
    run too: on Firestore both transactions have read the versions before either writes. On SQLite the
    second racer cannot even begin while the first holds the write lock, so the wait times out (briefly)
    and the updates run one after the other, which is the guarantee there."""

    def __init__(self, inner: RegistryBackend, timeout: float) -> None:
        self.inner = inner
        self.barrier = threading.Barrier(2, timeout=timeout)
        self.local = threading.local()
        self.interleaved = False

    def update(self, skill: str, decide: Decide) -> None:
        def together(stored: list[ModelVersion]) -> Any:
            if not getattr(self.local, "waited", False):
                self.local.waited = True
                try:
                    self.barrier.wait()
                    self.interleaved = True
                except threading.BrokenBarrierError:
                    pass
            return decide(stored)

        self.inner.update(skill, together)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_canary_promotion_racing_its_abort_leaves_one_consistent_state(backend: RegistryBackend) -> None:
    """Several skills at once (the emulator resolves a lock conflict only after about 2 s, so the races
    run side by side): on each, one operator promotes the canary while another aborts it."""
    on_firestore = isinstance(backend, FirestoreRegistryBackend)
    skills = [f"skill-{i:02d}" for i in range(8 if on_firestore else 4)]
    for skill in skills:
        registry = ModelRegistry(backend)
        set_up(registry, skill, ("1.0.0", "1.1.0"))
        registry.start_canary(skill, "1.1.0", 0.2, actor="setup")
    before = {skill: ModelRegistry(backend).history(skill) for skill in skills}
    racers = {skill: DecideTogether(backend, timeout=10.0 if on_firestore else 0.2) for skill in skills}
    outcomes: dict[tuple[str, str], BaseException | None] = {}

    def race(skill: str, who: str) -> None:
        registry = ModelRegistry(racers[skill])
        try:
            if who == "promote":
                registry.promote_canary(skill, actor="promoter", reason="looks good")
            else:
                registry.abort_canary(skill, actor="aborter", reason="looks bad")
            outcomes[skill, who] = None
        except BaseException as exc:  # judged by the test thread
            outcomes[skill, who] = exc

    threads = [threading.Thread(target=race, args=(s, who)) for s in skills for who in ("promote", "abort")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    if on_firestore:
        assert all(r.interleaved for r in racers.values()), "the racers never both read before writing"
    registry = ModelRegistry(backend)
    for skill in skills:
        results = {who: outcomes[skill, who] for who in ("promote", "abort")}
        winners = [who for who, error in results.items() if error is None]
        assert len(winners) == 1, results
        loser_error = next(error for error in results.values() if error is not None)
        assert isinstance(loser_error, Conflict) and "no canary running" in loser_error.message
        state = stages(registry, skill)
        assert [v for v, (stage, _) in state.items() if stage == "production"] in (["1.0.0"], ["1.1.0"])
        if winners == ["promote"]:
            assert state == {"1.0.0": ("archived", 0.0), "1.1.0": ("production", 1.0)}
        else:
            assert state == {"1.0.0": ("production", 1.0), "1.1.0": ("archived", 0.0)}
        history = registry.history(skill)
        assert history[:-1] == before[skill]
        assert [e.sequence for e in history] == list(range(1, len(history) + 1))
        assert (history[-1].action, history[-1].actor) == (
            (CANARY_PROMOTE, "promoter") if winners == ["promote"] else (CANARY_ABORT, "aborter")
        )
