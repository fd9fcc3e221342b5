"""Canary checks: each running canary compared with its production version over a window, and the decision
(promote, hold or rollback) with its reasons; a tripped guardrail aborts the canary through the registry."""

from __future__ import annotations

import logging
import math

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import numpy as np

from shared.drift import gather_window, unknown_skills_problem
from shared.drift_statistics import fisher_z_difference, pearson
from shared.errors import Conflict
from shared.registry import CANARY_PROMOTE
from shared.metrics import REQUEST_COUNT, REQUEST_LATENCY, Distribution, MetricsReader, TimeSeriesData, open_metrics_reader
from shared.profiles import PREDICTION, model_profile, utc_day
from shared.request_fields import CANARY_SKILLS, WINDOW_DAYS, WINDOW_MINUTES, RequestFields
from shared.services import Services
from shared.settings import Settings
from shared.skill_model import SkillModel

log = logging.getLogger(__name__)

ACTOR = "canary-check"
PROMOTE, HOLD, ROLLBACK = "promote", "hold", "rollback"


@dataclass(frozen=True)
class Guardrails:
    """The limits a canary must stay within, and how much data a judgement needs (settings CANARY_*)."""

    max_error_ratio: float = 2.0  # canary error rate over production's
    max_p99_ratio: float = 1.5  # canary p99 latency over production's
    min_p99_increase_ms: float = 5.0  # and by at least this much: below it a ratio of sub-millisecond p99s is noise
    max_psi: float = 0.25  # PSI of the canary's scores against production's
    alpha: float = 0.05  # one-sided level of "r with teachers significantly worse"
    min_requests: int = 100  # requests per version before error rate and latency are judged
    min_students: int = 100  # scored students per version before the score distribution is judged
    min_rated: int = 30  # rated and scored students per version before the teacher correlation is judged

    @classmethod
    def from_settings(cls, settings: Settings) -> Guardrails:
        # Read by name with the defaults above, so the check runs before the CANARY_* settings exist.
        default = cls()
        return cls(
            **{name: getattr(settings, f"canary_{name}", getattr(default, name)) for name in asdict(default)},
        )


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def days(self) -> list[str]:
        first = self.start.date()
        return [utc_day(datetime(first.year, first.month, first.day, tzinfo=timezone.utc) + timedelta(days=d))
                for d in range((self.end.date() - first).days + 1)]


def run_canary_check(
    services: Services,
    window_minutes: int | None = None,
    window_days: int | None = None,
    skills: Sequence[str] | None = None,
    *,
    reader: MetricsReader | None = None,
    guardrails: Guardrails | None = None,
    now: datetime | None = None,
    act: bool = True,
) -> dict[str, Any]:
    """Compares each running canary (of `skills`, default all) with production over the window (minutes,
    or days; default one day) and decides per skill. With `act`, a rollback decision aborts the canary
    through the registry (actor `canary-check`, the reasons as reason), so the history records it; and a
    promote decision on a gradual rollout (a canary started with steps) moves it to its next step, the
    last step promoting it. A promote decision on a canary without steps changes nothing: promoting it
    is the operator's call.

    Returns {"window", "guardrails", "skills": [...]}. A metrics reader of None means the service's own
    (open_metrics_reader); when there is none, error rate and latency are not judged and the check holds.
    """
    now = now or datetime.now(timezone.utc)
    minutes = window_minutes if window_minutes is not None else (window_days or 1) * 1440
    window = Window(now - timedelta(minutes=minutes), now)
    guardrails = guardrails or Guardrails.from_settings(services.settings)
    reader = reader if reader is not None else open_metrics_reader(services.settings)
    results = []
    services.engine.refresh(force=True)
    for skill in skills or services.catalog.names:
        rollout = services.registry.status(skill)
        if rollout.canary is None or rollout.production is None:
            continue
        deployment = services.engine.deployment(skill)
        if deployment.canary is None or deployment.canary.version != rollout.canary.version:
            results.append({
                "skill": skill, "production": rollout.production.version, "canary": rollout.canary.version,
                "decision": HOLD, "reasons": ["the canary is not loaded by this process; see /healthz"], "action": None,
            })
            continue
        result = compare(services, deployment.production, deployment.canary, window, guardrails, reader)
        result["canary_traffic"] = rollout.canary.traffic
        result["canary_plan"] = list(rollout.canary_plan)
        result["action"] = None
        if act and result["decision"] == ROLLBACK:
            result["action"] = _abort(services, skill, result["reasons"])
        elif act and result["decision"] == PROMOTE and rollout.canary_plan:
            result["action"] = _advance(services, skill, rollout.canary.version, result["reasons"])
        log.log(
            logging.WARNING if result["decision"] == ROLLBACK else logging.INFO,
            f"canary check: {result['decision']}",
            extra={"skill": skill, "canary": result["canary"], "production": result["production"], "reasons": result["reasons"]},
        )
        results.append(result)
    return {
        "window": {"from": _iso(window.start), "to": _iso(window.end), "minutes": minutes},
        "guardrails": asdict(guardrails),
        "skills": results,
    }


