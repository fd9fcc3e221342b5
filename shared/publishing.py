"""Publishing: a trained skill's local artifact folder becomes a registered, checksummed model version."""

from __future__ import annotations

import json
from pathlib import Path

from shared.artifacts import (
    ARTIFACT_FILES,
    METADATA_FILE,
    METADATA_SCHEMA_VERSION,
    ArtifactStore,
    manifest_digest,
    publish_files,
    sha256_hex,
)
from shared.errors import ArtifactIntegrityError, Conflict, NotFound
from shared.registry import ModelRegistry, ModelVersion


def read_trained_folder(folder: Path) -> dict[str, bytes]:
    """Returns the artifact files of a training output folder, checked against its metadata's checksums."""
    folder = Path(folder)
    missing = [name for name in ARTIFACT_FILES if not (folder / name).is_file()]
    if missing:
        raise NotFound(f"{folder} lacks the artifacts {missing}; train the skill first.")
    files = {name: (folder / name).read_bytes() for name in ARTIFACT_FILES}
    metadata = json.loads(files[METADATA_FILE])
    if metadata.get("schema_version") != METADATA_SCHEMA_VERSION:
        raise ArtifactIntegrityError(f"{folder}/{METADATA_FILE} has an unknown schema_version.")
    for name, digest in metadata["artifacts"].items():
        if sha256_hex(files[name]) != digest:
            raise ArtifactIntegrityError(f"{folder}/{name} does not match the sha256 in its metadata.")
    return files


def publish_version(
    registry: ModelRegistry,
    store: ArtifactStore,
    folder: Path,
    version: str | None = None,
    bump: str = "minor",
) -> ModelVersion:
    """Uploads a trained folder as a new version of its skill and registers it in stage `staging`.

    The version (the next one by default) is stamped into the published metadata.json; the
    registry records the sha256 of every file, which the engine checks on every load.
    """
    files = read_trained_folder(folder)
    metadata = json.loads(files[METADATA_FILE])
    skill = metadata["skill"]
    version = version or registry.next_version(skill, bump)
    if any(v.version == version for v in registry.versions(skill)):
        # Checked before writing: uploading first would overwrite the registered version's files.
        raise Conflict(f"Skill {skill!r} already has version {version!r}.")
    metadata["version"] = version
    files[METADATA_FILE] = json.dumps(metadata, indent=1).encode()
    uri, checksums = publish_files(store, skill, version, files)
    return registry.register(
        skill,
        version,
        trained_at=metadata["trained_at"],
        metrics={"heldout": metadata["metrics"], "baseline": metadata["baseline_metrics"]},
        artifact_uri=uri,
        sha256=manifest_digest(checksums),
        checksums=checksums,
    )
