"""Artifact stores and publishing: round trips, containment, checksums, and what a published version records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.artifacts import (
    ARTIFACT_FILES,
    BOOSTER_FILE,
    METADATA_FILE,
    ONNX_FILE,
    SCALER_FILE,
    LocalArtifactStore,
    manifest_digest,
    open_artifact_store,
    publish_files,
    read_verified,
    sha256_hex,
    version_key,
)
from shared.errors import ArtifactIntegrityError, ConfigError, Conflict, NotFound
from shared.publishing import publish_version, read_trained_folder
from shared.registry import ModelRegistry, SqliteRegistryBackend
from shared.sqlite import SqliteDatabase

SKILL = "communication"


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(SqliteRegistryBackend(SqliteDatabase(tmp_path / "registry.sqlite3")))


@pytest.fixture
def trained_copy(trained_dir: Path, tmp_path: Path) -> Path:
    """A private copy of one trained skill folder, safe to tamper with."""
    return Path(shutil.copytree(trained_dir / SKILL, tmp_path / "trained" / SKILL))


# -- the local store -----------------------------------------------------------------------------


def test_put_get_round_trip(store: LocalArtifactStore) -> None:
    uri = store.put("communication/1.0.0/model.onnx", b"\x00\x01bytes")
    assert uri.startswith("file://")
    assert uri == store.uri_for("communication/1.0.0/model.onnx")
    assert store.get(uri) == b"\x00\x01bytes"
    assert (store.root / "communication" / "1.0.0" / "model.onnx").read_bytes() == b"\x00\x01bytes"


def test_put_replaces_and_leaves_no_temporary_file(store: LocalArtifactStore) -> None:
    uri = store.put("a/b.json", b"first")
    store.put("a/b.json", b"second")
    assert store.get(uri) == b"second"
    assert [p.name for p in (store.root / "a").iterdir()] == ["b.json"]


def test_a_key_with_spaces_round_trips(store: LocalArtifactStore) -> None:
    uri = store.put("odd skill/1.0.0/model.onnx", b"x")
    assert " " not in uri
    assert store.get(uri) == b"x"


def test_folder_uris_keep_their_trailing_slash(store: LocalArtifactStore) -> None:
    folder = store.uri_for(version_key(SKILL, "1.0.0"))
    assert folder.endswith("/communication/1.0.0/")
    assert not store.uri_for("communication/1.0.0/model.onnx").endswith("/")
    # A file's URI is its folder's URI plus its name: how read_verified addresses files.
    assert folder + "model.onnx" == store.uri_for("communication/1.0.0/model.onnx")


def test_get_outside_the_root_is_refused(store: LocalArtifactStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not an artifact")
    with pytest.raises(ArtifactIntegrityError):
        store.get(secret.as_uri())
    with pytest.raises(ArtifactIntegrityError):
        store.get(store.uri_for("") + "/../secret.txt")
    with pytest.raises(ArtifactIntegrityError):
        store.get("https://example.invalid/model.onnx")


def test_put_outside_the_root_is_refused(store: LocalArtifactStore, tmp_path: Path) -> None:
    # The mirror of get's check: a key must not climb out of the store.
    with pytest.raises(ArtifactIntegrityError):
        store.put("../escaped.bin", b"x")
    assert not (tmp_path / "escaped.bin").exists()


def test_get_of_a_missing_artifact_is_not_found(store: LocalArtifactStore) -> None:
    with pytest.raises(NotFound):
        store.get(store.uri_for("communication/9.9.9/model.onnx"))


def test_read_verified_checks_the_sha256(store: LocalArtifactStore) -> None:
    files = {name: f"content of {name}".encode() for name in ARTIFACT_FILES}
    uri, checksums = publish_files(store, SKILL, "1.0.0", files)
    assert uri == store.uri_for("communication/1.0.0/")
    assert checksums == {name: sha256_hex(data) for name, data in files.items()}
    for name in ARTIFACT_FILES:
        assert read_verified(store, uri, checksums, name) == files[name]

    (store.root / SKILL / "1.0.0" / SCALER_FILE).write_bytes(b"content of scaler.json, tampered")
    with pytest.raises(ArtifactIntegrityError, match=SCALER_FILE):
        read_verified(store, uri, checksums, SCALER_FILE)
    with pytest.raises(ArtifactIntegrityError):
        read_verified(store, uri, {}, ONNX_FILE)


def test_publish_files_needs_every_artifact(store: LocalArtifactStore) -> None:
    files = {name: b"x" for name in ARTIFACT_FILES if name != ONNX_FILE}
    with pytest.raises(ArtifactIntegrityError, match=ONNX_FILE):
        publish_files(store, SKILL, "1.0.0", files)
    assert not (store.root / SKILL).exists()


def test_manifest_digest_covers_names_and_checksums() -> None:
    checksums = {"b": "2" * 64, "a": "1" * 64}
    assert manifest_digest(checksums) == manifest_digest(dict(reversed(list(checksums.items()))))
    assert manifest_digest(checksums) != manifest_digest({"a": "2" * 64, "b": "1" * 64})
    assert manifest_digest(checksums) != manifest_digest({"a": "1" * 64})


# -- choosing a store ----------------------------------------------------------------------------


def test_open_artifact_store_takes_a_path_or_file_uri(tmp_path: Path) -> None:
    by_path = open_artifact_store(str(tmp_path / "a"))
    by_uri = open_artifact_store((tmp_path / "a").as_uri())
    assert isinstance(by_path, LocalArtifactStore) and isinstance(by_uri, LocalArtifactStore)
    assert by_path.root == by_uri.root == (tmp_path / "a").resolve()


@pytest.mark.parametrize("location", ["s3://bucket/prefix", "ftp://host/x", "azure://c/p"])
def test_an_unknown_scheme_lists_the_known_ones(location: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_artifact_store(location)
    message = str(caught.value)
    assert "ARTIFACT_STORE" in message
    assert location.split(":")[0] in message
    assert "file://" in message and "folder path" in message


# -- publishing ----------------------------------------------------------------------------------


def test_publish_version_stamps_and_records_checksums(
    registry: ModelRegistry, store: LocalArtifactStore, trained_copy: Path
) -> None:
    record = publish_version(registry, store, trained_copy)
    assert (record.skill, record.version, record.stage) == (SKILL, "1.0.0", "staging")
    assert record.artifact_uri == store.uri_for(version_key(SKILL, "1.0.0"))
    assert set(record.checksums) == set(ARTIFACT_FILES)

    stored = {name: store.get(record.artifact_uri + name) for name in ARTIFACT_FILES}
    for name, data in stored.items():
        assert record.checksums[name] == sha256_hex(data), name
    assert record.sha256 == manifest_digest(record.checksums)

    metadata = json.loads(stored[METADATA_FILE])
    assert metadata["version"] == "1.0.0"
    assert metadata["skill"] == SKILL
    # Only metadata.json changes on the way; the model files are published byte for byte.
    for name in (BOOSTER_FILE, ONNX_FILE, SCALER_FILE):
        assert stored[name] == (trained_copy / name).read_bytes()
        assert metadata["artifacts"][name] == record.checksums[name]
    assert json.loads((trained_copy / METADATA_FILE).read_text())["version"] is None

    trained = json.loads((trained_copy / METADATA_FILE).read_text())
    assert record.trained_at == trained["trained_at"]
    assert record.metrics == {"heldout": trained["metrics"], "baseline": trained["baseline_metrics"]}
    assert registry.get(SKILL, "1.0.0") == record


def test_publish_version_picks_the_next_version(
    registry: ModelRegistry, store: LocalArtifactStore, trained_copy: Path
) -> None:
    assert publish_version(registry, store, trained_copy).version == "1.0.0"
    assert publish_version(registry, store, trained_copy, force=True).version == "1.1.0"
    assert publish_version(registry, store, trained_copy, bump="patch", force=True).version == "1.1.1"
    assert publish_version(registry, store, trained_copy, version="3.0.0", force=True).version == "3.0.0"
    second = json.loads(store.get(registry.get(SKILL, "1.1.0").artifact_uri + METADATA_FILE))
    assert second["version"] == "1.1.0"


@pytest.mark.parametrize("name", [BOOSTER_FILE, ONNX_FILE, SCALER_FILE])
def test_publish_rejects_a_file_that_no_longer_matches_its_metadata(
    registry: ModelRegistry, store: LocalArtifactStore, trained_copy: Path, name: str
) -> None:
    path = trained_copy / name
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(ArtifactIntegrityError, match=name):
        publish_version(registry, store, trained_copy)
    assert registry.versions(SKILL) == []
    assert not (store.root / SKILL).exists()


def test_publish_rejects_a_folder_missing_a_file(
    registry: ModelRegistry, store: LocalArtifactStore, trained_copy: Path
) -> None:
    (trained_copy / ONNX_FILE).unlink()
    with pytest.raises(NotFound, match=ONNX_FILE):
        publish_version(registry, store, trained_copy)


def test_publish_rejects_an_unknown_metadata_schema(
    registry: ModelRegistry, store: LocalArtifactStore, trained_copy: Path
) -> None:
    metadata = json.loads((trained_copy / METADATA_FILE).read_text())
    metadata["schema_version"] = 99
    (trained_copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ArtifactIntegrityError, match="schema_version"):
        read_trained_folder(trained_copy)


def test_publishing_an_existing_version_leaves_it_intact(
    registry: ModelRegistry, store: LocalArtifactStore, trained_copy: Path
) -> None:
    """A rejected publish must not have overwritten the registered version's files on the way."""
    published = publish_version(registry, store, trained_copy)
    # Retrained: same models, new metadata (a different trained_at), so a different metadata.json.
    metadata = json.loads((trained_copy / METADATA_FILE).read_text())
    metadata["trained_at"] = "2031-01-01T00:00:00.000Z"
    (trained_copy / METADATA_FILE).write_text(json.dumps(metadata))

    with pytest.raises(Conflict):
        publish_version(registry, store, trained_copy, version=published.version)
    for name in ARTIFACT_FILES:
        read_verified(store, published.artifact_uri, published.checksums, name)
