"""The model registry: every version of every skill's model, its stage, which versions serve, and the history of every change."""

from __future__ import annotations

import builtins
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Protocol, Sequence

from shared.clock import now_iso
from shared.errors import Conflict, NotFound, ValidationError
from shared.sqlite import SqliteDatabase

# The stages a version can be in once published.
STAGES = ("staging", "production", "canary", "archived")
# A version being published: its number is taken and its record complete, but its files may not all
# be uploaded yet. Nothing serves it, and promote refuses it; publishing moves it on to staging (or,
# if the upload failed, to archived). The model listing shows it like any stage.
RESERVED = "reserved"
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")

# Who a change is recorded as made by when the caller does not say (the service's own start-up
# publishing, tests); the operator CLI always says.
UNKNOWN_ACTOR = "unknown"

# The actions the history records. A version abandoned mid-publish keeps this action in its history,
# which is how publishing knows its files may be incomplete.
RESERVE = "publish.reserve"
COMPLETE = "publish.complete"
ABANDON = "publish.abandon"
REGISTER = "register"
PROMOTE = "promote"
ARCHIVE = "archive"
TO_STAGING = "stage"
ROLLBACK = "rollback"
CANARY_START = "canary.start"
CANARY_TRAFFIC = "canary.traffic"
CANARY_PROMOTE = "canary.promote"
CANARY_ABORT = "canary.abort"


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a skill's model and where its verified artifacts live."""

    skill: str
    version: str
    stage: str
    traffic: float
    created_at: str
    trained_at: str
    metrics: dict[str, Any]
    artifact_uri: str
    sha256: str  # digest of the whole version folder (artifacts.manifest_digest)
    checksums: dict[str, str] = field(default_factory=dict)  # sha256 of each artifact file
    promoted_at: str | None = None  # when it last became production
    promotion_seq: int = 0  # order of promotions within the skill; 0 once rolled back from (rollback skips it)

    def to_dict(self) -> dict[str, Any]:
        """Returns the version as the model-listing API shows it."""
        return {
            "version": self.version,
            "stage": self.stage,
            "traffic": self.traffic,
            "created_at": self.created_at,
            "trained_at": self.trained_at,
            "metrics": self.metrics,
            "artifact_uri": self.artifact_uri,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class StageChange:
    stage: str
    traffic: float
    promoted_at: str | None
    promotion_seq: int


@dataclass(frozen=True)
class VersionState:
    """A version's stage and share of traffic at one moment."""

    stage: str
    traffic: float

    def describe(self) -> str:
        return f"{self.stage} {percent(self.traffic)}" if self.stage in ("production", "canary") else self.stage


@dataclass(frozen=True)
class Transition:
    """How one change moved one version; `before` is None for a version the change registered."""

    version: str
    before: VersionState | None
    after: VersionState
    plan: tuple[float, ...] = ()  # a gradual rollout's traffic steps, set when a canary starts with them

    def describe(self) -> str:
        steps = f" (steps {', '.join(percent(s) for s in self.plan)})" if self.plan else ""
        return f"{self.version}: {self.before.describe() if self.before else 'new'} -> {self.after.describe()}{steps}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "before": asdict(self.before) if self.before else None,
            "after": asdict(self.after),
        }
        if self.plan:
            data["plan"] = list(self.plan)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        before = data.get("before")
        after = data["after"]
        return cls(
            version=data["version"],
            before=VersionState(before["stage"], float(before["traffic"])) if before else None,
            after=VersionState(after["stage"], float(after["traffic"])),
            plan=tuple(float(s) for s in data.get("plan") or ()),
        )


