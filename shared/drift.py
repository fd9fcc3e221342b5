"""Drift checks: each serving model version's window of scored students against its reference, and against teachers."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from shared.drift_statistics import ks_two_sample, pearson, pearson_ci95, psi, spearman
from shared.errors import NotFound
from shared.profiles import PREDICTION, ModelProfile, model_profile, sum_parts, utc_day
from shared.request_fields import CHECK_ID, DRIFT_SKILLS, WINDOW_DAYS, RequestFields, parameter
from shared.sqlite import SqliteDatabase

if TYPE_CHECKING:
    from shared.services import Services
    from shared.skill_model import SkillModel

log = logging.getLogger(__name__)

MAX_RATED_STUDENTS = 5_000  # students whose latest assessment is read for the teacher correlation
REPORT_PREFIX = "drift-reports/"


@dataclass(frozen=True)
class DriftThresholds:
    """The check's parameters (settings): PSI warning and alert levels, and when data is enough."""

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    min_students: int = 100
    min_rated: int = 30
    min_teacher_r: float = 0.5


@dataclass
class VersionWindow:
    """What one serving version scored in the window, kept for the report beside the figures."""

    model: SkillModel
    stage: str
    students: int
    counts: dict[str, np.ndarray]
    pairs: tuple[np.ndarray, np.ndarray] | None = None  # (scores, teacher ratings) of rated students
    result: dict[str, Any] = field(default_factory=dict)


class DriftCheckStore(Protocol):
    def save(self, check: dict[str, Any]) -> None:
        """Stores a finished check under its check_id."""
        ...

    def get(self, check_id: str) -> dict[str, Any] | None:
        ...

    def latest(self) -> dict[str, Any] | None:
        """Returns the most recent check, or None before the first."""
        ...


_CHECKS_DDL = """
CREATE TABLE IF NOT EXISTS drift_checks (
    check_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drift_checks_created ON drift_checks (created_at)
"""


class SqliteDriftCheckStore:
    """Drift check results in the embedded SQLite database."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        db.ensure_schema("drift_checks", _CHECKS_DDL)

    def save(self, check: dict[str, Any]) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO drift_checks (check_id, created_at, body) VALUES (?, ?, ?)",
                (check["check_id"], check["created_at"], json.dumps(check)),
            )

    def get(self, check_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT body FROM drift_checks WHERE check_id = ?", (check_id,))
        return json.loads(rows[0]["body"]) if rows else None

    def latest(self) -> dict[str, Any] | None:
        rows = self.db.query("SELECT body FROM drift_checks ORDER BY created_at DESC, check_id DESC LIMIT 1")
        return json.loads(rows[0]["body"]) if rows else None


DRIFT_FIELDS = frozenset({"window_days", "skills"})


def parse_drift_request(body: Any, skill_names: Sequence[str], default_window_days: int) -> tuple[int, list[str]]:
    """Returns (window_days, skills) from the check's optional body; raises ValidationError naming the field."""
    if body is None:
        return default_window_days, list(skill_names)
    fields = RequestFields(body, DRIFT_FIELDS)
    window = fields.optional_integer("window_days", WINDOW_DAYS)
    skills = fields.optional_texts("skills", DRIFT_SKILLS)
    if skills and (unknown := [s for s in dict.fromkeys(skills) if s not in skill_names]):
        fields.add("skills", unknown_skills_problem(unknown, skill_names))
    fields.done()
    return (
        window if window is not None else default_window_days,
        list(dict.fromkeys(skills)) if skills is not None else list(skill_names),
    )


def unknown_skills_problem(unknown: Sequence[str], skill_names: Sequence[str]) -> str:
    """Returns the problem of a `skills` list naming skills the catalog does not have."""
    return f"unknown skills {list(unknown[:5])}; known: {', '.join(skill_names)}"


def window_days(days: int, now: datetime) -> list[str]:
    """Returns the UTC days of a window that ends today, oldest first."""
    return [utc_day(now - timedelta(days=offset)) for offset in range(days - 1, -1, -1)]


def check_version(window: VersionWindow, thresholds: DriftThresholds) -> dict[str, Any]:
    """Computes one version's figures and alerts from its window."""
    profile: ModelProfile = model_profile(window.model)
    result: dict[str, Any] = {
        "skill": window.model.skill,
        "model_version": window.model.version,
        "stage": window.stage,
        "students": window.students,
        "status": "ok",
        "psi_prediction": None,
        "ks_prediction": None,
        "ks_prediction_pvalue": None,
        "features": [],
        "teacher_correlation": None,
        "alerts": [],
    }
    alerts: list[dict[str, Any]] = result["alerts"]
    if window.students < thresholds.min_students:
        # Too few students for a meaningful comparison: a result of its own, never an alert.
        result["status"] = "insufficient_data"
    else:
        prediction = window.counts.get(PREDICTION, np.zeros(len(profile.prediction.counts), dtype=np.int64))
        result["psi_prediction"] = psi(profile.prediction, prediction)
        result["ks_prediction"], result["ks_prediction_pvalue"] = ks_two_sample(profile.prediction, prediction)
        alerts.extend(_psi_alerts("prediction_psi", None, result["psi_prediction"], thresholds))
        for name in profile.feature_names:
            counts = window.counts.get(name, np.zeros(len(profile.features[name].counts), dtype=np.int64))
            value = psi(profile.features[name], counts)
            ks, pvalue = ks_two_sample(profile.features[name], counts)
            result["features"].append({"feature": name, "psi": value, "ks": ks, "ks_pvalue": pvalue})
            alerts.extend(_psi_alerts("feature_psi", name, value, thresholds))
    if window.pairs is not None and len(window.pairs[0]) >= thresholds.min_rated:
        scores, ratings = window.pairs
        r = pearson(scores, ratings)
        low, high = pearson_ci95(r, len(scores))
        result["teacher_correlation"] = {
            "pearson": r, "spearman": spearman(scores, ratings), "n": int(len(scores)), "ci95": [low, high],
        }
        if r < thresholds.min_teacher_r:
            alerts.append({"kind": "teacher_correlation", "severity": "alert", "value": r, "threshold": thresholds.min_teacher_r})
    return result


