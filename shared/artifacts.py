"""Model artifacts: the fixed files of a version folder, their checksums, and the stores that hold them."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Protocol
from urllib.parse import unquote, urlparse

from shared.errors import ArtifactIntegrityError, ConfigError, NotFound

log = logging.getLogger(__name__)

# The artifact contract of one model version: these names, in one folder per skill and version.
BOOSTER_FILE = "model.ubj"  # XGBoost's native UBJSON format: batch scoring and explanations
ONNX_FILE = "model.onnx"  # the same trees for ONNX Runtime: the online path
SCALER_FILE = "scaler.json"  # {"feature_names", "mean", "scale"}
METADATA_FILE = "metadata.json"  # version, metrics, checksums, reference distributions
ARTIFACT_FILES = (BOOSTER_FILE, ONNX_FILE, SCALER_FILE, METADATA_FILE)
# 2 adds each reference distribution's 101 quantiles and held-out counts (drift checks: PSI and KS).
METADATA_SCHEMA_VERSION = 2
# Versions the service still loads: models published before a bump keep serving.
READABLE_METADATA_SCHEMA_VERSIONS = (1, 2)
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
        """Stores the bytes under the key and returns the URI.

        The local store replaces an existing file; Cloud Storage never replaces an object and raises
        Conflict instead. Publishing writes each key once, after the registry has reserved its version.
        Raises ArtifactIntegrityError for a key that lies outside the store.
        """
        ...

    def get(self, uri: str) -> bytes:
        """Returns the bytes at a URI of this store; raises NotFound if there are none,
        ArtifactIntegrityError for a URI outside the store, StoreUnavailable if a remote store is unreachable."""
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


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ArtifactCache:
    """Artifact bytes downloaded on this instance, one file per sha256, kept for the instance's life.

    Entries are written only after their bytes matched the registry's sha256, and are named by it, so
    one entry serves every version folder that holds the same bytes. Each read hashes the entry again:
    a corrupted entry is dropped and downloaded anew. Writes are atomic (write, then rename), so the
    worker processes of one instance can share the folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path_for(self, sha256: str) -> Path:
        return self.folder / sha256

    def read(self, sha256: str) -> bytes | None:
        """Returns the cached bytes with this sha256, or None if there are none (or they no longer match)."""
        if not _SHA256_HEX.fullmatch(sha256):
            return None
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("artifact cache unreadable; downloading", extra={"path": str(path), "reason": str(exc)})
            return None
        if sha256_hex(data) != sha256:
            log.warning("artifact cache entry corrupted; dropping it", extra={"path": str(path)})
            path.unlink(missing_ok=True)
            return None
        return data

    def write(self, sha256: str, data: bytes) -> None:
        """Keeps bytes already checked against this sha256; a cache that cannot be written only costs
        a download later, so the failure is logged, not raised."""
        if not _SHA256_HEX.fullmatch(sha256):
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{sha256}.")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, self.path_for(sha256))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("artifact cache not written", extra={"folder": str(self.folder), "reason": str(exc)})


class CachedArtifactStore:
    """A remote store with the instance's ArtifactCache in front of its verified reads.

    `put` and `get` go to the remote store; `read_verified` (the only reader of model files) asks the
    cache first and fills it after each verified download, so a warm instance downloads a file once.
    """

    def __init__(self, remote: ArtifactStore, cache: ArtifactCache) -> None:
        self.remote = remote
        self.cache = cache

    def __repr__(self) -> str:
        return f"CachedArtifactStore({self.remote!r}, cache={str(self.cache.folder)!r})"

    def uri_for(self, key: str) -> str:
        return self.remote.uri_for(key)

    def put(self, key: str, data: bytes) -> str:
        return self.remote.put(key, data)

    def get(self, uri: str) -> bytes:
        return self.remote.get(uri)

    def get_verified(self, uri: str, sha256: str) -> bytes:
        """Returns the bytes with this sha256 from the cache, or downloads, checks and caches them;
        raises ArtifactIntegrityError if the download has another sha256 (nothing is cached then)."""
        cached = self.cache.read(sha256)
        if cached is not None:
            return cached
        data = _checked(uri, self.remote.get(uri), sha256)
        self.cache.write(sha256, data)
        return data


_KNOWN_LOCATIONS = "a folder path, file://, gs://BUCKET/PREFIX"


def open_artifact_store(location: str, cache_dir: Path | None = None, *, emulator_host: str = "") -> ArtifactStore:
    """Returns the store for a setting value; the one place a URI scheme picks the implementation.

    A folder path or file:// URI is a LocalArtifactStore (reading it is the download: no cache).
    gs://BUCKET/PREFIX is a GcsArtifactStore, behind an ArtifactCache in cache_dir when one is given;
    emulator_host is the Cloud Storage emulator's URL, if any. Raises ConfigError for another scheme.
    """
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return LocalArtifactStore(Path(unquote(parsed.path) if parsed.scheme else location))
    if parsed.scheme == "gs":
        if not parsed.netloc:
            raise ConfigError(f"Config 'ARTIFACT_STORE' must name the bucket after gs://; got {location!r}.")
        # Imported here: a process on the embedded default never loads the Cloud Storage module.
        from shared.gcp.storage import GcsArtifactStore

        remote = GcsArtifactStore(parsed.netloc, unquote(parsed.path).strip("/"), emulator_host=emulator_host)
        return remote if cache_dir is None else CachedArtifactStore(remote, ArtifactCache(cache_dir))
    raise ConfigError(
        f"Config 'ARTIFACT_STORE' has the unknown scheme {parsed.scheme!r}; known: {_KNOWN_LOCATIONS}."
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
    """Returns one file of a version folder, checked against the registry's sha256 before anyone reads it.

    A CachedArtifactStore answers from the instance cache when it holds those bytes. Raises
    ArtifactIntegrityError if the registry records no sha256 for the file or the bytes have another,
    NotFound if the file is missing, StoreUnavailable if a remote store is unreachable.
    """
    expected = checksums.get(name)
    if expected is None:
        raise ArtifactIntegrityError(f"The registry records no sha256 for {name} of {artifact_uri}.")
    uri = artifact_uri + name
    if isinstance(store, CachedArtifactStore):
        return store.get_verified(uri, expected)
    return _checked(uri, store.get(uri), expected)


def _checked(uri: str, data: bytes, expected: str) -> bytes:
    actual = sha256_hex(data)
    if actual != expected:
        raise ArtifactIntegrityError(f"{uri} has sha256 {actual}, but the registry records {expected}.")
    return data
