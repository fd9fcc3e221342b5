"""The Cloud Tasks emulator (gcloud-tasks-emulator, in .venv-tasks-emulator) as a subprocess, its pytest fixture,
and a CreateTask stand-in for the API behaviour the emulator leaves out.

What the emulator does, read from its server.py (0.6.2): it speaks gRPC only, keeps queues and tasks
in memory, delivers the HTTP tasks of a running queue one at a time to `http_request.url` with the
X-CloudTasks-* headers, puts a task that got a 4xx/5xx (or no answer) back at the end of its queue at
once (no backoff) until `--max-retries` retries are used up, and ignores a task's OIDC token, a
queue's retry and rate settings and task names (CreateTask appends: no ALREADY_EXISTS). It has no
GetTask: read tasks back with ListTasks.
"""

from __future__ import annotations

import itertools
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, Iterator

import pytest

from shared.local_stack import free_port
from shared.settings import PROJECT_ROOT
from tests.emulators import emulator_missing, wait_for_port

if TYPE_CHECKING:
    from google.cloud import tasks_v2

EMULATOR_VENV = PROJECT_ROOT / ".venv-tasks-emulator"
EMULATOR_BIN = EMULATOR_VENV / "bin" / "gcloud-tasks-emulator"
# `-r 2`: at most 2 retries, so 3 attempts, as TASK_MAX_ATTEMPTS's default gives the embedded queue.
MAX_RETRIES = 2
START_TIMEOUT_SECONDS = 30.0
# ListTasks answers with every task of a queue in one message; 5,000 chunk tasks of a few KB each
# exceed gRPC's default 4 MB receive limit.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024


class CloudTasksEmulator:
    """The emulator on a free port of 127.0.0.1, with an admin client (the official one) to set up queues.

    Use as a context manager, or call start() and stop(). `host` is what CLOUD_TASKS_EMULATOR_HOST takes.
    """

    def __init__(self, port: int | None = None, max_retries: int = MAX_RETRIES) -> None:
        self.port = port or free_port()
        self.max_retries = max_retries
        self.host = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: tasks_v2.CloudTasksClient | None = None

    @staticmethod
    def installed() -> bool:
        return EMULATOR_BIN.is_file()

    def start(self) -> CloudTasksEmulator:
        """Starts the emulator and waits until its port accepts connections; raises RuntimeError if it dies."""
        if not self.installed():
            raise RuntimeError(f"The Cloud Tasks emulator is not installed at {EMULATOR_VENV}; run `make emulators`.")
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [str(EMULATOR_BIN), "start", "--port", str(self.port), "-r", str(self.max_retries), "-q"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
        try:
            wait_for_port("127.0.0.1", self.port, START_TIMEOUT_SECONDS)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"the Cloud Tasks emulator did not start on {self.host}") from None
        if self.process.poll() is not None:
            output = self.log()
            self.stop()
            raise RuntimeError(f"the Cloud Tasks emulator exited at start: {output[-2000:]}")
        return self

    def stop(self) -> None:
        """Stops the emulator: SIGTERM, then SIGKILL if it has not exited within 5 s."""
        if self._client is not None:
            self._client.transport.close()
            self._client = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """Returns what the emulator wrote so far (it logs errors only: it runs with -q)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> CloudTasksEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- administration, through the official client ----------------------------------------------

    @property
    def client(self) -> tasks_v2.CloudTasksClient:
        """An official client on an insecure channel to the emulator (it speaks plain gRPC, no TLS, no auth)."""
        if self._client is None:
            import grpc
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import tasks_v2
            from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

            channel = grpc.insecure_channel(self.host, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
            transport = CloudTasksGrpcTransport(channel=channel, credentials=AnonymousCredentials())
            self._client = tasks_v2.CloudTasksClient(transport=transport)
        return self._client

    def create_queue(self, path: str, paused: bool = False) -> str:
        """Creates the queue `projects/P/locations/L/queues/Q` (paused: nothing is delivered); returns its path."""
        from google.cloud import tasks_v2

        parent = path.rsplit("/queues/", 1)[0]
        self.client.create_queue(parent=parent, queue=tasks_v2.Queue(name=path))
        if paused:
            self.client.pause_queue(name=path)
        return path

    def list_tasks(self, path: str) -> list[tasks_v2.Task]:
        """Returns the tasks waiting in a queue (all of them: the emulator does not page)."""
        from google.cloud import tasks_v2

        request = tasks_v2.ListTasksRequest(parent=path, response_view=tasks_v2.Task.View.FULL)
        return list(self.client.list_tasks(request=request))


_queue_numbers = itertools.count(1)


def new_queue_path(prefix: str = "q") -> str:
    """Returns a queue path not used before in this process, so tests sharing one emulator stay apart."""
    return f"projects/skills-test/locations/us-central1/queues/{prefix}-{next(_queue_numbers)}"


@pytest.fixture(scope="session")
def cloud_tasks_emulator() -> Iterator[CloudTasksEmulator]:
    """One emulator for the test session; each test makes its own queues (new_queue_path)."""
    if not CloudTasksEmulator.installed():
        emulator_missing("the Cloud Tasks emulator", "run `make emulators`")
    with CloudTasksEmulator() as emulator:
        yield emulator


# -- a stand-in for what the emulator leaves out ---------------------------------------------------


class CreateTaskStandIn:
    """A gRPC server that answers CreateTask as the Cloud Tasks API documents it, which the emulator does not.

    The API answers ALREADY_EXISTS to a CreateTask whose task id is that of an existing (or recently
    deleted or executed) task; the emulator appends every task whatever its name. This server keeps
    the names it has seen and answers ALREADY_EXISTS for a repeat. It can also answer slowly (the
    latency of the real service across a network), answer UNAVAILABLE to the first calls, or never
    answer; it counts the calls it had in flight at once and records the deadline each call arrived with.
    Only CreateTask is served.
    """

    SERVICE = "google.cloud.tasks.v2.CloudTasks"

    def __init__(
        self, latency_seconds: float = 0.0, unavailable_first: int = 0, hang: bool = False, workers: int = 128
    ) -> None:
        self.latency_seconds = latency_seconds
        self.unavailable_first = unavailable_first
        self.hang = hang
        self.workers = workers
        self.tasks: dict[str, tasks_v2.Task] = {}
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.deadlines: list[float | None] = []  # seconds each call had left on arrival (None: no deadline)
        self.host = ""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Any = None

    def start(self) -> CreateTaskStandIn:
        import grpc
        from google.cloud import tasks_v2

        handler = grpc.method_handlers_generic_handler(
            self.SERVICE,
            {
                "CreateTask": grpc.unary_unary_rpc_method_handler(
                    self._create_task,
                    request_deserializer=tasks_v2.CreateTaskRequest.deserialize,
                    response_serializer=tasks_v2.Task.serialize,
                )
            },
        )
        self._server = grpc.server(ThreadPoolExecutor(max_workers=self.workers))
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.host = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def __enter__(self) -> CreateTaskStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _create_task(self, request: tasks_v2.CreateTaskRequest, context: Any) -> tasks_v2.Task:
        import grpc

        with self._lock:
            self.calls += 1
            call = self.calls
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.deadlines.append(context.time_remaining())
        try:
            if self.hang:
                self._stopping.wait()
            if self.latency_seconds:
                time.sleep(self.latency_seconds)
            if call <= self.unavailable_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the stand-in is unavailable for this call")
            with self._lock:
                if request.task.name in self.tasks:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Requested entity already exists: {request.task.name}")
                self.tasks[request.task.name] = request.task
            return request.task
        finally:
            with self._lock:
                self.in_flight -= 1
