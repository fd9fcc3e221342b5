"""Publishing: a trained skill's local artifact folder becomes a registered, checksummed model version."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.artifacts import (
    ARTIFACT_FILES,
    METADATA_FILE,
    READABLE_METADATA_SCHEMA_VERSIONS,
    ArtifactStore,
    manifest_digest,
    publish_files,
    sha256_hex,
    version_key,
)
from shared.errors import ArtifactIntegrityError, NotFound
from shared.registry import ModelRegistry, ModelVersion

log = logging.getLogger(__name__)


def read_trained_folder(folder: Path) -> dict[str, bytes]:
    """Returns the artifact files of a training output folder, checked against its metadata's checksums."""
    folder = Path(folder)
    missing = [name for name in ARTIFACT_FILES if not (folder / name).is_file()]
    if missing:
        raise NotFound(f"{folder} lacks the artifacts {missing}; train the skill first.")
    files = {name: (folder / name).read_bytes() for name in ARTIFACT_FILES}
    metadata = json.loads(files[METADATA_FILE])
    if metadata.get("schema_version") not in READABLE_METADATA_SCHEMA_VERSIONS:
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
    """Publishes a trained folder as a new version of its skill, in stage `staging`; returns its record.

    The version (the next one by default) is stamped into the published metadata.json. Reserve first,
    upload second, so that the registry, the source of truth, decides who owns a version before any
    byte is uploaded:

    1. Reserve: the complete record (each file's sha256 is known before upload) is inserted in stage
       `reserved`, in one transaction. Of two publishers of one version, the second gets Conflict
       here, having uploaded nothing.
    2. Upload every file. Cloud Storage uploads are conditional on the object not existing, so even a
       publisher that bypassed the registry could not replace a published file.
    3. Complete: the version moves from `reserved` to `staging`.

    If an upload fails, the reservation is archived and the error re-raised: the version number is
    spent, never reused with other files (publish again to get the next one). A reserved version is
    never served and cannot be promoted; one left reserved by a crashed publisher can be archived.
    Raises NotFound or ArtifactIntegrityError for a bad folder, Conflict if the version exists,
    StoreUnavailable if a store cannot be reached.
    """
    files = read_trained_folder(folder)
    metadata = json.loads(files[METADATA_FILE])
    skill = metadata["skill"]
    version = version or registry.next_version(skill, bump)
    metadata["version"] = version
    files[METADATA_FILE] = json.dumps(metadata, indent=1).encode()
    checksums = {name: sha256_hex(files[name]) for name in ARTIFACT_FILES}

    registry.reserve(
        skill,
        version,
        trained_at=metadata["trained_at"],
        metrics={"heldout": metadata["metrics"], "baseline": metadata["baseline_metrics"]},
        artifact_uri=store.uri_for(version_key(skill, version)),
        sha256=manifest_digest(checksums),
        checksums=checksums,
    )
    try:
        publish_files(store, skill, version, files)
    except BaseException as exc:  # an interrupted upload spends the number too
        _abandon(registry, skill, version, exc)
        raise
    return registry.complete(skill, version)


def _abandon(registry: ModelRegistry, skill: str, version: str, reason: BaseException) -> None:
    """Archives the reservation of a publish whose upload failed; if the registry cannot do it either,
    says so, since the version then stays reserved until an operator archives it."""
    where = {"skill": skill, "model_version": version, "reason": str(reason)}
    try:
        registry.abandon(skill, version)
    except Exception as exc:
        log.error("publish failed and its reservation could not be archived; archive it by hand",
                  extra={**where, "archive_error": str(exc)})
        return
    log.warning("publish failed; its reservation is archived", extra=where)