@dataclass(frozen=True)
class HistoryEvent:
    """One entry of a skill's append-only registry history: who changed what, when, why, from what to what.

    `sequence` numbers a skill's events 1, 2, 3... in the order they were committed; the backend gives
    it when it writes the event (None on an event not yet written).
    """

    skill: str
    at: str
    action: str
    actor: str
    reason: str | None
    changes: tuple[Transition, ...]
    note: str | None = None  # what the action meant here, when the action alone does not say
    sequence: int | None = None

    def describe(self) -> str:
        """Returns the changes as one line, e.g. `1.1.0: canary 10% -> production 100%; 1.0.0: production 90% -> archived`."""
        return "; ".join(t.describe() for t in self.changes) or "no change"

    def to_dict(self) -> dict[str, Any]:
        return {
            "skill": self.skill,
            "sequence": self.sequence,
            "at": self.at,
            "action": self.action,
            "actor": self.actor,
            "reason": self.reason,
            "note": self.note,
            "changes": [t.to_dict() for t in self.changes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistoryEvent:
        return cls(
            skill=data["skill"],
            sequence=data.get("sequence"),
            at=data["at"],
            action=data["action"],
            actor=data["actor"],
            reason=data.get("reason"),
            note=data.get("note"),
            changes=tuple(Transition.from_dict(t) for t in data.get("changes") or []),
        )


@dataclass(frozen=True)
class Decision:
    """What one registry transaction writes: the stage changes, and the history event recording them."""

    changes: Mapping[str, StageChange]
    event: HistoryEvent | None = None


# Given a skill's versions as stored, returns the stage changes to apply, alone or as a Decision with
# the history event that records them (or raises to change nothing).
Decide = Callable[[list[ModelVersion]], Mapping[str, StageChange] | Decision]


def as_decision(decided: Mapping[str, StageChange] | Decision) -> Decision:
    """Returns what a Decide returned as a Decision (plain changes record no event)."""
    return decided if isinstance(decided, Decision) else Decision(decided)


def percent(traffic: float) -> str:
    return f"{traffic * 100:.4g}%"


def _keep(version: ModelVersion, stage: str, traffic: float) -> StageChange:
    return StageChange(stage, traffic, version.promoted_at, version.promotion_seq)


def transitions(
    stored: list[ModelVersion], changes: Mapping[str, StageChange], plans: Mapping[str, tuple[float, ...]] | None = None
) -> tuple[Transition, ...]:
    """Returns the stage or traffic moves `changes` makes to the stored versions, oldest version first,
    each with the rollout plan `plans` gives its version."""
    moves = []
    for version in stored:
        change = changes.get(version.version)
        if change is not None and (change.stage, change.traffic) != (version.stage, version.traffic):
            moves.append(
                Transition(
                    version.version, VersionState(version.stage, version.traffic), VersionState(change.stage, change.traffic),
                    (plans or {}).get(version.version, ()),
                )
            )
    return tuple(moves)


class RegistryBackend(Protocol):
    """Storage of model versions and of the registry's history; the registry's rules live in ModelRegistry, not here."""

    def insert(self, version: ModelVersion, event: HistoryEvent | None = None) -> None:
        """Adds a version, and appends `event` to the skill's history in the same transaction; raises
        Conflict (writing neither) if the skill already has that version."""
        ...

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        """Returns the versions of one skill, or of all skills, oldest first."""
        ...

    def update(self, skill: str, decide: Decide) -> None:
        """Reads the skill's versions and applies the changes `decide` returns, in one transaction, so
        two operators promoting at once cannot both win; if decide raises, nothing changes. When decide
        returns a Decision with an event, the event is appended to the skill's history in that same
        transaction, numbered after the skill's last one: a change and its record land together or not at all."""
        ...

    def history(self, skill: str) -> builtins.list[HistoryEvent]:  # (`list` names a method in this class)
        """Returns the skill's history events in the order they were committed (sequence 1, 2, ...)."""
        ...


def parse_semver(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if not match:
        raise ValidationError([{"field": "version", "problem": "must be a semantic version MAJOR.MINOR.PATCH"}])
    return int(match[1]), int(match[2]), int(match[3])


@dataclass(frozen=True)
class Rollout:
    """A skill's serving state: its production version, its canary if one runs, since when, and its last change."""

    skill: str
    production: ModelVersion | None
    production_since: str | None
    canary: ModelVersion | None
    canary_since: str | None
    last_change: HistoryEvent | None
    canary_plan: tuple[float, ...] = ()  # the canary's traffic steps when it rolls out gradually

    def next_step(self) -> float | None:
        """Returns the canary's next share of traffic in its plan (1.0: promotion), or None without a plan."""
        if self.canary is None or not self.canary_plan:
            return None
        return next((step for step in self.canary_plan if step > self.canary.traffic + 1e-9), 1.0)

    def to_dict(self) -> dict[str, Any]:
        def serving(version: ModelVersion | None, since: str | None) -> dict[str, Any] | None:
            return None if version is None else {"version": version.version, "traffic": version.traffic, "since": since}

        return {
            "skill": self.skill,
            "production": serving(self.production, self.production_since),
            "canary": serving(self.canary, self.canary_since),
            "canary_plan": list(self.canary_plan),
            "canary_next_step": self.next_step(),
            "last_change": self.last_change.to_dict() if self.last_change else None,
        }


@dataclass(frozen=True)
class _Step:
    """What a registry rule decided: the action to record, the changes, and a note when the action alone does not say."""

    action: str
    changes: dict[str, StageChange]
    note: str | None = None
    plans: dict[str, tuple[float, ...]] = field(default_factory=dict)  # a rollout plan set for a version


Rule = Callable[[list[ModelVersion]], _Step]


class ModelRegistry:
    """Registers, promotes, canaries and rolls back versions, recording each change in the skill's history;
    answers which versions serve each skill.

    Every change is one `RegistryBackend.update` transaction: a rule reads the skill's versions as
    stored, decides, and the changes and their history event are written together.
    """

    def __init__(self, backend: RegistryBackend) -> None:
        self.backend = backend

    # -- reading --------------------------------------------------------------------------------------

    def versions(self, skill: str | None = None) -> list[ModelVersion]:
        return self.backend.list(skill)

    def get(self, skill: str, version: str) -> ModelVersion:
        for candidate in self.backend.list(skill):
            if candidate.version == version:
                return candidate
        raise NotFound(f"Skill {skill!r} has no version {version!r}.")

    def next_version(self, skill: str, bump: str = "minor") -> str:
        """Returns the version after the skill's highest one (1.0.0 for the first)."""
        existing = [parse_semver(v.version) for v in self.backend.list(skill)]
        if not existing:
            return "1.0.0"
        major, minor, patch = max(existing)
        if bump == "major":
            return f"{major + 1}.0.0"
        if bump == "patch":
            return f"{major}.{minor}.{patch + 1}"
        return f"{major}.{minor + 1}.0"

    def history(self, skill: str) -> list[HistoryEvent]:
        """Returns the skill's registry history, oldest first."""
        return self.backend.history(skill)

    def status(self, skill: str) -> Rollout:
        """Returns the skill's production version and canary, with the time each entered its stage
        (from the history; a production version older than the history falls back to its promoted_at)."""
        versions = self.backend.list(skill)
        events = self.backend.history(skill)
        production, canary = _serving(versions)

        def since(version: ModelVersion | None) -> str | None:
            if version is None:
                return None
            for event in reversed(events):
                for move in event.changes:
                    entered = move.before is None or move.before.stage != move.after.stage
                    if move.version == version.version and move.after.stage == version.stage and entered:
                        return event.at
            return version.promoted_at if version.stage == "production" else None

        def plan(version: ModelVersion | None) -> tuple[float, ...]:
            # The plan is set by the canary's start: the last event that moved this version into canary.
            if version is None:
                return ()
            for event in reversed(events):
                for move in event.changes:
                    started = move.before is None or move.before.stage != "canary"
                    if move.version == version.version and move.after.stage == "canary" and started:
                        return move.plan
            return ()

        return Rollout(
            skill, production, since(production), canary, since(canary), events[-1] if events else None, plan(canary)
        )

    def serving(self) -> dict[str, list[ModelVersion]]:
        """Returns, per skill with any, the versions that serve traffic: production first, then a canary."""
        result: dict[str, list[ModelVersion]] = {}
        for version in self.backend.list():
            if version.stage in ("production", "canary"):
                result.setdefault(version.skill, []).append(version)
        for versions in result.values():
            versions.sort(key=lambda v: v.stage != "production")
        return result

    # -- publishing -----------------------------------------------------------------------------------

    def register(
        self,
        skill: str,
        version: str,
        *,
        trained_at: str,
        metrics: dict[str, Any],
        artifact_uri: str,
        sha256: str,
        checksums: dict[str, str],
        actor: str = UNKNOWN_ACTOR,
        reason: str | None = None,
    ) -> ModelVersion:
        """Records a new version in stage `staging`; raises Conflict if it exists."""
        record = _new_version(skill, version, "staging", trained_at, metrics, artifact_uri, sha256, checksums)
        self.backend.insert(record, _registered(record, REGISTER, actor, reason, None))
        return record

    def reserve(
        self,
        skill: str,
        version: str,
        *,
        trained_at: str,
        metrics: dict[str, Any],
        artifact_uri: str,
        sha256: str,
        checksums: dict[str, str],
        actor: str = UNKNOWN_ACTOR,
        reason: str | None = None,
        note: str | None = None,
    ) -> ModelVersion:
        """Records a version's complete record in stage `reserved`, before its files are uploaded.

        The insert is one transaction, with its history event, so of two publishers of one version
        exactly one gets it; the other gets Conflict, having written nothing. Returns the reserved record.
        """
        record = _new_version(skill, version, RESERVED, trained_at, metrics, artifact_uri, sha256, checksums)
        self.backend.insert(record, _registered(record, RESERVE, actor, reason, note))
        return record

    def complete(self, skill: str, version: str, *, actor: str = UNKNOWN_ACTOR, reason: str | None = None) -> ModelVersion:
        """Moves a reserved version, its files now uploaded, to `staging`; returns it.

        Raises Conflict if it is no longer reserved (an operator archived it meanwhile).
        """

        def rule(stored: list[ModelVersion]) -> _Step:
            target = _find(stored, skill, version)
            if target.stage != RESERVED:
                raise Conflict(f"{skill} {version} is no longer reserved (it is {target.stage}); its publishing was abandoned.")
            return _Step(COMPLETE, {version: _keep(target, "staging", 0.0)})

        self._change(skill, rule, actor, reason)
        return self.get(skill, version)

    def abandon(self, skill: str, version: str, *, actor: str = UNKNOWN_ACTOR, reason: str | None = None) -> None:
        """Archives a reserved version whose upload failed, so its number is never reused with other
        files; a version in any other stage is left as it is."""

        def rule(stored: list[ModelVersion]) -> _Step:
            target = next((v for v in stored if v.version == version), None)
            if target is None or target.stage != RESERVED:
                return _Step(ABANDON, {})
            return _Step(ABANDON, {version: _keep(target, "archived", 0.0)})

        self._change(skill, rule, actor, reason)

    # -- operator changes: each returns the history event it recorded (None if nothing changed) -------

    def make_production(self, skill: str, version: str, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Makes a version the skill's production version at full traffic; the previous one is archived.

        Promoting the running canary is `promote_canary`. Raises NotFound; Conflict if the version is
        still being published, or if a canary of another version runs (end it first: promoting a third
        version would leave the canary comparing against a production it was never compared with).
        """
        return self._change(skill, lambda stored: _to_production(stored, skill, version), actor, reason)

    def archive(self, skill: str, version: str, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Archives a version: a staging one is withdrawn, a reserved one has its publishing abandoned,
        the running canary is aborted (production takes all traffic back). Raises NotFound; Conflict for
        the production version (promote another version or roll back instead)."""
        return self._change(skill, lambda stored: _to_shelf(stored, skill, version, "archived"), actor, reason)

    def start_canary(
        self, skill: str, version: str, traffic: float | None = None, *, steps: Sequence[float] = (), actor: str,
        reason: str | None = None,
    ) -> HistoryEvent | None:
        """Starts a canary: `version` takes `traffic` (0 < traffic < 1) from production. With `steps` (a
        gradual rollout: increasing shares ending at 1.0, e.g. 0.05, 0.25, 0.5, 1.0) it starts at the first
        step, each passing canary check moves it to the next (`advance_canary`), and the last promotes it.

        Raises ValidationError for the traffic or steps; NotFound; Conflict if a canary already runs (one
        at a time: set its traffic, promote it or abort it), if no other version is in production, or if
        the version is still being published.
        """
        plan = check_rollout_steps(steps, traffic) if steps else ()
        first = plan[0] if plan else traffic
        if first is None:
            raise ValidationError([{"field": "traffic", "problem": "a canary needs a share of traffic, or steps"}])
        share: float = first
        _check_canary_traffic(share)

        def rule(stored: list[ModelVersion]) -> _Step:
            step = _start_canary(stored, skill, version, share)
            return replace(step, plans={version: plan}) if plan else step

        return self._change(skill, rule, actor, reason)

    def advance_canary(self, skill: str, version: str, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Moves the canary `version` of a gradual rollout to its plan's next step; the last step promotes
        it. Raises Conflict if `version` is not the running canary, it has no plan, or it changed meanwhile."""
        rollout = self.status(skill)
        if rollout.canary is None or rollout.canary.version != version:
            raise Conflict(f"{skill} {version} is not the running canary, so it cannot advance.")
        next_step = rollout.next_step()
        if next_step is None:
            raise Conflict(f"The canary {skill} {version} was started without steps; promote it with `canary promote {skill}`.")
        target: float = next_step
        seen = rollout.canary.traffic
        position = f"step {rollout.canary_plan.index(target) + 1} of {len(rollout.canary_plan)}" if target in rollout.canary_plan else "last step"

        def rule(stored: list[ModelVersion]) -> _Step:
            production, canary = _running_canary(stored, skill, "advance it")
            if canary.version != version or canary.traffic != seen:
                raise Conflict(f"The canary of {skill} changed while it was being advanced; nothing was changed.")
            if target >= 1.0:
                return replace(_promote_canary(stored, production, canary), note=f"{position} of a gradual rollout: promoted")
            return _Step(
                CANARY_TRAFFIC,
                {
                    canary.version: _keep(canary, "canary", target),
                    production.version: _keep(production, "production", round(1.0 - target, 6)),
                },
                f"{position} of a gradual rollout: {percent(target)}",
            )

        return self._change(skill, rule, actor, reason)

    def set_canary_traffic(self, skill: str, traffic: float, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Gives the running canary `traffic` (0 < traffic < 1) and production the rest. Raises
        ValidationError; Conflict if no canary runs."""
        _check_canary_traffic(traffic)

        def rule(stored: list[ModelVersion]) -> _Step:
            production, canary = _running_canary(stored, skill, "change its traffic")
            if canary.traffic == traffic:
                return _Step(CANARY_TRAFFIC, {})
            return _Step(
                CANARY_TRAFFIC,
                {
                    canary.version: _keep(canary, "canary", traffic),
                    production.version: _keep(production, "production", round(1.0 - traffic, 6)),
                },
            )

        return self._change(skill, rule, actor, reason)

    def promote_canary(self, skill: str, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Makes the running canary production at full traffic and archives the old production version.
        Raises Conflict if no canary runs."""
        return self._change(
            skill, lambda stored: _promote_canary(stored, *_running_canary(stored, skill, "promote it")), actor, reason
        )

    def abort_canary(self, skill: str, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Archives the running canary and gives production all traffic back. Raises Conflict if no canary runs."""
        return self._change(
            skill, lambda stored: _abort_canary(*_running_canary(stored, skill, "abort it"), "canary"), actor, reason
        )

    def revert(self, skill: str, *, actor: str, reason: str | None = None) -> HistoryEvent | None:
        """Undoes the skill's latest rollout step, as the operator's `rollback` means it: while a canary
        runs, the canary is aborted (production, which never stopped serving, takes all traffic back, and
        the event's note says so); otherwise the previous production version is restored (see rollback).
        Raises Conflict when there is nothing to roll back."""

        def rule(stored: list[ModelVersion]) -> _Step:
            production, canary = _serving(stored)
            if production is not None and canary is not None:
                return _abort_canary(production, canary, "rollback")
            return _rollback(stored, skill)

        return self._change(skill, rule, actor, reason)

    # -- the older entry points, kept for their callers: they return the version ----------------------

    def promote(
        self,
        skill: str,
        version: str,
        stage: str = "production",
        traffic: float | None = None,
        *,
        actor: str = UNKNOWN_ACTOR,
        reason: str | None = None,
    ) -> ModelVersion:
        """Moves a version to a stage and returns it: production is `make_production`, canary
        `start_canary` (with `traffic`), staging or archived withdraw it (a canary so withdrawn is aborted;
        a reserved version can only be archived, which abandons its publishing).
        Raises NotFound, ValidationError, or Conflict when the move would leave no production version,
        the version is still being published, or a canary runs.
        """
        if stage not in STAGES:
            raise ValidationError([{"field": "stage", "problem": f"must be one of {', '.join(STAGES)}"}])
        if stage == "production":
            self.make_production(skill, version, actor=actor, reason=reason)
        elif stage == "canary":
            if traffic is None:
                raise ValidationError([{"field": "traffic", "problem": "a canary needs traffic between 0 and 1"}])
            self.start_canary(skill, version, traffic, actor=actor, reason=reason)
        else:
            self._change(skill, lambda stored: _to_shelf(stored, skill, version, stage), actor, reason)
        return self.get(skill, version)

    def rollback(self, skill: str, *, actor: str = UNKNOWN_ACTOR, reason: str | None = None) -> ModelVersion:
        """Archives the production version and restores the one promoted before it; returns that one.

        A running canary keeps its share (the operator's `rollback` is `revert`, which aborts it
        instead). The version rolled back from is never a rollback target again, so rolling back twice
        walks further back. Raises Conflict if there is no production version or none earlier.
        """
        event = self._change(skill, lambda stored: _rollback(stored, skill), actor, reason)
        assert event is not None  # a rollback always changes something, or raises
        restored = next(t.version for t in event.changes if t.after.stage == "production")
        return self.get(skill, restored)

    # -- the transaction ------------------------------------------------------------------------------

    def _change(self, skill: str, rule: Rule, actor: str, reason: str | None) -> HistoryEvent | None:
        """Runs `rule` on the skill's stored versions in one backend transaction, writing its changes and
        the history event recording them together; returns that event (None if the rule changed nothing)."""
        written: list[HistoryEvent | None] = [None]

        def decide(stored: list[ModelVersion]) -> Decision:
            step = rule(stored)
            event = None
            if step.changes:
                event = HistoryEvent(
                    skill=skill, at=now_iso(), action=step.action, actor=actor, reason=reason or None,
                    changes=transitions(stored, step.changes, step.plans), note=step.note,
                )
            written[0] = event  # decide runs again when a transaction retries: the last run is what commits
            return Decision(step.changes, event)

        self.backend.update(skill, decide)
        return written[0]


# -- the rules: pure functions of a skill's stored versions -------------------------------------------


def _new_version(
    skill: str, version: str, stage: str, trained_at: str, metrics: dict[str, Any], artifact_uri: str, sha256: str,
    checksums: dict[str, str],
) -> ModelVersion:
    parse_semver(version)
    return ModelVersion(
        skill=skill, version=version, stage=stage, traffic=0.0, created_at=now_iso(), trained_at=trained_at,
        metrics=metrics, artifact_uri=artifact_uri, sha256=sha256, checksums=checksums,
    )


def _registered(record: ModelVersion, action: str, actor: str, reason: str | None, note: str | None) -> HistoryEvent:
    return HistoryEvent(
        skill=record.skill, at=record.created_at, action=action, actor=actor, reason=reason or None,
        changes=(Transition(record.version, None, VersionState(record.stage, record.traffic)),), note=note,
    )


def check_rollout_steps(steps: Sequence[float], traffic: float | None = None) -> tuple[float, ...]:
    """Returns a gradual rollout's steps as shares of traffic; raises ValidationError unless they increase,
    each within (0, 1], the last is 1.0 (promotion), and `traffic`, if given, is the first."""
    plan = tuple(round(float(s), 6) for s in steps)
    problem = None
    if len(plan) < 2:
        problem = "a gradual rollout needs at least two steps, the last one 100%"
    elif any(not 0.0 < s <= 1.0 for s in plan) or any(b <= a for a, b in zip(plan, plan[1:])):
        problem = "steps must increase, each above 0% and at most 100%"
    elif plan[-1] != 1.0:
        problem = "the last step must be 100% (it promotes the canary)"
    elif traffic is not None and traffic != plan[0]:
        problem = f"traffic {percent(traffic)} differs from the first step {percent(plan[0])}: give one of them"
    if problem:
        raise ValidationError([{"field": "steps", "problem": problem}])
    return plan


def _check_canary_traffic(traffic: float) -> None:
    if not 0.0 < traffic < 1.0:
        raise ValidationError([{"field": "traffic", "problem": "a canary needs traffic between 0 and 1 (exclusive)"}])


def _find(stored: list[ModelVersion], skill: str, version: str) -> ModelVersion:
    target = next((v for v in stored if v.version == version), None)
    if target is None:
        raise NotFound(f"Skill {skill!r} has no version {version!r}.")
    return target


def _serving(stored: list[ModelVersion]) -> tuple[ModelVersion | None, ModelVersion | None]:
    production = next((v for v in stored if v.stage == "production"), None)
    canary = next((v for v in stored if v.stage == "canary"), None)
    return production, canary


def _running_canary(stored: list[ModelVersion], skill: str, to: str) -> tuple[ModelVersion, ModelVersion]:
    production, canary = _serving(stored)
    if canary is None or production is None:
        raise Conflict(f"Skill {skill!r} has no canary running, so there is none to {to}.")
    return production, canary


def _refuse_reserved(target: ModelVersion, skill: str) -> None:
    if target.stage == RESERVED:
        raise Conflict(
            f"{skill} {target.version} is still being published (stage {RESERVED}); promote it once its upload has finished."
        )


def _next_seq(stored: list[ModelVersion]) -> int:
    return max((v.promotion_seq for v in stored), default=0) + 1


def _to_production(stored: list[ModelVersion], skill: str, version: str) -> _Step:
    target = _find(stored, skill, version)
    _refuse_reserved(target, skill)
    production, canary = _serving(stored)
    if target.stage == "production":
        return _Step(PROMOTE, {})
    if canary is not None and production is not None:
        if canary.version == version:
            return replace(_promote_canary(stored, production, canary), note="promote of the running canary")
        raise Conflict(
            f"Skill {skill!r} has a canary running: {canary.version} at {percent(canary.traffic)} beside production "
            f"{production.version}. End it before promoting another version: `canary promote {skill}` makes "
            f"{canary.version} production, `canary abort {skill}` withdraws it."
        )
    changes: dict[str, StageChange] = {}
    if production is not None:
        changes[production.version] = _keep(production, "archived", 0.0)
    changes[version] = StageChange("production", 1.0, now_iso(), _next_seq(stored))
    return _Step(PROMOTE, changes)


def _to_shelf(stored: list[ModelVersion], skill: str, version: str, stage: str) -> _Step:
    """Moves a version to staging or archived, where it serves nothing."""
    target = _find(stored, skill, version)
    if target.stage == RESERVED:
        if stage != "archived":
            _refuse_reserved(target, skill)
        return _Step(ABANDON, {version: _keep(target, "archived", 0.0)}, "archived while being published: its publishing is abandoned")
    if target.stage == "production":
        raise Conflict(f"{skill} {version} is in production; promote another version or roll back instead.")
    production, canary = _serving(stored)
    if canary is not None and production is not None and canary.version == version:
        return _abort_canary(production, canary, stage)
    if target.stage == stage:
        return _Step(ARCHIVE if stage == "archived" else TO_STAGING, {})
    return _Step(ARCHIVE if stage == "archived" else TO_STAGING, {version: _keep(target, stage, 0.0)})


def _start_canary(stored: list[ModelVersion], skill: str, version: str, traffic: float) -> _Step:
    target = _find(stored, skill, version)
    _refuse_reserved(target, skill)
    production, canary = _serving(stored)
    if canary is not None:
        raise Conflict(
            f"Skill {skill!r} already has a canary running: {canary.version} at {percent(canary.traffic)}. "
            f"One canary at a time: end it first with `canary promote {skill}` or `canary abort {skill}` "
            f"(or change its share with `canary set {skill} --traffic T`)."
        )
    if production is None or production.version == version:
        raise Conflict(f"Skill {skill!r} needs another version in production before a canary.")
    return _Step(
        CANARY_START,
        {
            version: _keep(target, "canary", traffic),
            production.version: _keep(production, "production", round(1.0 - traffic, 6)),
        },
    )


def _promote_canary(stored: list[ModelVersion], production: ModelVersion, canary: ModelVersion) -> _Step:
    return _Step(
        CANARY_PROMOTE,
        {
            production.version: _keep(production, "archived", 0.0),
            canary.version: StageChange("production", 1.0, now_iso(), _next_seq(stored)),
        },
    )


def _abort_canary(production: ModelVersion, canary: ModelVersion, by: str) -> _Step:
    """Withdraws the canary (to archived, or staging when so asked) and gives production all traffic back;
    `by` is what asked: the canary command, a rollback, or a move of the canary's stage."""
    to = "staging" if by == "staging" else "archived"
    if by == "canary":
        note = None
    elif by == "rollback":
        note = f"rollback during a canary aborts the canary; production {production.version} was not rolled back"
    else:
        note = f"the running canary was moved to {to}, which aborts it"
    return _Step(
        CANARY_ABORT,
        {canary.version: _keep(canary, to, 0.0), production.version: _keep(production, "production", 1.0)},
        note,
    )


def _rollback(stored: list[ModelVersion], skill: str) -> _Step:
    production, canary = _serving(stored)
    if production is None:
        raise Conflict(f"Skill {skill!r} has no version in production to roll back.")
    earlier = [
        v for v in stored if v.version != production.version and v.promotion_seq > 0 and v.stage in ("archived", "staging")
    ]
    if not earlier:
        raise Conflict(f"Skill {skill!r} has no earlier production version to roll back to.")
    previous = max(earlier, key=lambda v: v.promotion_seq)
    canary_traffic = canary.traffic if canary else 0.0
    return _Step(
        ROLLBACK,
        {
            production.version: StageChange("archived", 0.0, production.promoted_at, 0),
            previous.version: StageChange("production", round(1.0 - canary_traffic, 6), now_iso(), _next_seq(stored)),
        },
    )


# -- the SQLite backend --------------------------------------------------------------------------------

_REGISTRY_DDL = """
CREATE TABLE IF NOT EXISTS model_versions (
    skill TEXT NOT NULL,
    version TEXT NOT NULL,
    stage TEXT NOT NULL,
    traffic REAL NOT NULL,
    created_at TEXT NOT NULL,
    trained_at TEXT NOT NULL,
    metrics TEXT NOT NULL,
    artifact_uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    checksums TEXT NOT NULL,
    promoted_at TEXT,
    promotion_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (skill, version)
)
"""

# Append-only: rows are inserted in the transaction of the change they record, and never updated or deleted.
_HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS registry_history (
    skill TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT,
    note TEXT,
    changes TEXT NOT NULL,
    PRIMARY KEY (skill, sequence)
)
"""


class SqliteRegistryBackend:
    """Model versions and the registry history in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("model_versions", _REGISTRY_DDL)
        db.ensure_schema("registry_history", _HISTORY_DDL)

    def insert(self, version: ModelVersion, event: HistoryEvent | None = None) -> None:
        row = asdict(version)
        row["metrics"] = json.dumps(version.metrics)
        row["checksums"] = json.dumps(version.checksums)
        with self.db.transaction() as conn:
            exists = conn.execute(
                "SELECT 1 FROM model_versions WHERE skill = ? AND version = ?", (version.skill, version.version)
            ).fetchone()
            if exists:
                raise Conflict(f"Skill {version.skill!r} already has version {version.version!r}.")
            columns = ", ".join(row)
            conn.execute(
                f"INSERT INTO model_versions ({columns}) VALUES ({', '.join('?' for _ in row)})", list(row.values())  # nosec B608 # columns: ModelVersion's field names; values bound
            )
            if event is not None:
                _append(conn, event)

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        if skill is None:
            rows = self.db.query("SELECT * FROM model_versions ORDER BY skill, created_at, rowid")
        else:
            rows = self.db.query("SELECT * FROM model_versions WHERE skill = ? ORDER BY created_at, rowid", (skill,))
        return [_version_from_row(dict(r)) for r in rows]

    def update(self, skill: str, decide: Decide) -> None:
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM model_versions WHERE skill = ? ORDER BY created_at, rowid", (skill,)
            ).fetchall()
            decision = as_decision(decide([_version_from_row(dict(r)) for r in rows]))
            for version, change in decision.changes.items():
                conn.execute(
                    "UPDATE model_versions SET stage = ?, traffic = ?, promoted_at = ?, promotion_seq = ? "
                    "WHERE skill = ? AND version = ?",
                    (change.stage, change.traffic, change.promoted_at, change.promotion_seq, skill, version),
                )
            if decision.event is not None:
                _append(conn, decision.event)

    def history(self, skill: str) -> builtins.list[HistoryEvent]:  # (`list` names a method in this class)
        rows = self.db.query("SELECT * FROM registry_history WHERE skill = ? ORDER BY sequence", (skill,))
        return [HistoryEvent.from_dict({**dict(r), "changes": json.loads(r["changes"])}) for r in rows]


def _append(conn: Any, event: HistoryEvent) -> None:
    """Appends an event to its skill's history, numbered after the last one (the caller's transaction
    holds the database's write lock, so no other writer can take the same number)."""
    (last,) = conn.execute("SELECT COALESCE(MAX(sequence), 0) FROM registry_history WHERE skill = ?", (event.skill,)).fetchone()
    conn.execute(
        "INSERT INTO registry_history (skill, sequence, at, action, actor, reason, note, changes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.skill, last + 1, event.at, event.action, event.actor, event.reason, event.note,
            json.dumps([t.to_dict() for t in event.changes]),
        ),
    )


def _version_from_row(row: dict[str, Any]) -> ModelVersion:
    row["metrics"] = json.loads(row["metrics"])
    row["checksums"] = json.loads(row["checksums"])
    return ModelVersion(**row)


def listing(registry: ModelRegistry, skills: list[str]) -> list[dict[str, Any]]:
    """Returns the model-listing API's view of the named skills, from the registry alone."""
    by_skill: dict[str, list[ModelVersion]] = {skill: [] for skill in skills}
    for version in registry.versions(skills[0] if len(skills) == 1 else None):
        if version.skill in by_skill:
            by_skill[version.skill].append(version)
    return [
        {
            "skill": skill,
            "deployed_version": next((v.version for v in versions if v.stage == "production"), None),
            "versions": [v.to_dict() for v in versions],
        }
        for skill, versions in by_skill.items()
    ]
