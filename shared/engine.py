"""The inference engine: keeps each skill's serving model versions in memory and scores requests with them."""

from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from shared.artifacts import ArtifactStore
from shared.catalog import SkillCatalog
from shared.errors import ModelUnavailable, ServiceError, StoreUnavailable, UnknownSkill
from shared.features import PreparedFeatures
from shared.profiles import ServingProfiler
from shared.registry import ModelRegistry, ModelVersion
from shared.request_fields import SKILL_NAME, STUDENT_ID, RequestFields
from shared.skill_model import SkillModel, confidence_from_probability

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class InferenceRequest:
    """One student scored on one skill, as a caller asked for it."""

    student_id: str
    skill: str
    features: Mapping[str, Any]
    explain: bool = False


INFER_FIELDS = frozenset({"student_id", "skill", "features", "explain"})
FEATURES_PROBLEM = "must be an object of feature name to number"


def parse_inference_request(body: Any, catalog: SkillCatalog) -> InferenceRequest:
    """Returns the request a JSON body describes.

    Raises ValidationError naming each malformed or unknown field, then UnknownSkill if the skill is not in
    the catalog. Feature values are checked later, against the serving model's schema.
    """
    if type(body) is dict:
        # The common request, accepted by the same rules without collecting problems: this runs on every
        # online request and on every batch item. A catalog skill is a valid skill name, and the three
        # required fields being present, a fourth member can only be `explain`.
        student_id, skill, features, explain = (
            body.get("student_id"), body.get("skill"), body.get("features"), body.get("explain")
        )
        if (
            STUDENT_ID.accepts(student_id)
            and type(skill) is str
            and skill in catalog
            and type(features) is dict
            and (explain is None or explain is False or explain is True)
            and len(body) == 3 + ("explain" in body)
        ):
            return InferenceRequest(student_id, skill, features, explain is True)
    fields = RequestFields(body, INFER_FIELDS)
    fields.text("student_id", STUDENT_ID)
    skill = fields.text("skill", SKILL_NAME)
    fields.mapping("features", FEATURES_PROBLEM)
    fields.boolean("explain")
    fields.done()
    # Every field is well formed, so what kept the request off the common path is its skill.
    raise UnknownSkill(skill, catalog.names)


BUCKETS = 10_000


def in_canary(student_id: str, canary_traffic: float) -> bool:
    """Returns whether a student falls in a canary's share of `canary_traffic` (0 to 1).

    A student's bucket (crc32 of the id, of BUCKETS) is stable, so the same student gets the same
    version on every path that asks here: single and batch inference, and the nightly run.
    """
    return zlib.crc32(student_id.encode()) % BUCKETS < canary_traffic * BUCKETS


@dataclass(frozen=True)
class Deployment:
    """The models serving one skill: production, and optionally a canary taking a share of students."""

    production: SkillModel
    canary: SkillModel | None = None
    canary_traffic: float = 0.0

    def model_for(self, student_id: str) -> SkillModel:
        if self.canary is not None and in_canary(student_id, self.canary_traffic):
            return self.canary
        return self.production

    def models(self) -> list[SkillModel]:
        return [self.production] + ([self.canary] if self.canary else [])


def _key(record: ModelVersion) -> tuple[str, str, str]:
    return (record.skill, record.version, record.sha256)


# A version whose artifacts could not be fetched (the store unreachable) is tried again after a wait that
# doubles from the refresh interval up to this: each attempt holds the request that made it for the store's
# deadline, so an outage must not cost one such request per worker and interval.
MAX_FETCH_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class _FetchFailure:
    """A version whose artifacts the store could not deliver: why, and when to try again."""

    reason: str
    retry_at: float
    delay: float