def _psi_alerts(kind: str, feature: str | None, value: float, thresholds: DriftThresholds) -> list[dict[str, Any]]:
    if value < thresholds.psi_warn:
        return []
    severity, threshold = ("alert", thresholds.psi_alert) if value >= thresholds.psi_alert else ("warning", thresholds.psi_warn)
    alert: dict[str, Any] = {"kind": kind, "severity": severity, "value": value, "threshold": threshold}
    if feature is not None:
        alert["feature"] = feature
    return [alert]


def gather_window(services: Services, model: SkillModel, stage: str, days: list[str]) -> VersionWindow:
    """Reads a version's serving profile parts and its rated students' latest scores for the window."""
    students, counts = sum_parts(services.profiles.parts(model.skill, model.version, days))
    window = VersionWindow(model, stage, students, counts)
    ratings = services.ratings.for_skill(model.skill)
    if ratings:
        # Deterministic sample: the same students are read on every check of a skill.
        rated = sorted(ratings)[:MAX_RATED_STUDENTS]
        first_day = days[0]
        scores, values = [], []
        for student_id in rated:
            for assessment in services.assessments.latest(student_id):
                if (
                    assessment.skill == model.skill
                    and assessment.model_version == model.version
                    and assessment.assessed_at[:10] >= first_day
                ):
                    scores.append(assessment.score)
                    values.append(ratings[student_id])
        window.pairs = (np.asarray(scores), np.asarray(values))
    return window


def run_drift_check(services: Services, days: int, skills: Sequence[str], now: datetime | None = None) -> dict[str, Any]:
    """Checks every serving version (production, and a canary if any) of the skills over the window; stores
    the check and its HTML report, writes its figures as metrics, and logs each alert. Returns the check."""
    now = now or datetime.now(timezone.utc)
    settings = services.settings
    thresholds = DriftThresholds(
        settings.drift_psi_warn, settings.drift_psi_alert, settings.drift_min_students,
        settings.drift_min_rated, settings.drift_min_teacher_r,
    )
    day_list = window_days(days, now)
    check_id = f"drift-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    windows: list[VersionWindow] = []
    for skill in skills:
        deployment = services.engine.deployment(skill)
        for model in deployment.models():
            stage = "production" if model is deployment.production else "canary"
            window = gather_window(services, model, stage, day_list)
            window.result = check_version(window, thresholds)
            windows.append(window)

    from shared.drift_report import render_report  # matplotlib: imported by the drift check alone

    check: dict[str, Any] = {
        "check_id": check_id,
        "created_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "window": {"days": days, "from": day_list[0], "to": day_list[-1]},
        "thresholds": {
            "psi_warn": thresholds.psi_warn, "psi_alert": thresholds.psi_alert,
            "min_students": thresholds.min_students, "min_rated": thresholds.min_rated,
            "min_teacher_r": thresholds.min_teacher_r,
        },
        "skills": [w.result for w in windows],
        "report_uri": None,
    }
    html = render_report(check, windows, thresholds)
    check["report_uri"] = services.artifacts.put(f"{REPORT_PREFIX}{check_id}.html", html)
    services.drift_checks.save(check)
    _publish(services, check)
    return check


def _publish(services: Services, check: dict[str, Any]) -> None:
    """Writes the figures through the metrics writer and logs each alert at WARNING or ERROR."""
    metrics = services.metrics
    for entry in check["skills"]:
        labels = {"skill": entry["skill"], "model_version": entry["model_version"]}
        metrics.gauge("drift_students", float(entry["students"]), labels)
        if entry["psi_prediction"] is not None:
            metrics.gauge("drift_psi_prediction", entry["psi_prediction"], labels)
            metrics.gauge("drift_psi_feature_max", max((f["psi"] for f in entry["features"]), default=0.0), labels)
        if entry["teacher_correlation"] is not None:
            metrics.gauge("drift_teacher_pearson", entry["teacher_correlation"]["pearson"], labels)
        for alert in entry["alerts"]:
            level = logging.ERROR if alert["severity"] == "alert" else logging.WARNING
            log.log(
                level,
                f"drift {alert['severity']}: {alert['kind']}",
                extra={"check_id": check["check_id"], **labels, **{k: v for k, v in alert.items() if k != "severity"}},
            )
    metrics.flush()


def get_check(services: Services, check_id: str) -> dict[str, Any]:
    """Returns a stored check (`latest` for the most recent); raises ValidationError for a malformed check id (the
    path parameter `check_id`), NotFound for an unknown one."""
    parameter("check_id", check_id, CHECK_ID)
    if check_id == "latest":
        found = services.drift_checks.latest()
    else:
        found = services.drift_checks.get(check_id)
    if found is None:
        raise NotFound(f"No drift check {check_id!r}." if check_id != "latest" else "No drift check has run yet.")
    return found
