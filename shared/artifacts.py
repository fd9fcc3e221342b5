"""Model artifacts: the fixed files of a version folder, their checksums, and the stores that hold them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping, Protocol
from urllib.parse import unquote, urlparse

from shared.errors import ArtifactIntegrityError, ConfigError, NotFound

# The artifact contract of one model version: these names, in one folder per skill and version.
BOOSTER_FILE = "model.ubj"  # XGBoost's native UBJSON format: batch scoring and explanations
ONNX_FILE = "model.onnx"  # the same trees for ONNX Runtime: the online path
SCALER_FILE = "scaler.json"  # {"feature_names", "mean", "scale"}
METADATA_FILE = "metadata.json"  # version, metrics, checksums, reference distributions
ARTIFACT_FILES = (BOOSTER_FILE, ONNX_FILE, SCALER_FILE, METADATA_FILE)
METADATA_SCHEMA_VERSION = 1
# The ONNX graph's input (scaled float32 features) and the output the service reads (P per class).
ONNX_INPUT = "input"
ONNX_PROBABILITIES = "probabilities"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(checksums: Mapping[str, str]) -> str:
    """Returns one sha256 that stands for a whole version folder (over its sorted name/checksum pairs)."""
    lines = "".join(f"{name} {checksums[name]}\n" for name in sorted(checksums))
    return sha256_hex(lines.encode())


class ArtifactStore(Protocol):
    """Holds artifact bytes under keys such as `communication/1.2.0/model.onnx`."""

    def uri_for(self, key: str) -> str:
        """Returns the URI the key has (or would have) in this store."""
        ...

    def put(self, key: str, data: bytes) -> str:
        """Stores the bytes under the key, replacing any; returns the URI."""
        ...

    def get(self, uri: str) -> bytes:
        """Returns the bytes at a URI of this store; raises NotFound if there are none."""
        ...


class LocalArtifactStore:
    """Artifacts in a local folder, addressed by file:// URIs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def uri_for(self, key: str) -> str:
        # as_uri() drops a trailing slash, which marks a version folder's URI.
        return (self.root / key).as_uri() + ("/" if key.endswith("/") else "")

    def put(self, key: str, data: bytes) -> str:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactIntegrityError(f"The key {key!r} lies outside the artifact store {self.root}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ArtifactIntegrityError(f"{uri} is not a file:// URI of the local artifact store.")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactIntegrityError(f"{uri} lies outside the artifact store {self.root}.")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"No artifact at {uri}.") from None


def open_artifact_store(location: str) -> ArtifactStore:
    """Returns the store for a setting value: a folder path or file:// URI (gs:// arrives with the GCP backends)."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return LocalArtifactStore(Path(unquote(parsed.path) if parsed.scheme else location))
    raise ConfigError(
        f"Config 'ARTIFACT_STORE' has the unknown scheme {parsed.scheme!r}; known: a folder path, file://."
    )


def version_key(skill: str, version: str) -> str:
    return f"{skill}/{version}/"


def publish_files(store: ArtifactStore, skill: str, version: str, files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
    """Writes a version folder; returns its URI and the sha256 of each file."""
    missing = set(ARTIFACT_FILES) - set(files)
    if missing:
        raise ArtifactIntegrityError(f"A version needs the files {sorted(missing)} too.")
    checksums: dict[str, str] = {}
    for name in ARTIFACT_FILES:
        store.put(version_key(skill, version) + name, files[name])
        checksums[name] = sha256_hex(files[name])
    return store.uri_for(version_key(skill, version)), checksums


def read_verified(store: ArtifactStore, artifact_uri: str, checksums: Mapping[str, str], name: str) -> bytes:
    """Returns one file of a version folder; raises ArtifactIntegrityError if its sha256 differs from the record."""
    expected = checksums.get(name)
    if expected is None:
        raise ArtifactIntegrityError(f"The registry records no sha256 for {name} of {artifact_uri}.")
    data = store.get(artifact_uri + name)
    actual = sha256_hex(data)
    if actual != expected:
        raise ArtifactIntegrityError(
            f"{artifact_uri}{name} has sha256 {actual}, but the registry records {expected}."
        )
    return data
