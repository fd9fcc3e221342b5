"""Training and export: per skill a scaler and an XGBoost classifier, evaluated and written as safe artifacts.

Used by scripts/train.py only: it imports scikit-learn, XGBoost and the ONNX converter, none of
which the serving path needs at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.artifacts import (
    ARTIFACT_FILES,
    BOOSTER_FILE,
    METADATA_FILE,
    METADATA_SCHEMA_VERSION,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_PROBABILITIES,
    SCALER_FILE,
    sha256_hex,
)
from shared.catalog import SkillCatalog, SkillSpec
from shared.clock import now_iso
from shared.drift_statistics import ReferenceProfile
from shared.synthetic import Cohort, generate_cohort

log = logging.getLogger(__name__)

ONNX_PARITY_TOLERANCE = 1e-6
PREDICTION_BINS = [i / 10 for i in range(11)]


class ExportError(Exception):
    """An export would not serve what was trained (e.g. ONNX disagrees with XGBoost)."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides a training run's result; the same config gives the same models."""

    n_students: int = 8000
    seed: int = 7
    test_fraction: float = 0.2
    n_estimators: int = 200
    max_depth: int = 5
    learning_rate: float = 0.08
    subsample: float = 0.9
    colsample_bytree: float = 0.9
    min_child_weight: float = 2.0
    reg_lambda: float = 1.0
    nthread: int = 2

    def xgboost_params(self) -> dict[str, Any]:
        return {
            "objective": "binary:logistic",
            "eval_metric": "logloss",
            "tree_method": "hist",
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "lambda": self.reg_lambda,
            "seed": self.seed,
            "nthread": self.nthread,
        }


