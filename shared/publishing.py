"""Publishing: a trained skill's local artifact folder becomes a registered, checksummed model version."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.artifacts import (
    ARTIFACT_FILES,
    BOOSTER_FILE,
    METADATA_FILE,
    ONNX_FILE,
    READABLE_METADATA_SCHEMA_VERSIONS,
    SCALER_FILE,
    ArtifactStore,
    manifest_digest,
    publish_files,
    sha256_hex,
    version_key,
)
from shared.errors import ArtifactIntegrityError, Conflict, NotFound
from shared.registry import ABANDON, RESERVED, UNKNOWN_ACTOR, ModelRegistry, ModelVersion

log = logging.getLogger(__name__)

# The files that make a model what it is. metadata.json is left out: the version is stamped into it,
# so it differs between two publishes of the very same model.
MODEL_FILES = (BOOSTER_FILE, ONNX_FILE, SCALER_FILE)
# Which identical version publishing names, when several are: the one most likely meant.
_STAGE_ORDER = {"production": 0, "canary": 1, "staging": 2, RESERVED: 3, "archived": 4}


class AlreadyPublished(Conflict):
    """The model files to publish are byte for byte those of a published version (`existing`)."""

    def __init__(self, existing: ModelVersion) -> None:
        if existing.stage == RESERVED:
            state = "still being published; if its publisher died, archive it first"
        else:
            state = existing.stage
        super().__init__(
            f"{existing.skill}: these model files (model.ubj, model.onnx, scaler.json) are already published as "
            f"{existing.version} ({state}); nothing new to publish. Promote {existing.version} instead, or publish "
            "with --force to register the same files again as a new version.",
            {"skill": existing.skill, "existing_version": existing.version, "stage": existing.stage},
        )
        self.existing = existing


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


def identical_version(registry: ModelRegistry, skill: str, checksums: dict[str, str]) -> ModelVersion | None:
    """Returns the skill's version whose model files have these sha256 checksums, or None.

    A version whose publishing was abandoned does not count (its files may never have been uploaded
    whole); one still being published does. Of several, the one serving, else the newest.
    """
    abandoned = {move.version for event in registry.history(skill) if event.action == ABANDON for move in event.changes}
    same = [
        v for v in registry.versions(skill)
        if v.version not in abandoned and all(v.checksums.get(name) == checksums[name] for name in MODEL_FILES)
    ]
    if not same:
        return None
    newest_first = list(reversed(same))
    return min(newest_first, key=lambda v: _STAGE_ORDER.get(v.stage, len(_STAGE_ORDER)))


def publish_version(
    registry: ModelRegistry,
    store: ArtifactStore,
    folder: Path,
    version: str | None = None,
    bump: str = "minor",
    *,
    force: bool = False,
    actor: str = UNKNOWN_ACTOR,
    reason: str | None = None,
) -> ModelVersion:
    """Publishes a trained folder as a new version of its skill, in stage `staging`; returns its record.

    Model files identical (by sha256) to those of a version of the skill already published are refused
    with AlreadyPublished, which names that version, unless `force`: then they are published again,
    and the history's reserve event says which version they repeat. The version (the next one by
    default) is stamped into the published metadata.json. Reserve first,
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
    Every registry step is recorded in the skill's history as made by `actor`, for `reason`.
    Raises NotFound or ArtifactIntegrityError for a bad folder, AlreadyPublished (a Conflict) for
    files already published, Conflict if the version exists, StoreUnavailable if a store cannot be reached.
    """
    files = read_trained_folder(folder)
    metadata = json.loads(files[METADATA_FILE])
    skill = metadata["skill"]
    model_checksums = {name: sha256_hex(files[name]) for name in MODEL_FILES}
    # Checked before reserving, not in the reservation's transaction: two publishers of the same files
    # at the same moment can both pass it; they then race for the same next version number, and one
    # gets Conflict (only two explicit, different --version numbers would both publish, as with force).
    repeated = identical_version(registry, skill, model_checksums)
    if repeated is not None and not force:
        raise AlreadyPublished(repeated)
    note = f"the same model files as {repeated.version}, published again (force)" if repeated is not None else None
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
        actor=actor,
        reason=reason,
        note=note,
    )
    try:
        publish_files(store, skill, version, files)
    except BaseException as exc:  # an interrupted upload spends the number too
        _abandon(registry, skill, version, exc, actor)
        raise
    return registry.complete(skill, version, actor=actor, reason=reason)


def _abandon(registry: ModelRegistry, skill: str, version: str, reason: BaseException, actor: str) -> None:
    """Archives the reservation of a publish whose upload failed; if the registry cannot do it either,
    says so, since the version then stays reserved until an operator archives it."""
    where = {"skill": skill, "model_version": version, "reason": str(reason)}
    try:
        registry.abandon(skill, version, actor=actor, reason=f"upload failed: {reason}"[:500])
    except Exception as exc:
        log.error("publish failed and its reservation could not be archived; archive it by hand",
                  extra={**where, "archive_error": str(exc)})
        return
    log.warning("publish failed; its reservation is archived", extra=where)
