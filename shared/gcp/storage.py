"""The Cloud Storage artifact store: version folders as objects under gs://BUCKET/PREFIX, never overwritten."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from shared.errors import ArtifactIntegrityError, Conflict, NotFound, StoreUnavailable

if TYPE_CHECKING:
    from google.cloud.storage import Bucket, Client

# One client per process and endpoint: a client holds an authorized HTTP session and its connection
# pool, which every store of the process shares. Keyed by the emulator URL ("" for Google's endpoint)
# so that a test pointing one store at a dead port does not disturb the others.
_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()

# Project the client names when talking to an emulator (which has no projects, but the client wants one).
EMULATOR_PROJECT = "local"

# How long a download retries in all before it fails as StoreUnavailable. Downloads load models, in the
# request that finds the registry changed, while the loaded version keeps serving: a blip (a 503, a reset
# connection) is ridden out in the client's first backoff steps (1, 2, 4 s), and an outage then costs that
# request seconds, not the minute uploads may take (a publish is an operator's, with time to wait).
DOWNLOAD_RETRY_SECONDS = 10.0


def storage_client(emulator_host: str = "") -> Client:
    """Returns the process's Cloud Storage client for Google's endpoint, or for the emulator at that URL.

    Built on first call, so a process that never touches Cloud Storage never imports its client.
    Without an emulator_host the client still honours STORAGE_EMULATOR_HOST itself.
    """
    client = _clients.get(emulator_host)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(emulator_host)
        if client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud.storage import Client as StorageClient

            if emulator_host:
                endpoint = emulator_host if "://" in emulator_host else f"http://{emulator_host}"
                client = StorageClient(
                    project=EMULATOR_PROJECT,
                    credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": endpoint},
                )
            else:
                client = StorageClient()
            _clients[emulator_host] = client
    return client


def _content_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


class GcsArtifactStore:
    """Artifacts as objects of one bucket under a prefix, addressed by gs://bucket/prefix/<key> URIs.

    Every upload is conditional on the object not existing (if_generation_match=0): a published
    file is never replaced, so what the registry's checksums describe cannot change under them.
    `timeout` bounds each request and, with retries of transient failures, each whole upload;
    `download_retry_seconds` (at most `timeout`) bounds each whole download.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        emulator_host: str = "",
        timeout: float = 60.0,
        download_retry_seconds: float = DOWNLOAD_RETRY_SECONDS,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"{bucket!r} is not a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.emulator_host = emulator_host
        self.timeout = timeout
        self.download_retry_seconds = min(download_retry_seconds, timeout)
        self._handles: tuple[Bucket, Any, Any] | None = None

    def __repr__(self) -> str:
        return f"GcsArtifactStore({self.uri_for('')!r})"

    # -- addressing ------------------------------------------------------------------------------

    def uri_for(self, key: str) -> str:
        return f"gs://{self.bucket}/{self._object_name(key, folder_ok=True)}"

    def _object_name(self, key: str, folder_ok: bool = False) -> str:
        """Returns the object name of a key under the prefix; raises ArtifactIntegrityError for a key that
        could name anything else (absolute, `..`, `.` or empty segments)."""
        segments = key.split("/")
        if folder_ok and key.endswith("/"):
            segments = segments[:-1]
        if key and any(s in ("", ".", "..") for s in segments):
            raise ArtifactIntegrityError(f"The key {key!r} lies outside the artifact store {self.uri_for('')}.")
        return "/".join(p for p in (self.prefix, key) if p)

    def _name_of(self, uri: str) -> str:
        """Returns the object name a URI of this store addresses; raises ArtifactIntegrityError otherwise."""
        root = f"gs://{self.bucket}/" + (f"{self.prefix}/" if self.prefix else "")
        if not uri.startswith(root) or uri == root:
            raise ArtifactIntegrityError(f"{uri} lies outside the artifact store {root}.")
        key = uri[len(root):]
        # The same check as a key's: gs://b/prefix/../other would otherwise escape the prefix.
        return self._object_name(key)

    # -- reading and writing ---------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> str:
        """Uploads the bytes as a new object and returns its URI.

        Raises Conflict if the object exists with other bytes (objects are never replaced),
        StoreUnavailable if Cloud Storage cannot be reached, NotFound if the bucket does not exist.
        """
        from google.api_core.exceptions import NotFound as GoogleNotFound
        from google.api_core.exceptions import PreconditionFailed

        name = self._object_name(key)
        uri = f"gs://{self.bucket}/{name}"
        bucket, retry, _ = self._bucket_and_retries()
        blob = bucket.blob(name)
        try:
            with self._translated("upload", uri):
                blob.upload_from_string(
                    data,
                    content_type=_content_type(name),
                    if_generation_match=0,
                    timeout=self.timeout,
                    retry=retry,
                )
        except PreconditionFailed:
            # A retried upload whose first attempt landed also fails its precondition; the same
            # bytes already there are that upload, not someone else's.
            if self._existing_bytes(blob, uri, retry) == data:
                return uri
            raise Conflict(f"{uri} already exists with other content; published artifacts are never replaced.") from None
        except GoogleNotFound:
            raise NotFound(f"The bucket gs://{self.bucket} does not exist.") from None
        return uri

    def get(self, uri: str) -> bytes:
        """Returns the object's bytes; raises NotFound if there is none, StoreUnavailable if Cloud Storage
        cannot be reached, ArtifactIntegrityError for a URI outside this store."""
        from google.api_core.exceptions import NotFound as GoogleNotFound

        name = self._name_of(uri)
        bucket, _, retry = self._bucket_and_retries()
        try:
            with self._translated("download", uri):
                data: bytes = bucket.blob(name).download_as_bytes(timeout=self.timeout, retry=retry)
        except GoogleNotFound:
            raise NotFound(f"No artifact at {uri}.") from None
        return data

    def _existing_bytes(self, blob: Any, uri: str, retry: Any) -> bytes | None:
        from google.api_core.exceptions import NotFound as GoogleNotFound

        try:
            with self._translated("download", uri):
                existing: bytes = blob.download_as_bytes(timeout=self.timeout, retry=retry)
        except GoogleNotFound:
            return None
        return existing

    def _bucket_and_retries(self) -> tuple[Bucket, Any, Any]:
        """Returns the bucket, the retry of uploads and the retry of downloads."""
        # Built on first use; two threads racing here build equal handles on the one shared client.
        if self._handles is None:
            from google.cloud.storage.retry import DEFAULT_RETRY

            # The default retries for two minutes; an upload that cannot reach Cloud Storage should fail
            # within the store's timeout instead, a download (a model load) sooner (DOWNLOAD_RETRY_SECONDS).
            self._handles = (
                storage_client(self.emulator_host).bucket(self.bucket),
                DEFAULT_RETRY.with_timeout(self.timeout),
                DEFAULT_RETRY.with_timeout(self.download_retry_seconds),
            )
        return self._handles

    @contextmanager
    def _translated(self, action: str, uri: str) -> Iterator[None]:
        """Turns Cloud Storage's transient and access failures into StoreUnavailable; NotFound and
        PreconditionFailed pass through for the caller to judge."""
        from google.api_core.exceptions import Forbidden, RetryError, ServerError, TooManyRequests, Unauthorized
        from google.auth.exceptions import TransportError
        from google.cloud.storage.exceptions import DataCorruption

        try:
            yield
        except (ServerError, TooManyRequests, RetryError, TransportError, DataCorruption) as exc:
            raise StoreUnavailable(f"Cloud Storage could not {action} {uri}: {exc}") from exc
        except (Forbidden, Unauthorized) as exc:
            raise StoreUnavailable(f"Cloud Storage refused to {action} {uri} to this service: {exc}") from exc
        except OSError as exc:  # requests' connection errors and timeouts are OSErrors
            raise StoreUnavailable(f"Cloud Storage could not be reached to {action} {uri}: {exc}") from exc