@dataclass(frozen=True)
class TrainedSkill:
    """The result of training one skill: artifact bytes ready to publish, and its evaluation."""

    skill: str
    files: dict[str, bytes]
    metadata: dict[str, Any]


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Returns AUC, accuracy, precision, recall, F1 (at 0.5), log loss and Brier score."""
    from sklearn import metrics

    predicted = (proba >= 0.5).astype(int)
    clipped = np.clip(proba, 1e-7, 1 - 1e-7)
    return {
        "auc": round(float(metrics.roc_auc_score(y_true, proba)), 6),
        "accuracy": round(float(metrics.accuracy_score(y_true, predicted)), 6),
        "precision": round(float(metrics.precision_score(y_true, predicted, zero_division=0)), 6),
        "recall": round(float(metrics.recall_score(y_true, predicted, zero_division=0)), 6),
        "f1": round(float(metrics.f1_score(y_true, predicted, zero_division=0)), 6),
        "log_loss": round(float(metrics.log_loss(y_true, clipped, labels=[0, 1])), 6),
        "brier": round(float(metrics.brier_score_loss(y_true, proba)), 6),
    }


def reference_distribution(values: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Returns what drift checks compare against: decile edges and shares, mean and std, and the
    reference profile (101 quantiles and the held-out counts between them) that PSI and KS read."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        edges = np.array([values.min(), values.min() + 1e-9])
    counts, _ = np.histogram(values, bins=edges)
    return {
        "edges": [round(float(e), 9) for e in edges],
        "proportions": [round(float(c) / len(values), 9) for c in counts],
        "mean": round(float(values.mean()), 9),
        "std": round(float(values.std()), 9),
        **ReferenceProfile.from_values(values).to_metadata(),
    }


def train_skill(spec: SkillSpec, cohort: Cohort, config: TrainingConfig) -> TrainedSkill:
    """Fits the scaler and the classifier on a train split and evaluates both it and a baseline on the rest."""
    import onnxruntime
    import xgboost
    from onnxmltools.convert import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X = cohort.matrix(spec)
    y = cohort.labels[spec.skill]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=config.test_fraction, random_state=config.seed, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    # Serving scales in float64 and casts to float32 (what both XGBoost and ONNX read); so does training.
    train32 = scaler.transform(X_train).astype(np.float32)
    test32 = scaler.transform(X_test).astype(np.float32)

    booster = xgboost.train(
        config.xgboost_params(), xgboost.DMatrix(train32, label=y_train), num_boost_round=config.n_estimators
    )
    proba = booster.inplace_predict(test32)
    baseline = LogisticRegression(max_iter=2000).fit(scaler.transform(X_train), y_train)
    baseline_proba = baseline.predict_proba(scaler.transform(X_test))[:, 1]

    # A fixed graph name: the converter's default is a random uuid, which would make exports differ byte for byte.
    onnx_model = convert_xgboost(
        booster, name=spec.skill, initial_types=[(ONNX_INPUT, FloatTensorType([None, X.shape[1]]))]
    )
    onnx_bytes = onnx_model.SerializeToString()
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_proba = session.run([ONNX_PROBABILITIES], {ONNX_INPUT: test32})[0][:, 1]
    parity = float(np.max(np.abs(onnx_proba.astype(np.float64) - proba.astype(np.float64))))
    if parity > ONNX_PARITY_TOLERANCE:
        raise ExportError(
            f"{spec.skill}: ONNX differs from XGBoost by {parity:.3g} (> {ONNX_PARITY_TOLERANCE}) on the held-out split."
        )

    gain = {key: float(value) for key, value in booster.get_score(importance_type="gain").items()}  # type: ignore[arg-type]
    total_gain = sum(gain.values()) or 1.0
    ranked = sorted(((value / total_gain, spec.feature_names[int(key[1:])]) for key, value in gain.items()), key=lambda t: (-t[0], t[1]))
    importance = [{"feature": name, "importance": round(share, 6)} for share, name in ranked]

    files: dict[str, bytes] = {
        BOOSTER_FILE: bytes(booster.save_raw("ubj")),
        ONNX_FILE: onnx_bytes,
        SCALER_FILE: json.dumps(
            {
                "feature_names": list(spec.feature_names),
                "mean": [float(v) for v in scaler.mean_],
                "scale": [float(v) for v in scaler.scale_],
            },
            indent=1,
        ).encode(),
    }
    data_hash = hashlib.sha256()
    data_hash.update(json.dumps(list(spec.feature_names)).encode())
    data_hash.update(np.ascontiguousarray(X_train, dtype=np.float64).tobytes())
    data_hash.update(np.ascontiguousarray(y_train, dtype=np.int32).tobytes())

    import onnx
    import onnxmltools
    import sklearn

    metadata: dict[str, Any] = {
        "schema_version": METADATA_SCHEMA_VERSION,
        "skill": spec.skill,
        "version": None,  # stamped by the registry when the version is published
        "description": spec.description,
        "trained_at": now_iso(),
        "feature_names": list(spec.feature_names),
        "parameters": {**config.xgboost_params(), "num_boost_round": config.n_estimators},
        "training": {
            **asdict(config),
            "n_train": int(len(y_train)),
            "n_test": int(len(y_test)),
            "positive_rate_train": round(float(y_train.mean()), 6),
            "data_sha256": data_hash.hexdigest(),
        },
        "metrics": classification_metrics(y_test, proba),
        "baseline_metrics": classification_metrics(y_test, baseline_proba),
        "baseline": "logistic regression on the same scaled features",
        "feature_importance": importance,
        "onnx_parity_max_abs_diff": parity,
        "library_versions": {
            "xgboost": xgboost.__version__,
            "scikit-learn": sklearn.__version__,
            "onnx": onnx.__version__,
            "onnxmltools": onnxmltools.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "reference": {
            "split": "held-out",
            "n": int(len(y_test)),
            "features": {name: reference_distribution(X_test[:, i]) for i, name in enumerate(spec.feature_names)},
            "prediction": {
                "edges": PREDICTION_BINS,
                "proportions": [
                    round(float(c) / len(proba), 9) for c in np.histogram(proba, bins=PREDICTION_BINS)[0]
                ],
                "mean": round(float(proba.mean()), 9),
                "std": round(float(proba.std()), 9),
                **ReferenceProfile.from_values(proba).to_metadata(),
            },
        },
        "artifacts": {name: sha256_hex(data) for name, data in files.items()},
    }
    files[METADATA_FILE] = json.dumps(metadata, indent=1).encode()
    return TrainedSkill(spec.skill, files, metadata)


def write_trained(trained: TrainedSkill, out_dir: Path) -> Path:
    """Writes a skill's artifacts to out_dir/<skill>/ and returns that folder."""
    folder = Path(out_dir) / trained.skill
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACT_FILES:
        (folder / name).write_bytes(trained.files[name])
    return folder


def train_catalog(
    catalog: SkillCatalog, config: TrainingConfig, skills: list[str] | None = None
) -> dict[str, TrainedSkill]:
    """Trains every skill (or the named ones) on one cohort drawn with the config's seed."""
    cohort = generate_cohort(catalog, config.n_students, config.seed)
    names = skills or catalog.names
    return {name: train_skill(catalog.skill(name), cohort, config) for name in names}
