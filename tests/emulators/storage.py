"""The Cloud Storage emulator (gcp-storage-emulator, in process and in memory), recording every request it receives.

`StorageEmulator` starts and stops it anywhere (benchmarks too), and interrupts and resumes it keeping
its objects (an outage); the pytest fixtures run one per test session, point STORAGE_EMULATOR_HOST at
it, and give each test an empty prefix of its bucket. The emulator ignores generation preconditions
(it overwrites whatever `ifGenerationMatch` says), so tests check the preconditions the service sends
by reading the recorded requests instead.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

DEFAULT_BUCKET = "skills-models"


@dataclass(frozen=True)
class EmulatorRequest:
    """One HTTP request the emulator received: its method and its path with the query string."""

    method: str
    url: str

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.url).query)

    @property
    def is_upload(self) -> bool:
        """Whether it creates an object: a media, multipart or resumable-start upload (the JSON API's
        /upload/ path), or an XML API PUT of an object. The PUTs that carry the later chunks of a
        resumable upload belong to the upload their first request started, and are not counted."""
        path = urlsplit(self.url).path
        if path.startswith("/upload/"):
            return self.method == "POST"
        return self.method == "PUT" and not path.startswith(("/storage/", "/b/"))

    @property
    def is_download(self) -> bool:
        """Whether it reads an object's bytes (the metadata reads of the JSON API are not downloads)."""
        path = urlsplit(self.url).path
        return self.method == "GET" and (path.startswith("/download/") or self.query.get("alt") == ["media"])


class StorageEmulator:
    """gcp-storage-emulator serving one bucket from memory on 127.0.0.1, in a thread of this process.

    `url` is the value for STORAGE_EMULATOR_HOST; `requests` lists what it received, oldest first.
    Use start()/stop() or a with-block.
    """

    def __init__(self, bucket: str = DEFAULT_BUCKET, port: int = 0) -> None:
        self.bucket = bucket
        self.port = port
        self.url = ""
        self.requests: list[EmulatorRequest] = []
        self._lock = threading.Lock()
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._handler: Callable[..., BaseHTTPRequestHandler] | None = None

    def start(self) -> StorageEmulator:
        from gcp_storage_emulator.handlers import buckets
        from gcp_storage_emulator.server import RequestHandler
        from gcp_storage_emulator.storage import Storage

        emulator = self

        class RecordingHandler(RequestHandler):
            def parse_request(self) -> bool:
                parsed: bool = super().parse_request()
                if parsed:
                    emulator._record(EmulatorRequest(self.command, self.path))
                return parsed

        storage = Storage(use_memory_fs=True)
        buckets.create_bucket(self.bucket, storage)
        self._handler = partial(RecordingHandler, storage)
        self._serve()
        return self

    def _serve(self) -> None:
        # The emulator's own server class, but built here so that its handler can record: one request
        # at a time, as the emulator serves them (its storage is not written for concurrent handlers).
        assert self._handler is not None
        self._httpd = HTTPServer(("127.0.0.1", self.port), self._handler)
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="storage-emulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def interrupt(self) -> None:
        """Stops serving: the port refuses connections, as when Cloud Storage cannot be reached. The
        objects stay in memory for resume(), as Cloud Storage keeps them through an outage."""
        self.stop()

    def resume(self) -> None:
        """Serves the same objects on the same port again after interrupt()."""
        if self._handler is None:
            raise RuntimeError("the storage emulator was never started")
        if self._httpd is None:
            self._serve()

    def __enter__(self) -> StorageEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, request: EmulatorRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def mark(self) -> int:
        """Returns a position in the request log, for `since`."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[EmulatorRequest]:
        """Returns the requests received after `mark`."""
        with self._lock:
            return self.requests[mark:]


@pytest.fixture(scope="session")
def storage_emulator() -> Iterator[StorageEmulator]:
    """One emulator for the test session; STORAGE_EMULATOR_HOST names it meanwhile (restored after), as
    the Google client and the settings read it."""
    with StorageEmulator() as emulator:
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        try:
            yield emulator
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous


@dataclass(frozen=True)
class GcsLocation:
    """An empty prefix of the emulator's bucket, for one test."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        """The ARTIFACT_STORE value: gs://BUCKET/PREFIX."""
        return f"gs://{self.bucket}/{self.prefix}"


@pytest.fixture
def gcs_location(storage_emulator: StorageEmulator) -> GcsLocation:
    """A prefix no other test has written to: every test starts with an empty store."""
    return GcsLocation(storage_emulator.bucket, f"test-{uuid.uuid4().hex[:12]}")
