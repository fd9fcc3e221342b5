"""The skill catalog: the shipped file, the checks from_dict makes, and adding a skill by editing it."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared.artifacts import ARTIFACT_FILES, METADATA_FILE, SCALER_FILE
from shared.catalog import CATALOG_SCHEMA_VERSION, FEATURE_GROUPS, SkillCatalog
from shared.engine import InferenceRequest
from shared.errors import ConfigError, UnknownSkill
from shared.publishing import publish_version
from shared.services import Services
from shared.settings import PROJECT_ROOT, Settings
from shared.training import TrainingConfig, train_catalog, write_trained

CATALOG_FILE = PROJECT_ROOT / "models" / "catalog.json"
EXPECTED_SKILLS = {
    "communication",
    "collaboration",
    "critical_thinking",
    "creativity",
    "self_regulation",
    "problem_solving",
    "leadership",
}


@pytest.fixture
def raw_catalog() -> dict[str, Any]:
    """A fresh copy of the shipped catalog file's JSON, safe to edit."""
    return json.loads(CATALOG_FILE.read_text())


def _minimal(**feature: Any) -> dict[str, Any]:
    """Returns a one-skill, one-feature catalog dict whose feature spec takes the given overrides."""
    spec = {"group": "linguistic", "description": "d", "required": False, "default": 1.0, "min": 0.0, "max": 2.0}
    spec.update(feature)
    return {
        "schema_version": CATALOG_SCHEMA_VERSION,
        "features": {"f": spec},
        "skills": [{"skill": "s", "description": "d", "features": ["f"]}],
    }


# -- the shipped catalog -------------------------------------------------------------------------


def test_shipped_catalog_has_the_seven_skills(catalog: SkillCatalog) -> None:
    assert len(catalog) == 7
    assert set(catalog.names) == EXPECTED_SKILLS


def test_every_skill_reads_20_to_40_distinct_features(catalog: SkillCatalog) -> None:
    for spec in catalog:
        assert 20 <= len(spec.features) <= 40, spec.skill
        assert len(set(spec.feature_names)) == len(spec.feature_names), spec.skill


def test_features_come_from_both_groups(catalog: SkillCatalog) -> None:
    groups = {f.group for spec in catalog for f in spec.features}
    assert groups == set(FEATURE_GROUPS)
    for spec in catalog:
        # Each skill mixes what students write with how they behave.
        assert {f.group for f in spec.features} == set(FEATURE_GROUPS), spec.skill


def test_some_features_are_shared_across_skills(catalog: SkillCatalog) -> None:
    uses = Counter(name for spec in catalog for name in spec.feature_names)
    shared = [name for name, count in uses.items() if count > 1]
    assert shared, "no feature is read by more than one skill"
    # A shared feature is the same spec object in every skill that reads it.
    name = shared[0]
    specs = {f for spec in catalog for f in spec.features if f.name == name}
    assert len(specs) == 1


def test_defaults_lie_inside_their_ranges_in_the_file(raw_catalog: dict[str, Any]) -> None:
    # Checked on the raw file too, not only through from_dict's own validation.
    assert raw_catalog["schema_version"] == CATALOG_SCHEMA_VERSION
    for name, spec in raw_catalog["features"].items():
        assert spec["min"] < spec["max"], name
        assert spec["min"] <= spec["default"] <= spec["max"], name
        assert spec["group"] in FEATURE_GROUPS, name


def test_every_defined_feature_is_used_and_described(catalog: SkillCatalog, raw_catalog: dict[str, Any]) -> None:
    used = {name for spec in catalog for name in spec.feature_names}
    assert used == set(raw_catalog["features"])
    assert all(f.description for spec in catalog for f in spec.features)


def test_some_features_are_required_and_some_imputable(catalog: SkillCatalog) -> None:
    required = {f.required for spec in catalog for f in spec.features}
    assert required == {True, False}


def test_skill_lookup_raises_unknown_skill_listing_valid_names(catalog: SkillCatalog) -> None:
    with pytest.raises(UnknownSkill) as caught:
        catalog.skill("juggling")
    assert caught.value.details == {"valid_skills": catalog.names}


def test_to_dict_lists_skills_with_their_features(catalog: SkillCatalog) -> None:
    body = catalog.to_dict()
    assert [s["skill"] for s in body["skills"]] == catalog.names
    first = body["skills"][0]
    assert [f["name"] for f in first["features"]] == list(catalog.skill(first["skill"]).feature_names)
    assert set(first["features"][0]) == {"name", "group", "description", "required", "default", "min", "max"}


def test_load_of_a_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SKILL_CATALOG"):
        SkillCatalog.load(tmp_path / "absent.json")


def test_load_of_invalid_json_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SkillCatalog.load(path)


# -- what from_dict rejects ----------------------------------------------------------------------


def test_minimal_catalog_is_accepted() -> None:
    catalog = SkillCatalog.from_dict(_minimal())
    assert catalog.names == ["s"]
    assert catalog.skill("s").feature_names == ("f",)


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_rejects_a_wrong_schema_version(version: Any) -> None:
    raw = _minimal()
    raw["schema_version"] = version
    with pytest.raises(ConfigError, match="schema_version"):
        SkillCatalog.from_dict(raw)