def _abort(services: Services, skill: str, reasons: list[str]) -> str:
    try:
        services.registry.abort_canary(skill, actor=ACTOR, reason="; ".join(reasons))
    except Conflict:  # ended meanwhile by an operator: nothing left to abort
        return "already_ended"
    services.engine.refresh(force=True)
    return "aborted"


def _advance(services: Services, skill: str, version: str, reasons: list[str]) -> str:
    """Moves a gradual rollout to its next step after a passing check; returns `advanced` or `promoted`."""
    try:
        event = services.registry.advance_canary(skill, version, actor=ACTOR, reason="; ".join(reasons))
    except Conflict:  # promoted, aborted or moved by an operator meanwhile: the next check decides again
        return "changed_meanwhile"
    services.engine.refresh(force=True)
    return "promoted" if event is not None and event.action == CANARY_PROMOTE else "advanced"


def compare(
    services: Services, production: SkillModel, canary: SkillModel, window: Window, guardrails: Guardrails,
    reader: MetricsReader | None,
) -> dict[str, Any]:
    """Returns the side-by-side figures of both versions over the window, the decision and its reasons."""
    tripped: list[str] = []
    missing: list[str] = []
    versions: dict[str, dict[str, Any]] = {}
    for stage, model in (("production", production), ("canary", canary)):
        versions[stage] = {"model_version": model.version, **_request_figures(reader, model, window)}

    # Error rate and latency, from the metrics the service writes.
    p, c = versions["production"], versions["canary"]
    if reader is None:
        missing.append("no metrics store to read error rate and latency from (METRICS=off)")
    elif min(p["requests"], c["requests"]) < guardrails.min_requests:
        missing.append(
            f"too few requests to judge error rate and latency: production {p['requests']}, canary {c['requests']} "
            f"(at least {guardrails.min_requests} each)"
        )
    else:
        tripped.extend(request_guardrails(p, c, guardrails))

    # The score distribution and the agreement with teachers, from serving profiles and assessments.
    days = window.days()
    prod_window = gather_window(services, production, "production", days)
    canary_window = gather_window(services, canary, "canary", days)
    p["students"], c["students"] = prod_window.students, canary_window.students
    score_psi = None
    if min(prod_window.students, canary_window.students) < guardrails.min_students:
        missing.append(
            f"too few scored students to compare score distributions: production {prod_window.students}, "
            f"canary {canary_window.students} (at least {guardrails.min_students} each)"
        )
    else:
        score_psi = prediction_psi(production, prod_window.counts, canary, canary_window.counts)
        if score_psi > guardrails.max_psi:
            tripped.append(f"PSI of the canary's scores against production's is {score_psi:.3f}, over {guardrails.max_psi}")

    teachers: dict[str, Any] | None = None
    prod_pairs, canary_pairs = prod_window.pairs, canary_window.pairs
    n_prod = len(prod_pairs[0]) if prod_pairs is not None else 0
    n_canary = len(canary_pairs[0]) if canary_pairs is not None else 0
    if min(n_prod, n_canary) < guardrails.min_rated:
        missing.append(
            f"too few rated students to compare agreement with teachers: production {n_prod}, canary {n_canary} "
            f"(at least {guardrails.min_rated} each)"
        )
    else:
        assert prod_pairs is not None and canary_pairs is not None
        r_prod, r_canary = pearson(*prod_pairs), pearson(*canary_pairs)
        z, p_two_sided = fisher_z_difference(r_canary, n_canary, r_prod, n_prod)
        p_worse = 0.5 * math.erfc(-z / math.sqrt(2.0))  # one-sided: P(Z <= z) if both r were equal
        teachers = {
            "production": {"pearson": r_prod, "n": n_prod}, "canary": {"pearson": r_canary, "n": n_canary},
            "fisher_z": z, "p_value_two_sided": p_two_sided, "p_value_canary_worse": p_worse,
        }
        if p_worse < guardrails.alpha:
            tripped.append(
                f"r with teachers {r_canary:.3f} (n={n_canary}) is significantly worse than production's {r_prod:.3f} "
                f"(n={n_prod}): Fisher z {z:.2f}, one-sided p {p_worse:.2g} < alpha {guardrails.alpha}"
            )

    if tripped:
        decision, reasons = ROLLBACK, tripped
    elif missing:
        decision, reasons = HOLD, missing
    else:
        decision, reasons = PROMOTE, ["every guardrail passed with enough data"]
    return {
        "skill": production.skill,
        "production": production.version,
        "canary": canary.version,
        "versions": versions,
        "score_psi": score_psi,
        "teacher_correlation": teachers,
        "decision": decision,
        "reasons": reasons,
        "not_judged": missing if tripped else [],
    }


