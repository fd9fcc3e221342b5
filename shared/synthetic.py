"""Synthetic students for the demo and the tests: features, labels from a known noisy process, teacher ratings."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from shared.catalog import SkillCatalog, SkillSpec

# The ground truth (which features matter, and how) is fixed by this seed and the catalog, so
# cohorts drawn with different seeds come from the same process, as real yearly cohorts would.
PROCESS_SEED = 20261123
LATENT_CORRELATION = 0.3


@dataclass(frozen=True)
class Cohort:
    """A generated group of students; arrays are aligned by student."""

    student_ids: list[str]
    features: dict[str, np.ndarray]  # feature name -> value per student (float64)
    true_skill: dict[str, np.ndarray]  # skill -> the process's noiseless score per student (standardized)
    labels: dict[str, np.ndarray]  # skill -> 1 if "high skill", drawn from the noisy process
    teacher_ratings: dict[str, np.ndarray]  # skill -> 1..5, correlated with true_skill

    def matrix(self, skill: SkillSpec) -> np.ndarray:
        """Returns the features of one skill in model order, one row per student."""
        return np.column_stack([self.features[name] for name in skill.feature_names])

    def __len__(self) -> int:
        return len(self.student_ids)


@dataclass(frozen=True)
class _SkillProcess:
    weights: np.ndarray  # per feature, on tanh of its standardized value
    pairs: np.ndarray  # (k, 2) feature indices whose products matter
    pair_weights: np.ndarray
    thresholds: np.ndarray  # (m,) feature indices with a step effect
    cutoffs: np.ndarray
    step_weights: np.ndarray


def _spread(low: float, default: float, high: float) -> float:
    return min(default - low, high - default) / 2.5


def _skill_process(skill: SkillSpec) -> _SkillProcess:
    rng = np.random.default_rng([PROCESS_SEED, zlib.crc32(skill.skill.encode())])
    n = len(skill.features)
    weights = rng.normal(0.0, 1.0, n) * (rng.random(n) < 0.6)
    k = max(3, n // 5)
    pairs = np.array([rng.choice(n, 2, replace=False) for _ in range(k)])
    m = max(2, n // 8)
    return _SkillProcess(
        weights=weights,
        pairs=pairs,
        pair_weights=rng.normal(0.0, 1.4, k),
        thresholds=rng.choice(n, m, replace=False),
        cutoffs=rng.uniform(-0.5, 1.0, m),
        step_weights=rng.normal(0.0, 1.6, m),
    )


def generate_cohort(catalog: SkillCatalog, n_students: int, seed: int, id_prefix: str = "student") -> Cohort:
    """Returns n_students students drawn with this seed; the same seed gives the same cohort."""
    rng = np.random.default_rng(seed)
    skills = list(catalog)
    n_skills = len(skills)
    correlation = np.full((n_skills, n_skills), LATENT_CORRELATION) + np.eye(n_skills) * (1 - LATENT_CORRELATION)
    latent = rng.multivariate_normal(np.zeros(n_skills), correlation, size=n_students)

    specs = {f.name: f for s in skills for f in s.features}
    users: dict[str, list[int]] = {name: [] for name in specs}
    for i, skill in enumerate(skills):
        for name in skill.feature_names:
            users[name].append(i)

    standardized: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    for name in sorted(specs):
        spec = specs[name]
        signal = latent[:, users[name]].sum(axis=1) / np.sqrt(len(users[name]))
        z = 0.7 * signal + np.sqrt(1 - 0.49) * rng.normal(size=n_students)
        spread = _spread(spec.min, spec.default, spec.max)
        values = np.clip(spec.default + spread * z, spec.min, spec.max)
        features[name] = values
        standardized[name] = (values - spec.default) / spread

    true_skill: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    ratings: dict[str, np.ndarray] = {}
    for skill in skills:
        process = _skill_process(skill)
        z = np.column_stack([standardized[name] for name in skill.feature_names])
        score = np.tanh(z) @ process.weights
        score += (z[:, process.pairs[:, 0]] * z[:, process.pairs[:, 1]]) @ process.pair_weights
        score += (z[:, process.thresholds] > process.cutoffs) @ process.step_weights
        # The process's own standardization is fixed (not per cohort), so cohorts stay comparable.
        score = (score - process_offset(skill)) / process_scale(skill)
        true_skill[skill.skill] = score
        labels[skill.skill] = (rng.random(n_students) < 1.0 / (1.0 + np.exp(-2.5 * score))).astype(np.int32)
        noisy = 3.0 + 1.1 * score + rng.normal(0.0, 0.6, n_students)
        ratings[skill.skill] = np.clip(np.rint(noisy), 1, 5).astype(np.int32)

    width = max(6, len(str(n_students)))
    ids = [f"{id_prefix}-{i:0{width}d}" for i in range(n_students)]
    return Cohort(ids, features, true_skill, labels, ratings)


_calibration: dict[str, tuple[float, float]] = {}


def _calibrate(skill: SkillSpec) -> tuple[float, float]:
    """Returns the mean and spread of a skill's raw process score over a large reference cohort."""
    if skill.skill not in _calibration:
        process = _skill_process(skill)
        rng = np.random.default_rng([PROCESS_SEED, 1])
        z = np.clip(rng.normal(size=(20_000, len(skill.features))), -2.5, 2.5)
        score = np.tanh(z) @ process.weights
        score += (z[:, process.pairs[:, 0]] * z[:, process.pairs[:, 1]]) @ process.pair_weights
        score += (z[:, process.thresholds] > process.cutoffs) @ process.step_weights
        _calibration[skill.skill] = (float(score.mean()), float(score.std()))
    return _calibration[skill.skill]


def process_offset(skill: SkillSpec) -> float:
    return _calibrate(skill)[0]


def process_scale(skill: SkillSpec) -> float:
    return _calibrate(skill)[1]
