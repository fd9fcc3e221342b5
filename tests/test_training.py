"""Training and export: quality against a baseline, the metadata contract, reproducibility, safe formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shared.training as training
from scripts import readme_sections, train
from shared.artifacts import ARTIFACT_FILES, BOOSTER_FILE, METADATA_FILE, METADATA_SCHEMA_VERSION, ONNX_FILE, SCALER_FILE, sha256_hex
from shared.catalog import SkillCatalog
from shared.settings import PROJECT_ROOT
from shared.training import ExportError, TrainingConfig, train_catalog

SMALL = TrainingConfig(n_students=2000, n_estimators=50)
TWO_SKILLS = ["communication", "leadership"]
METRIC_KEYS = {"auc", "accuracy", "precision", "recall", "f1", "log_loss", "brier"}
REQUIRED_KEYS = {
    "schema_version",
    "skill",
    "version",
    "trained_at",
    "feature_names",
    "parameters",
    "training",
    "metrics",
    "baseline_metrics",
    "feature_importance",
    "onnx_parity_max_abs_diff",
    "reference",
    "artifacts",
}
# Pickle protocol 2+ streams open with PROTO (0x80); protocol 0/1 streams open with one of these opcodes.
PICKLE_OPENINGS = (b"\x80", b"(", b"}", b"]", b"c", b"N")


def _metadata(trained_dir: Path, skill: str) -> dict[str, Any]:
    return json.loads((trained_dir / skill / METADATA_FILE).read_text())


def test_every_skill_beats_its_baseline_on_heldout_auc(trained_dir: Path, catalog: SkillCatalog) -> None:
    for skill in catalog.names:
        metadata = _metadata(trained_dir, skill)
        assert metadata["metrics"]["auc"] > metadata["baseline_metrics"]["auc"], skill
        # ...and both learned something real from the synthetic process.
        assert metadata["baseline_metrics"]["auc"] > 0.6, skill


def test_metadata_has_the_whole_contract(trained_dir: Path, catalog: SkillCatalog) -> None:
    for spec in catalog:
        metadata = _metadata(trained_dir, spec.skill)
        where = spec.skill
        assert REQUIRED_KEYS <= set(metadata), where
        assert metadata["schema_version"] == METADATA_SCHEMA_VERSION
        assert metadata["skill"] == spec.skill
        assert metadata["version"] is None  # stamped when published
        assert metadata["trained_at"].endswith("Z")
        assert metadata["feature_names"] == list(spec.feature_names)

        parameters = metadata["parameters"]
        assert parameters["objective"] == "binary:logistic"
        assert parameters["num_boost_round"] == TrainingConfig().n_estimators
        assert parameters["seed"] == TrainingConfig().seed

        for key in ("metrics", "baseline_metrics"):
            metrics = metadata[key]
            assert set(metrics) == METRIC_KEYS, (where, key)
            for name, value in metrics.items():
                assert isinstance(value, float) and np.isfinite(value), (where, key, name)
            for name in ("auc", "accuracy", "precision", "recall", "f1", "brier"):
                assert 0.0 <= metrics[name] <= 1.0, (where, key, name)
            assert metrics["log_loss"] > 0.0

        data_hash = metadata["training"]["data_sha256"]
        assert len(data_hash) == 64 and int(data_hash, 16) >= 0
        assert metadata["training"]["n_train"] + metadata["training"]["n_test"] == TrainingConfig().n_students

        folder = trained_dir / spec.skill
        assert set(metadata["artifacts"]) == {BOOSTER_FILE, ONNX_FILE, SCALER_FILE}
        for name, digest in metadata["artifacts"].items():
            assert digest == sha256_hex((folder / name).read_bytes()), (where, name)

        importance = metadata["feature_importance"]
        assert len(importance) >= 5
        assert {item["feature"] for item in importance} <= set(spec.feature_names)
        weights = [item["importance"] for item in importance]
        assert weights == sorted(weights, reverse=True)
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)

        reference = metadata["reference"]
        assert set(reference["features"]) == set(spec.feature_names)
        for name, distribution in reference["features"].items():
            _check_distribution(distribution, (where, name))
            feature = next(f for f in spec.features if f.name == name)
            assert feature.min <= distribution["edges"][0] <= distribution["edges"][-1] <= feature.max
        _check_distribution(reference["prediction"], (where, "prediction"))
        assert reference["prediction"]["edges"][0] == 0.0 and reference["prediction"]["edges"][-1] == 1.0

        parity = metadata["onnx_parity_max_abs_diff"]
        assert 0.0 <= parity <= 1e-6, where


def _check_distribution(distribution: dict[str, Any], where: object) -> None:
    assert {"edges", "proportions", "mean", "std"} <= set(distribution), where
    edges, proportions = distribution["edges"], distribution["proportions"]
    assert len(proportions) == len(edges) - 1 >= 1, where
    assert edges == sorted(edges), where
    assert sum(proportions) == pytest.approx(1.0, abs=1e-6), where
    assert all(p >= 0 for p in proportions), where


def test_the_scaler_file_matches_the_features(trained_dir: Path, catalog: SkillCatalog) -> None:
    for spec in catalog:
        scaler = json.loads((trained_dir / spec.skill / SCALER_FILE).read_text())
        assert scaler["feature_names"] == list(spec.feature_names)
        assert len(scaler["mean"]) == len(scaler["scale"]) == len(spec.features)
        assert all(s > 0 for s in scaler["scale"])


def test_no_exported_file_is_a_pickle(trained_dir: Path, catalog: SkillCatalog) -> None:
    import onnx
    import xgboost

    for skill in catalog.names:
        folder = trained_dir / skill
        assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)
        for name in ARTIFACT_FILES:
            head = (folder / name).read_bytes()[:2]
            assert not head.startswith(PICKLE_OPENINGS), (skill, name, head)
        booster = xgboost.Booster()
        booster.load_model(str(folder / BOOSTER_FILE))
        assert booster.num_features() == len(catalog.skill(skill).features)
        onnx.checker.check_model(onnx.load_model_from_string((folder / ONNX_FILE).read_bytes()))
        json.loads((folder / SCALER_FILE).read_text())
        json.loads((folder / METADATA_FILE).read_text())


def _essentials(result: training.TrainedSkill) -> tuple[Any, ...]:
    metadata = result.metadata
    return (
        metadata["metrics"],
        metadata["baseline_metrics"],
        metadata["training"]["data_sha256"],
        metadata["feature_importance"],
        metadata["reference"],
        metadata["onnx_parity_max_abs_diff"],
    )


@pytest.fixture(scope="module")
def trained_twice(catalog: SkillCatalog) -> tuple[dict[str, training.TrainedSkill], dict[str, training.TrainedSkill]]:
    """Two skills trained twice with the same reduced config."""
    return train_catalog(catalog, SMALL, TWO_SKILLS), train_catalog(catalog, SMALL, TWO_SKILLS)


def test_training_is_reproducible_for_a_seed(trained_twice: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, second = trained_twice
    assert list(first) == list(second) == TWO_SKILLS
    for skill in TWO_SKILLS:
        assert _essentials(first[skill]) == _essentials(second[skill]), skill
        # The booster and the scaler are the same bytes too.
        for name in (BOOSTER_FILE, SCALER_FILE):
            assert first[skill].files[name] == second[skill].files[name], (skill, name)


def test_a_different_seed_draws_different_data(
    catalog: SkillCatalog, trained_twice: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    first, _ = trained_twice
    other = train_catalog(catalog, TrainingConfig(n_students=2000, n_estimators=50, seed=SMALL.seed + 1), TWO_SKILLS)
    for skill in TWO_SKILLS:
        assert other[skill].metadata["training"]["data_sha256"] != first[skill].metadata["training"]["data_sha256"]
        assert other[skill].metadata["training"]["seed"] == SMALL.seed + 1
        assert other[skill].metadata["metrics"] != first[skill].metadata["metrics"]


def test_the_onnx_export_is_byte_reproducible(trained_twice: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The same config gives the same models (TrainingConfig's promise), so the same artifact checksums:
    a retrain can then be verified against a published version by its sha256."""
    first, second = trained_twice
    for skill in TWO_SKILLS:
        assert first[skill].files[ONNX_FILE] == second[skill].files[ONNX_FILE], skill
        assert first[skill].metadata["artifacts"] == second[skill].metadata["artifacts"], skill


def test_export_fails_when_onnx_disagrees(catalog: SkillCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "ONNX_PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="communication"):
        train_catalog(catalog, TrainingConfig(n_students=1500, n_estimators=20), ["communication"])


def test_train_catalog_rejects_an_unknown_skill(catalog: SkillCatalog) -> None:
    from shared.errors import UnknownSkill

    with pytest.raises(UnknownSkill):
        train_catalog(catalog, TrainingConfig(n_students=500, n_estimators=5), ["juggling"])


def test_the_readme_auc_table_is_what_training_produces(trained_dir: Path, catalog: SkillCatalog) -> None:
    # trained_dir is trained with the default config, as `scripts/train.py --write-readme` requires.
    metadata = {s: json.loads((trained_dir / s / "metadata.json").read_text()) for s in catalog.names}
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert readme_sections.section(readme, train.README_SECTION).strip() == train.auc_table(metadata, catalog.names).strip(), (
        "the README's AUC table is stale: run scripts/train.py --write-readme"
    )