def test_rejects_a_skill_listing_an_undefined_feature(raw_catalog: dict[str, Any]) -> None:
    raw_catalog["skills"][0]["features"].append("telepathy_score")
    with pytest.raises(ConfigError, match="telepathy_score"):
        SkillCatalog.from_dict(raw_catalog)


def test_rejects_a_duplicate_feature_in_a_skill(raw_catalog: dict[str, Any]) -> None:
    skill = raw_catalog["skills"][1]
    skill["features"].append(skill["features"][0])
    with pytest.raises(ConfigError, match=skill["skill"]):
        SkillCatalog.from_dict(raw_catalog)


@pytest.mark.parametrize("low, high", [(2.0, 2.0), (3.0, 2.0)])
def test_rejects_min_not_below_max(low: float, high: float) -> None:
    with pytest.raises(ConfigError, match="'f'"):
        SkillCatalog.from_dict(_minimal(min=low, max=high, default=2.0))


@pytest.mark.parametrize("default", [-0.5, 2.5])
def test_rejects_a_default_outside_the_range(default: float) -> None:
    with pytest.raises(ConfigError, match="'f'"):
        SkillCatalog.from_dict(_minimal(default=default))


@pytest.mark.parametrize("group", ["emotional", None, ""])
def test_rejects_an_unknown_group(group: Any) -> None:
    with pytest.raises(ConfigError, match="group"):
        SkillCatalog.from_dict(_minimal(group=group))


@pytest.mark.parametrize("field", ["min", "max", "default"])
def test_rejects_a_missing_or_non_numeric_bound(field: str) -> None:
    with pytest.raises(ConfigError, match="must be numbers"):
        SkillCatalog.from_dict(_minimal(**{field: "lots"}))


def test_rejects_a_non_finite_bound() -> None:
    with pytest.raises(ConfigError, match="finite"):
        SkillCatalog.from_dict(_minimal(max=float("inf")))


def test_rejects_duplicate_skill_names_and_an_empty_catalog() -> None:
    raw = _minimal()
    raw["skills"].append(copy.deepcopy(raw["skills"][0]))
    with pytest.raises(ConfigError, match="unique"):
        SkillCatalog.from_dict(raw)
    raw["skills"] = []
    with pytest.raises(ConfigError, match="no skill"):
        SkillCatalog.from_dict(raw)


def _malformed(case: str) -> Any:
    raw: Any = _minimal()
    if case == "catalog is a list":
        return [raw]
    if case == "features is a list":
        raw["features"] = [dict(raw["features"]["f"], name="f")]
    elif case == "feature spec is a number":
        raw["features"]["f"] = 5
    elif case == "skill entry is a string":
        raw["skills"] = ["s"]
    elif case == "required is a string":
        raw["features"]["f"]["required"] = "false"
    return raw


@pytest.mark.parametrize(
    "case",
    ["catalog is a list", "features is a list", "feature spec is a number", "skill entry is a string", "required is a string"],
)
def test_a_malformed_shape_is_a_config_error(case: str) -> None:
    """The catalog is edited by hand; a wrong shape must fail as ConfigError, not AttributeError three calls
    later, and `"required": "false"` must not silently make a feature required."""
    with pytest.raises(ConfigError):
        SkillCatalog.from_dict(_malformed(case))


def test_the_error_names_the_source_file(tmp_path: Path) -> None:
    path = tmp_path / "bad-catalog.json"
    path.write_text(json.dumps(_minimal(group="emotional")))
    with pytest.raises(ConfigError, match="bad-catalog.json"):
        SkillCatalog.load(path)


# -- an eighth skill is a catalog edit -----------------------------------------------------------


def test_an_eighth_skill_is_only_a_catalog_edit(raw_catalog: dict[str, Any], tmp_path: Path) -> None:
    """A new skill reusing existing features trains, exports and serves with no code change."""
    reused = raw_catalog["skills"][0]["features"][:8] + raw_catalog["skills"][3]["features"][-6:]
    reused = list(dict.fromkeys(reused))
    raw_catalog["skills"].append(
        {"skill": "empathy", "description": "Understands and shares others' feelings.", "features": reused}
    )
    catalog = SkillCatalog.from_dict(raw_catalog)
    assert len(catalog) == 8
    assert catalog.skill("empathy").feature_names == tuple(reused)

    trained = train_catalog(catalog, TrainingConfig(n_students=1500, n_estimators=30), ["empathy"])
    assert list(trained) == ["empathy"]
    folder = write_trained(trained["empathy"], tmp_path / "trained")
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    assert metadata["skill"] == "empathy"
    assert metadata["feature_names"] == reused
    assert json.loads((folder / SCALER_FILE).read_text())["feature_names"] == reused

    # ...and the edited catalog is all the service needs to serve it.
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(json.dumps(raw_catalog))
    settings = Settings.from_env(
        {
            "SKILL_CATALOG": str(catalog_file),
            "ARTIFACT_STORE": str(tmp_path / "artifacts"),
            "DATABASE_URL": str(tmp_path / "skills.sqlite3"),
        }
    )
    services = Services(settings)
    record = publish_version(services.registry, services.artifacts, folder)
    services.registry.promote("empathy", record.version)
    features = {name: catalog.skill("empathy").features[i].default for i, name in enumerate(reused)}
    result = services.engine.infer(InferenceRequest("student-1", "empathy", features))
    assert result["skill"] == "empathy"
    assert result["model_version"] == "1.0.0"
    assert 0.0 <= result["score"] <= 1.0
