"""The Firestore emulator from the Google Cloud CLI, run as its own Java process on a free port.

`FirestoreEmulator` starts, resets, restarts and stops it anywhere (benchmarks too). The pytest
fixtures run one per test session with FIRESTORE_EMULATOR_HOST naming it (restored after), and give
each test an emptied database. The jar is started with Java directly, not through `gcloud emulators firestore
start`, so that the process stopped at the end is the emulator itself and not a wrapper that leaves
it running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator

import pytest

from shared.gcp.firestore import FirestoreDatabase
from shared.local_stack import free_port
from tests.emulators import emulator_missing

# Emulator-only projects conventionally start with "demo-": no client ever mistakes them for a real one.
DEFAULT_PROJECT = "demo-skills"
JAR = Path("platform/cloud-firestore-emulator/cloud-firestore-emulator.jar")
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
# A test session's emulator lives for seconds: the quick C1 compiler alone and the serial collector
# start it in about half the time and ran a test workload twice as fast, on a 2-core machine, as the
# JVM's defaults (whose optimizing compiler spends more CPU than so short a run wins back).
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
KNOWN_SDK_ROOTS = (Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk"), Path("/opt/google-cloud-sdk"))
HOW_TO_INSTALL = (
    "install Java 11+ and the Google Cloud CLI component: `gcloud components install cloud-firestore-emulator` "
    "(or `apt-get install default-jre-headless google-cloud-cli-firestore-emulator`)"
)


class EmulatorNotInstalled(RuntimeError):
    """Java or the emulator jar is missing; `how_to_install` says how to get them."""

    def __init__(self, what: str, how_to_install: str = HOW_TO_INSTALL) -> None:
        super().__init__(f"{what}; {how_to_install}")
        self.what = what
        self.how_to_install = how_to_install


def find_jar() -> Path | None:
    """Returns the emulator jar: under a usual SDK folder, else where `gcloud info` says the SDK is."""
    for root in KNOWN_SDK_ROOTS:
        if (root / JAR).is_file():
            return root / JAR
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    try:
        answer = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True, text=True, timeout=60, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    jar = Path(answer.stdout.strip()) / JAR
    return jar if jar.is_file() else None


class FirestoreEmulator:
    """The official Firestore emulator on 127.0.0.1: start(), reset(), stop(), or a with-block.

    `host` is the value for FIRESTORE_EMULATOR_HOST. start() raises EmulatorNotInstalled when Java or
    the jar is missing, and RuntimeError (with the emulator's output) if it does not come up.
    """

    def __init__(self, project: str = DEFAULT_PROJECT, port: int = 0, startup_timeout: float = 60.0) -> None:
        self.project = project
        self.port = port
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, import_data: Path | None = None) -> FirestoreEmulator:
        """Starts the emulator (empty, or with the documents of an export: an `.overall_export_metadata` file)."""
        java = shutil.which("java")
        if java is None:
            raise EmulatorNotInstalled("Java is not installed (the Firestore emulator runs on it)")
        jar = find_jar()
        if jar is None:
            raise EmulatorNotInstalled("the Firestore emulator jar (cloud-firestore-emulator) is not installed")
        self.port = self.port or free_port()
        self._log = tempfile.NamedTemporaryFile(prefix="firestore-emulator-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [
                java, *JVM_OPTIONS, "-Duser.language=en", "-cp", str(jar), MAIN_CLASS, "start",
                "--host=127.0.0.1", f"--port={self.port}",
                *([f"--import-data={import_data}"] if import_data is not None else []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the Firestore emulator exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                    if response.read().strip() == b"Ok":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the Firestore emulator did not answer within {self.startup_timeout} s:\n{self.output()}")

    def reset(self) -> None:
        """Deletes every document of the project's default database (the emulator's documented endpoint)."""
        request = urllib.request.Request(
            f"http://{self.host}/emulator/v1/projects/{self.project}/databases/(default)/documents", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def export(self, folder: Path) -> Path:
        """Exports every document of the project's default database into `folder` (the emulator's documented
        export endpoint); returns the export's metadata file, which start(import_data=...) reads."""
        body = json.dumps({"database": f"projects/{self.project}/databases/(default)", "export_directory": str(folder)})
        request = urllib.request.Request(
            f"http://{self.host}/emulator/v1/projects/{self.project}:export",
            data=body.encode(), method="POST", headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
        return next(folder.rglob("*.overall_export_metadata"))

    def restart(self) -> None:
        """Stops the emulator and starts it again on the same port with the documents it held.

        The emulator keeps documents in memory only, so a plain restart would come back empty, which
        Firestore never does: the documents are exported just before the stop and imported at the start.
        Whatever reaches the emulator between the export and the stop is lost, so callers keep the
        service away from it meanwhile (tests/emulators/relay.py).
        """
        with tempfile.TemporaryDirectory(prefix="firestore-export-") as folder:
            metadata = self.export(Path(folder))
            self.stop()
            self.start(import_data=metadata)

    def output(self) -> str:
        """Returns what the emulator printed so far."""
        if self._log is None:
            return ""
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        """Stops the emulator process (SIGTERM, then SIGKILL after 10 s) and removes its log."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def database(self, **options: float) -> FirestoreDatabase:
        """Returns a FirestoreDatabase on this emulator's project (FIRESTORE_EMULATOR_HOST must name it)."""
        return FirestoreDatabase(self.project, "(default)", emulator_host=self.host, **options)

    def __enter__(self) -> FirestoreEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[FirestoreEmulator]:
    """One emulator for the test session; FIRESTORE_EMULATOR_HOST names it meanwhile (restored after),
    as the Google client and the settings read it. Skips (fails in CI) if it is not installed."""
    emulator = FirestoreEmulator()
    try:
        emulator.start()
    except EmulatorNotInstalled as missing:
        emulator_missing(missing.what, missing.how_to_install)
    previous = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
    try:
        yield emulator
    finally:
        if previous is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = previous
        emulator.stop()


@pytest.fixture(scope="session")
def firestore_session_database(firestore_emulator: FirestoreEmulator) -> FirestoreDatabase:
    """One client for the session (a client per test would open a gRPC channel per test)."""
    return firestore_emulator.database()


@pytest.fixture
def firestore_database(
    firestore_emulator: FirestoreEmulator, firestore_session_database: FirestoreDatabase
) -> FirestoreDatabase:
    """The emulator's database, emptied for this test."""
    firestore_emulator.reset()
    return firestore_session_database