def prediction_psi(
    production: SkillModel, production_counts: dict[str, np.ndarray], canary: SkillModel, canary_counts: dict[str, np.ndarray]
) -> float:
    """PSI of the canary's served scores against production's, over production's reference deciles.

    Each version's profile counts scores in its own reference bins; the canary's are moved onto
    production's decile edges by its cumulative counts, linear within a bin.
    """
    from shared.drift_statistics import PSI_EPSILON

    prod_ref = model_profile(production).prediction
    canary_ref = model_profile(canary).prediction
    groups = int(prod_ref.groups.max()) + 1
    expected = np.bincount(prod_ref.groups, weights=_counts(production_counts, prod_ref), minlength=groups)
    # Production's group edges: the first edge of each group's bins, and the last edge.
    starts = [int(np.flatnonzero(prod_ref.groups == g)[0]) for g in range(groups)]
    inner = prod_ref.edges[starts[1:]]
    cumulative = _cdf(canary_ref.edges, _counts(canary_counts, canary_ref), inner)
    actual = np.diff(np.concatenate([[0.0], cumulative, [1.0]]))
    expected = np.maximum(expected / max(expected.sum(), 1.0), PSI_EPSILON)
    actual = np.maximum(actual, PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _counts(counts: dict[str, np.ndarray], reference: Any) -> np.ndarray:
    found = counts.get(PREDICTION)
    return np.asarray(found, dtype=np.float64) if found is not None else np.zeros(len(reference.counts))


def _cdf(edges: np.ndarray, counts: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Share of the counted values at or below each point, values spread evenly within their bins.
    (The outer bins hold everything beyond the outer edges; spread over the edges' range, as drawn.)"""
    total = counts.sum()
    if total <= 0:
        return np.zeros(len(at))
    cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / total
    return np.interp(at, edges, cumulative)


def request_guardrails(production: dict[str, Any], canary: dict[str, Any], guardrails: Guardrails) -> list[str]:
    """Returns why the canary's error rate or p99 latency trips a guardrail against production's (empty: neither)."""
    p, c = production, canary
    tripped = []
    # A production without errors still has a rate of at most one in its requests: the floor keeps
    # the ratio finite without letting a single canary error trip it on small numbers.
    baseline = max(p["error_rate"], 1.0 / p["requests"])
    if c["error_rate"] > guardrails.max_error_ratio * baseline:
        tripped.append(
            f"error rate {c['error_rate']:.4f} is over {guardrails.max_error_ratio}x production's {p['error_rate']:.4f}"
        )
    # Both the ratio and an absolute increase: at a p99 of about a millisecond, one scheduling pause
    # doubles it, and a rollback for that would be a false alarm.
    p99, limit = c["latency_p99_ms"], p["latency_p99_ms"]
    if p99 > guardrails.max_p99_ratio * limit and p99 - limit >= guardrails.min_p99_increase_ms:
        tripped.append(
            f"p99 latency {p99:.1f} ms is over {guardrails.max_p99_ratio}x production's {limit:.1f} ms "
            f"and {p99 - limit:.1f} ms more (at least {guardrails.min_p99_increase_ms:g} ms counts)"
        )
    return tripped


# -- reading the request metrics --------------------------------------------------------------------


def _request_figures(reader: MetricsReader | None, model: SkillModel, window: Window) -> dict[str, Any]:
    """Returns the version's requests, 5xx error rate and latency p50/p99 over the window, read back from its metrics."""
    empty = {"requests": 0, "errors": 0, "error_rate": 0.0, "latency_p50_ms": None, "latency_p99_ms": None}
    if reader is None:
        return empty
    labels = {"skill": model.skill, "model_version": model.version}
    start, end = window.start.timestamp(), window.end.timestamp()
    requests = errors = 0
    for series in reader.list_time_series(REQUEST_COUNT, start, end, labels):
        added = window_delta(series, start)
        requests += int(added)  # type: ignore[arg-type]
        if series.labels.get("status", "").startswith("5"):
            errors += int(added)  # type: ignore[arg-type]
    latency: Distribution | None = None
    for series in reader.list_time_series(REQUEST_LATENCY, start, end, labels):
        added = window_delta(series, start)
        if isinstance(added, Distribution):
            latency = added if latency is None else _sum(latency, added)
    figures = {**empty, "requests": requests, "errors": errors, "error_rate": errors / requests if requests else 0.0}
    if latency is not None and latency.count:
        figures["latency_p50_ms"], figures["latency_p99_ms"] = latency.quantile(0.5), latency.quantile(0.99)
    return figures


def window_delta(series: TimeSeriesData, window_start: float) -> int | float | Distribution:
    """Returns what a CUMULATIVE series added within the window, from its points in the window.

    Points sharing a start time are one run of the counter: one that started in the window counts
    whole; one that started before counts from its oldest point in the window (what it added between
    the window's start and that point, at most one flush interval, is not seen). A reset starts a new run.
    """
    runs: dict[float, list[tuple[float, Any]]] = {}
    for start, end, value in series.points:
        runs.setdefault(start, []).append((end, value))
    total: Any = None
    for start, points in runs.items():
        points.sort(key=lambda p: p[0])
        newest = points[-1][1]
        if start >= window_start:
            added = newest
        elif isinstance(newest, Distribution):
            added = newest.minus(points[0][1])
        else:
            added = newest - points[0][1]
        total = added if total is None else (_sum(total, added) if isinstance(added, Distribution) else total + added)
    return total if total is not None else 0


def _sum(a: Distribution, b: Distribution) -> Distribution:
    count = a.count + b.count
    if count == 0:
        return a
    mean = (a.mean * a.count + b.mean * b.count) / count
    squares = (a.sum_of_squared_deviation + a.count * (a.mean - mean) ** 2) + (
        b.sum_of_squared_deviation + b.count * (b.mean - mean) ** 2
    )
    length = max(len(a.bucket_counts), len(b.bucket_counts))
    pad = lambda counts: counts + (0,) * (length - len(counts))  # noqa: E731
    return Distribution(a.buckets, tuple(x + y for x, y in zip(pad(a.bucket_counts), pad(b.bucket_counts))), count, mean, squares)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


CANARY_CHECK_FIELDS = frozenset({"window_minutes", "window_days", "skills"})


def parse_canary_check_request(
    body: Any, skill_names: Sequence[str]
) -> tuple[int | None, int | None, list[str] | None]:
    """Returns (window_minutes, window_days, skills) from the check's optional body; raises ValidationError naming
    each bad field (a skill the catalog, `skill_names`, does not have is one)."""
    if body is None:
        return None, None, None
    fields = RequestFields(body, CANARY_CHECK_FIELDS)
    minutes = fields.optional_integer("window_minutes", WINDOW_MINUTES)
    days = fields.optional_integer("window_days", WINDOW_DAYS)
    if minutes is not None and days is not None:
        fields.add("window_minutes", "give window_minutes or window_days, not both")
    skills = fields.optional_texts("skills", CANARY_SKILLS)
    if skills and (unknown := [s for s in dict.fromkeys(skills) if s not in skill_names]):
        fields.add("skills", unknown_skills_problem(unknown, skill_names))
    fields.done()
    return minutes, days, list(dict.fromkeys(skills)) if skills is not None else None


