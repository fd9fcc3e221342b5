"""The Cloud Tasks queue: the TaskQueue Protocol over the Cloud Tasks API (named HTTP tasks with an OIDC token)."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import timedelta
from typing import TYPE_CHECKING, Sequence

from shared.errors import StoreUnavailable, TaskTooLarge
from shared.tasks import TASK_NAME, Task

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud import tasks_v2

log = logging.getLogger(__name__)

# CreateTask's reference: "The maximum task size is 100KB." (CloudTasksClient.create_task, google-cloud-tasks
# 2.26.0; the REST reference of projects.locations.queues.tasks.create says the same, while the quotas page
# lists 1 MB: we hold to the stricter). Checked on the whole serialized task (name, URL, headers, body,
# OIDC token), against 100,000 bytes, the smaller reading of "100KB".
MAX_TASK_BYTES = 100_000

# How many CreateTask calls enqueue_many keeps in flight, chosen by measurement (2 cores; chunk tasks of
# 200 ids; scripts/bench_tasks.py and a sweep of widths). Against a stand-in CreateTask server in another
# process answering after 20 ms, like a call across a network: width 1 made ~35 calls/s, 8 ~280/s,
# 16 ~540/s, 32 ~535/s, 64 ~600/s; answering after 50 ms: 16 ~270/s, 32 ~430/s, 64 ~475/s. The
# client's own CPU (~1.2 ms a call) is the ceiling beyond that: 32 reaches it for round trips up to
# ~50 ms, and a wider pool buys little. Against the emulator, which answers in ~1 ms on the same
# machine, width 32 is ~1.4x sequential (both sides CPU-bound). 32 calls at once stay far under the
# API quota (6,000,000 requests per minute).
ENQUEUE_WIDTH = 32

# Per-attempt deadline of a CreateTask call (the client's default is 20 s). A CreateTask is one small
# write; without a deadline of our own a blackholed network would hold the dispatcher, and the
# Cloud Scheduler call waiting on it, for that long per call.
CALL_TIMEOUT_SECONDS = 10.0
# UNAVAILABLE (connection refused or reset, a server restarting) is retried for this long in all, with
# backoff from 0.1 s to 1 s: long enough to ride out a blip, short enough that a queue that cannot be
# reached answers the dispatcher's caller with a 503 within seconds (Cloud Scheduler then retries).
# Retrying a named task is safe: if the lost attempt had created it, the retry gets ALREADY_EXISTS.
RETRY_SECONDS = 3.0


class CloudTasksQueue:
    """A Cloud Tasks queue `projects/P/locations/L/queues/Q` that HTTP-POSTs each task's JSON payload to its URL.

    A task's Cloud Tasks name derives from its name (`<queue path>/tasks/<task.name>`), so enqueueing
    it again is answered ALREADY_EXISTS, which is "already enqueued". With a service account, each task
    carries an OIDC token for it (audience: TASKS_AUDIENCE, else the task's URL), which Cloud Run and
    Cloud Functions check. The client is built on first use, once per instance; with an emulator host it
    talks plain gRPC to it, without credentials. Delivery (attempts, backoff, rate) is the queue's own
    configuration, set where the queue is declared, not here; each task carries its dispatch deadline.
    """

    def __init__(
        self,
        queue_path: str,
        service_account: str = "",
        audience: str = "",
        emulator_host: str = "",
        enqueue_width: int = ENQUEUE_WIDTH,
        timeout_seconds: float = CALL_TIMEOUT_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        dispatch_deadline_seconds: int | None = None,
    ) -> None:
        if enqueue_width < 1:
            raise ValueError("enqueue_width must be at least 1")
        self.queue_path = queue_path
        self.service_account = service_account
        self.audience = audience
        self.emulator_host = emulator_host
        self.enqueue_width = enqueue_width
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self.dispatch_deadline_seconds = dispatch_deadline_seconds
        self._client: tasks_v2.CloudTasksClient | None = None
        self._client_lock = threading.Lock()

    # -- the TaskQueue Protocol ------------------------------------------------------------------------

    def enqueue(self, task: Task) -> bool:
        """Creates the task; returns False if Cloud Tasks already has (or recently had) a task of that name.

        Raises ValueError for a name Cloud Tasks refuses, TaskTooLarge for a task over the size limit,
        StoreUnavailable if Cloud Tasks cannot be reached.
        """
        return self.enqueue_many([task]) == 1

    def enqueue_many(self, tasks: Sequence[Task]) -> int:
        """Creates the tasks, up to `enqueue_width` calls at a time; returns how many were new.

        Every task is checked (name, size) before the first call, so a bad one enqueues nothing. A
        name repeated within `tasks` is sent once. The first unreachable or unavailable error stops
        the calls not yet started and raises StoreUnavailable; the tasks created until then stay, and
        a retry of the whole call creates only the rest (their names answer ALREADY_EXISTS).
        """
        prepared = self._prepare(tasks)
        if not prepared:
            return 0
        client = self._get_client()
        try:
            return self._create_all(client, prepared)
        except StoreUnavailable as exc:
            log.warning(
                "cloud tasks queue unavailable",
                extra={"queue": self.queue_path, "tasks": len(prepared), "reason": str(exc.__cause__)},
            )
            raise

    def close(self) -> None:
        """Closes the client's channel (a later call builds a new one)."""
        with self._client_lock:
            if self._client is not None:
                self._client.transport.close()
                self._client = None

    # -- internals ---------------------------------------------------------------------------------------

    def _create_all(self, client: tasks_v2.CloudTasksClient, prepared: list[tasks_v2.Task]) -> int:
        retry = self._retry()
        if self.enqueue_width == 1 or len(prepared) == 1:
            return sum(self._create(client, retry, cloud_task) for cloud_task in prepared)
        # After the first failure the calls not started yet are dropped: the queue is most likely out of
        # reach for them too, and each would wait out its own retries before failing.
        failed = threading.Event()

        def create(cloud_task: tasks_v2.Task) -> bool:
            if failed.is_set():
                return False
            try:
                return self._create(client, retry, cloud_task)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(min(self.enqueue_width, len(prepared)), thread_name_prefix="cloud-tasks-enqueue") as pool:
            futures = [pool.submit(create, cloud_task) for cloud_task in prepared]
            wait(futures, return_when=FIRST_EXCEPTION)
            pool.shutdown(cancel_futures=True)
        for future in futures:
            error = None if future.cancelled() else future.exception()
            if error is not None:
                raise error
        return sum(1 for future in futures if future.result())

    def _prepare(self, tasks: Sequence[Task]) -> list[tasks_v2.Task]:
        """Returns the Cloud Tasks messages of the tasks (first of each name); raises before any call."""
        from google.cloud import tasks_v2

        seen: set[str] = set()
        prepared: list[tasks_v2.Task] = []
        for task in tasks:
            if not TASK_NAME.fullmatch(task.name):
                raise ValueError(f"Task name {task.name!r} is not a valid Cloud Tasks id.")
            if task.name in seen:
                continue
            seen.add(task.name)
            cloud_task = self._cloud_task(task)
            size = tasks_v2.Task.pb(cloud_task).ByteSize()
            if size > MAX_TASK_BYTES:
                # A 500, not PayloadTooLarge's 413: the dispatcher's caller sent a small request; it is this
                # deployment's BATCH_CHUNK_SIZE that makes chunks too big, and no retry will change that.
                raise TaskTooLarge(
                    f"Task {task.name!r} is {size:,} bytes, over Cloud Tasks' limit of {MAX_TASK_BYTES:,}; "
                    "lower BATCH_CHUNK_SIZE so that each chunk's task fits.",
                    {"task": task.name, "bytes": size, "limit_bytes": MAX_TASK_BYTES, "setting": "BATCH_CHUNK_SIZE"},
                )
            prepared.append(cloud_task)
        return prepared

    def _cloud_task(self, task: Task) -> tasks_v2.Task:
        from google.cloud import tasks_v2

        request = tasks_v2.HttpRequest(
            http_method=tasks_v2.HttpMethod.POST,
            url=task.url,
            headers={"Content-Type": "application/json"},
            # Compact, and UTF-8 rather than \u escapes: the size limit counts every byte of a body that is
            # mostly a list of student ids (ids are valid UTF-8: the feature store checks them on load).
            body=json.dumps(task.payload, separators=(",", ":"), ensure_ascii=False).encode(),
        )
        if self.service_account:
            request.oidc_token = tasks_v2.OidcToken(
                service_account_email=self.service_account, audience=self.audience or task.url
            )
        cloud_task = tasks_v2.Task(name=f"{self.queue_path}/tasks/{task.name}", http_request=request)
        if self.dispatch_deadline_seconds is not None:
            # How long Cloud Tasks waits for the worker's answer before it counts the attempt as failed and
            # retries (TASK_DISPATCH_DEADLINE_SECONDS; Cloud Tasks' own default for HTTP tasks is 10 minutes).
            cloud_task.dispatch_deadline = timedelta(seconds=self.dispatch_deadline_seconds)
        return cloud_task

    def _create(self, client: tasks_v2.CloudTasksClient, retry: Retry, cloud_task: tasks_v2.Task) -> bool:
        from google.api_core import exceptions
        from google.auth import exceptions as auth_errors

        try:
            client.create_task(parent=self.queue_path, task=cloud_task, retry=retry, timeout=self.timeout_seconds)
        except exceptions.AlreadyExists:
            # CreateTask with an explicit id fails ALREADY_EXISTS while a task of that id exists, and for a
            # while after it was executed or deleted: "up to 24 hours (or 9 days if the task's queue was
            # created using a queue.yaml or queue.xml)" (CreateTaskRequest.task, google-cloud-tasks 2.26.0);
            # the quotas page gives the de-duplication window as ~1 hour. So a name keeps a run's chunk
            # from being enqueued twice by a retried or repeated dispatch within the hour at least, and
            # not for ever as the embedded queue does; a chunk enqueued again later is scored again,
            # harmlessly (assessment ids are deterministic).
            return False
        except (
            exceptions.ServiceUnavailable,
            exceptions.DeadlineExceeded,
            exceptions.ResourceExhausted,
            exceptions.InternalServerError,
            exceptions.RetryError,
            auth_errors.TransportError,
        ) as exc:
            # ResourceExhausted is a quota (API requests per minute): waiting is the remedy, as for an outage.
            # INTERNAL is what gRPC reports for a connection dropped in the middle of a call (RST_STREAM), and
            # TransportError a failed fetch of the function's own access token (the metadata server out of
            # reach): transient both, and a named task is safe to create again.
            raise StoreUnavailable(
                f"The Cloud Tasks queue {self.queue_path} cannot be reached ({type(exc).__name__}); retry the dispatch.",
                {"queue": self.queue_path},
            ) from exc
        return True

    def _retry(self) -> Retry:
        from google.api_core import exceptions
        from google.api_core.retry import Retry, if_exception_type

        return Retry(
            predicate=if_exception_type(exceptions.ServiceUnavailable),
            initial=0.1,
            maximum=1.0,
            multiplier=2.0,
            timeout=self.retry_seconds,
        )

    def _get_client(self) -> tasks_v2.CloudTasksClient:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._build_client()
                client = self._client
        return client

    def _build_client(self) -> tasks_v2.CloudTasksClient:
        from google.cloud import tasks_v2

        if not self.emulator_host:
            return tasks_v2.CloudTasksClient()  # Application Default Credentials: the function's service account
        import grpc
        from google.auth.credentials import AnonymousCredentials
        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

        # The emulator speaks plain gRPC without TLS or authentication.
        channel = grpc.insecure_channel(self.emulator_host)
        return tasks_v2.CloudTasksClient(
            transport=CloudTasksGrpcTransport(channel=channel, credentials=AnonymousCredentials())
        )
