"""One loaded, verified version of a skill's model: scaling, ONNX scoring, and XGBoost for explanations."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.artifacts import (
    ARTIFACT_FILES,
    BOOSTER_FILE,
    METADATA_FILE,
    READABLE_METADATA_SCHEMA_VERSIONS,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_PROBABILITIES,
    SCALER_FILE,
    ArtifactStore,
    read_verified,
    sha256_hex,
)
from shared.catalog import SkillSpec
from shared.errors import ArtifactIntegrityError
from shared.features import FeatureSchema
from shared.registry import ModelVersion

if TYPE_CHECKING:
    import xgboost

TOP_FEATURES = 5


def confidence_from_probability(p: np.ndarray) -> np.ndarray:
    """Returns |2p - 1|, which equals tanh(|margin| / 2) for the model's log-odds margin.

    0 at the decision boundary (p = 0.5), approaching 1 as the margin grows either way.
    """
    return np.abs(2.0 * p - 1.0)


class SkillModel:
    """A skill's model version held in memory; immutable once built, safe to share between threads."""

    def __init__(
        self,
        record: ModelVersion,
        spec: SkillSpec,
        files: dict[str, bytes],
        onnx_threads: int = 1,
        booster_threads: int = 1,
    ) -> None:
        import onnxruntime

        metadata = json.loads(files[METADATA_FILE])
        scaler = json.loads(files[SCALER_FILE])
        where = f"{record.skill} {record.version}"
        if metadata.get("schema_version") not in READABLE_METADATA_SCHEMA_VERSIONS:
            raise ArtifactIntegrityError(
                f"{where}: metadata schema_version {metadata.get('schema_version')!r} is not one of "
                f"{READABLE_METADATA_SCHEMA_VERSIONS}."
            )
        if metadata.get("skill") != record.skill or metadata.get("version") != record.version:
            raise ArtifactIntegrityError(f"{where}: metadata names {metadata.get('skill')} {metadata.get('version')}.")
        for name, digest in metadata.get("artifacts", {}).items():
            if sha256_hex(files[name]) != digest:
                raise ArtifactIntegrityError(f"{where}: {name} does not match the sha256 in its metadata.")
        names = tuple(metadata["feature_names"])
        if names != spec.feature_names or tuple(scaler["feature_names"]) != names:
            raise ArtifactIntegrityError(f"{where}: the model's features differ from the skill catalog's.")

        self.record = record
        self.skill = record.skill
        self.version = record.version
        self.metadata = metadata
        self.schema = FeatureSchema(spec)
        self.feature_names = names
        self.mean = np.asarray(scaler["mean"], dtype=np.float64)
        scale = np.asarray(scaler["scale"], dtype=np.float64)
        self.inverse_scale = 1.0 / np.where(scale == 0.0, 1.0, scale)
        self.feature_importance = [dict(item) for item in metadata["feature_importance"][:TOP_FEATURES]]

        options = onnxruntime.SessionOptions()
        # One thread per request path: the server runs one worker process per core, so more
        # intra-op threads would only contend with the other workers.
        options.intra_op_num_threads = onnx_threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self._session = onnxruntime.InferenceSession(files[ONNX_FILE], options, providers=["CPUExecutionProvider"])
        self._booster_bytes = files[BOOSTER_FILE]
        self._booster: xgboost.Booster | None = None
        self._booster_lock = threading.Lock()
        self._booster_threads = booster_threads

    @classmethod
    def load(
        cls,
        store: ArtifactStore,
        record: ModelVersion,
        spec: SkillSpec,
        onnx_threads: int = 1,
        booster_threads: int = 1,
    ) -> SkillModel:
        """Reads the version's artifacts, checks each sha256 against the registry, and builds the model."""
        files = {name: read_verified(store, record.artifact_uri, record.checksums, name) for name in ARTIFACT_FILES}
        return cls(record, spec, files, onnx_threads, booster_threads)

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Returns standardized features as float32, the input both ONNX and XGBoost read."""
        scaled = X - self.mean
        scaled *= self.inverse_scale  # in place: one temporary array fewer on large batches
        return scaled.astype(np.float32)

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """Scores raw feature rows through ONNX Runtime; returns P(high skill) per row, in [0, 1]."""
        out = self._session.run([ONNX_PROBABILITIES], {ONNX_INPUT: self.scale(X)})[0]
        return np.minimum(np.maximum(out[:, 1].astype(np.float64), 0.0), 1.0)

    def probability(self, values: list[float] | np.ndarray) -> float:
        """Scores one raw row (a list, or a float64 matrix of one row) through ONNX Runtime; returns P(high skill) in [0, 1]."""
        X = values if isinstance(values, np.ndarray) else np.array([values], dtype=np.float64)
        p = float(self._session.run([ONNX_PROBABILITIES], {ONNX_INPUT: self.scale(X)})[0][0, 1])
        return min(1.0, max(0.0, p))

    def booster(self) -> xgboost.Booster:
        """Returns the native XGBoost model, loading XGBoost on first use (it costs ~1.6 s of import)."""
        if self._booster is None:
            with self._booster_lock:
                if self._booster is None:
                    import xgboost

                    booster = xgboost.Booster()
                    booster.load_model(bytearray(self._booster_bytes))
                    booster.set_param({"nthread": self._booster_threads})
                    self._booster = booster
        return self._booster

    def probabilities_booster(self, X: np.ndarray) -> np.ndarray:
        """Scores raw rows with XGBoost's vectorized inplace_predict (the batch path)."""
        return np.clip(self.booster().inplace_predict(self.scale(X)).astype(np.float64), 0.0, 1.0)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Returns exact TreeSHAP contributions (log-odds) per row and feature, without the bias column."""
        import xgboost

        # BATCH_THREADS, like the booster: with the default (every core), a one-row explanation took 2-3x as long
        # whenever the other core was busy.
        matrix = xgboost.DMatrix(self.scale(X), nthread=self._booster_threads)
        return self.booster().predict(matrix, pred_contribs=True)[:, :-1]

    def top_contributions(self, values: np.ndarray, contributions: np.ndarray) -> list[dict[str, Any]]:
        """Returns the row's five largest contributions by magnitude, with the feature's raw value."""
        order = np.argsort(-np.abs(contributions), kind="stable")[:TOP_FEATURES]
        return [
            {
                "feature": self.feature_names[i],
                "value": float(values[i]),
                "contribution": float(contributions[i]),
            }
            for i in order
        ]