class InferenceEngine:
    """Serves predictions from the registry's serving versions, loaded once and swapped in atomically.

    The registry is consulted at most every `refresh_seconds`; a new version is loaded and swapped in
    without failing a request, and a version that fails to load leaves the old one serving (and is
    tried again at the next check, or, if its store could not be reached, after a doubling wait).
    """

    def __init__(
        self,
        catalog: SkillCatalog,
        registry: ModelRegistry,
        store: ArtifactStore,
        refresh_seconds: float = 30.0,
        onnx_threads: int = 1,
        booster_threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
        profiler: ServingProfiler | None = None,
    ) -> None:
        self.catalog = catalog
        self.registry = registry
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.onnx_threads = onnx_threads
        self.booster_threads = booster_threads
        self._clock = clock
        self.profiler = profiler  # records what is scored, for drift checks
        self._deployments: dict[str, Deployment] = {}
        self._load_errors: dict[str, str] = {}
        self._canary_errors: dict[str, str] = {}
        self._failed: dict[tuple[str, str, str], str] = {}
        self._unfetched: dict[tuple[str, str, str], _FetchFailure] = {}
        self._next_check = 0.0
        self._loaded_once = False
        self._refresh_lock = threading.Lock()

    # -- model lifecycle -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Syncs with the registry if the refresh interval has passed (or if forced)."""
        if not force and self._clock() < self._next_check:
            return
        # Until the first load, callers wait for it; after that, one thread refreshes while
        # the others keep serving the models they have.
        if not self._refresh_lock.acquire(blocking=not self._loaded_once):
            return
        try:
            if force or self._clock() >= self._next_check:
                self._sync(force)
        finally:
            self._next_check = self._clock() + self.refresh_seconds
            self._loaded_once = True
            self._refresh_lock.release()

    def _sync(self, force: bool = False) -> None:
        try:
            serving = self.registry.serving()
        except StoreUnavailable as exc:
            log.warning("registry unavailable; serving the loaded models", extra={"reason": str(exc)})
            self._load_errors = {
                skill: f"the registry is unavailable: {exc}"
                for skill in self.catalog.names
                if skill not in self._deployments
            }
            return
        loaded = {_key(m.record): m for d in self._deployments.values() for m in d.models()}
        # A version that failed to load is retried at the next check; one whose store could not be reached,
        # after its backoff (a forced check, which a batch worker makes for its run's versions, tries at once).
        self._failed = {}
        if force:
            self._unfetched = {}
        deployments: dict[str, Deployment] = {}
        errors: dict[str, str] = {}
        canary_errors: dict[str, str] = {}
        wanted: set[tuple[str, str, str]] = set()
        for spec in self.catalog:
            records = serving.get(spec.skill, [])
            production = next((r for r in records if r.stage == "production"), None)
            canary = next((r for r in records if r.stage == "canary"), None)
            wanted.update(_key(r) for r in (production, canary) if r is not None)
            if production is None:
                errors[spec.skill] = "no version is in production"
                continue
            prod_model = self._model(loaded, production)
            if prod_model is None:
                errors[spec.skill] = self._failed[_key(production)]
                previous = self._deployments.get(spec.skill)
                if previous is not None:
                    deployments[spec.skill] = previous
                    errors[spec.skill] += f" (version {previous.production.version} keeps serving)"
                continue
            canary_model = self._model(loaded, canary) if canary else None
            if canary is not None and canary_model is None:
                # Production keeps all traffic; the operator sees why in /healthz.
                canary_errors[spec.skill] = self._failed[_key(canary)]
            deployments[spec.skill] = Deployment(prod_model, canary_model, canary.traffic if canary_model and canary else 0.0)
        self._deployments = deployments  # one reference swap: readers see the old or the new set, never a mix
        self._load_errors = errors
        self._canary_errors = canary_errors
        self._unfetched = {key: failure for key, failure in self._unfetched.items() if key in wanted}

    def _model(self, loaded: dict[tuple[str, str, str], SkillModel], record: ModelVersion) -> SkillModel | None:
        key = _key(record)
        if key in loaded:
            return loaded[key]
        if key in self._failed:
            return None
        unfetched = self._unfetched.get(key)
        if unfetched is not None and self._clock() < unfetched.retry_at:
            self._failed[key] = unfetched.reason
            return None
        started = time.perf_counter()
        try:
            model = SkillModel.load(
                self.store, record, self.catalog.skill(record.skill), self.onnx_threads, self.booster_threads
            )
        except Exception as exc:  # any failure to load must leave the old version serving
            self._failed[key] = f"version {record.version} failed to load: {exc}"
            retry_in = None
            if isinstance(exc, StoreUnavailable):
                delay = max(self.refresh_seconds, 1.0) if unfetched is None else unfetched.delay * 2
                retry_in = min(delay, MAX_FETCH_BACKOFF_SECONDS)
                self._unfetched[key] = _FetchFailure(self._failed[key], self._clock() + retry_in, retry_in)
            log.error(
                "model failed to load; keeping the loaded version",
                extra={"skill": record.skill, "model_version": record.version, "reason": str(exc), "retry_in_seconds": retry_in},
            )
            return None
        self._unfetched.pop(key, None)
        log.info(
            "model loaded",
            extra={
                "skill": record.skill,
                "model_version": record.version,
                "stage": record.stage,
                "load_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        return model

    def deployment(self, skill: str) -> Deployment:
        """Returns the skill's serving models; raises UnknownSkill or ModelUnavailable."""
        self.refresh()
        deployment = self._deployments.get(skill)
        if deployment is None:
            if skill not in self.catalog:
                raise UnknownSkill(skill, self.catalog.names)
            # The reason (which may name internal locations) is logged and shown by /healthz, not here.
            raise ModelUnavailable(f"No model can serve skill {skill!r} right now.", {"skill": skill})
        return deployment

    def status(self) -> tuple[dict[str, str], dict[str, str]]:
        """Returns the production version serving each skill, and why each other skill has none."""
        self.refresh()
        versions = {skill: d.production.version for skill, d in self._deployments.items()}
        return versions, dict(self._load_errors)

    def canary_problems(self) -> dict[str, str]:
        """Returns why each skill's canary, where one is registered, could not be loaded (production serves its share)."""
        self.refresh()
        return dict(self._canary_errors)

    # -- scoring ---------------------------------------------------------------------------------

    def infer(self, request: InferenceRequest) -> dict[str, Any]:
        """Returns the response for one request; raises its ServiceError if it cannot be scored.

        The same scores as infer_many, on a shorter path: the online path's cost is mostly per call.
        """
        model = self.deployment(request.skill).model_for(request.student_id)
        row = model.schema.prepare(request.features)
        X = np.array([row.values], dtype=np.float64)
        score = model.probability(X)
        if self.profiler is not None:
            # the row as an array already: copying it costs far less than converting the list again
            self.profiler.observe(model, X[0], score)
        result = _result(request, model, row, score, abs(2.0 * score - 1.0))
        if request.explain:
            result["contributions"] = model.top_contributions(X[0], model.contributions(X)[0])
        return result

    def infer_many(self, requests: Sequence[InferenceRequest]) -> list[dict[str, Any] | ServiceError]:
        """Scores many requests with one vectorized call per model; a bad request fails only itself."""
        results: list[dict[str, Any] | ServiceError] = [None] * len(requests)  # type: ignore[list-item]
        groups: dict[int, tuple[SkillModel, list[int], list[PreparedFeatures]]] = {}
        for i, request in enumerate(requests):
            try:
                model = self.deployment(request.skill).model_for(request.student_id)
                row = model.schema.prepare(request.features)
            except ServiceError as exc:
                results[i] = exc
                continue
            group = groups.setdefault(id(model), (model, [], []))
            group[1].append(i)
            group[2].append(row)
        for model, indices, rows in groups.values():
            X = model.schema.matrix(rows)
            scores = model.probabilities(X)
            if self.profiler is not None:
                self.profiler.observe_many(model, X, scores)
            confidences = confidence_from_probability(scores)
            explained = [k for k, i in enumerate(indices) if requests[i].explain]
            contributions = model.contributions(X[explained]) if explained else None
            for k, (i, row) in enumerate(zip(indices, rows)):
                results[i] = _result(requests[i], model, row, float(scores[k]), float(confidences[k]))
            if contributions is not None:
                for c, k in enumerate(explained):
                    results[indices[k]]["contributions"] = model.top_contributions(X[k], contributions[c])  # type: ignore[index]
        return results


def _result(
    request: InferenceRequest, model: SkillModel, row: PreparedFeatures, score: float, confidence: float
) -> dict[str, Any]:
    return {
        "student_id": request.student_id,
        "skill": model.skill,
        "score": score,
        "confidence": confidence,
        "model_version": model.version,
        "feature_importance": model.feature_importance,
        "imputed": row.imputed,
        "ignored": row.ignored,
    }
