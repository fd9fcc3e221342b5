"""The local server's gunicorn hooks: what each worker process starts once it is up, and how the server stops.

gunicorn loads this module as a config file (`--config python:shared.gunicorn_hooks`, in
local_stack.gunicorn_args) and takes every module-level name that is one of its settings: here the
two hooks, `when_ready` and `post_worker_init`, and nothing else. Nothing is imported at module level
but the standard library: the master process imports this module, and it never builds the services.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any, Callable

log = logging.getLogger(__name__)

# Between the workers' SIGTERM and the listener's shutdown: long enough for an idle worker to see its
# signal before the listener stops accepting (a worker that still tries gets EINVAL, handled below).
_SIGNAL_HEAD_START_SECONDS = 0.05
# How soon a worker tries again to start delivering when the database is locked or unreachable.
_RETRY_SECONDS = 5.0


def when_ready(server: Any) -> None:
    """In the master: on SIGTERM the server stops taking connections at once, and finishes those it took.

    gunicorn's own SIGTERM handling closes the master's copy of the listening socket and lets each
    worker finish its request, but a busy worker keeps its copy open meanwhile, so the kernel would
    go on queueing connections nobody will serve. Shutting the socket down refuses them instead, in
    every process at once; requests already taken finish within the graceful timeout, as Cloud Run
    expects of an instance it stops (10 s).
    """
    stop = server.handle_term

    def handle_term() -> None:
        server.kill_workers(signal.SIGTERM)
        time.sleep(_SIGNAL_HEAD_START_SECONDS)
        for listener in server.LISTENERS:
            try:
                listener.sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already shut down, or not connected: nothing left to refuse
                pass
        stop()

    server.handle_term = handle_term


def post_worker_init(worker: Any) -> None:
    """In each worker, after the fork: starts its delivery of the embedded queue, and makes SIGTERM stop it.

    Delivery starts from a thread of its own, off the worker's boot: opening the queue writes its schema,
    and a database locked by another process for now only delays delivery (it is tried again).
    """
    _tolerate_a_shut_listener(worker)
    stopping = threading.Event()
    delivering: list[Any] = []

    def start() -> None:
        from shared.errors import StoreUnavailable
        from shared.services import get_services

        while not stopping.is_set():
            try:
                queue = get_services().deliver_tasks()
            except StoreUnavailable:
                log.warning("could not start delivering tasks yet", exc_info=True)
                stopping.wait(_RETRY_SECONDS)
                continue
            except Exception:
                # A setting or database this process cannot use: each request reports it, with the variable's name.
                log.exception("could not start delivering tasks")
                return
            if queue is not None:
                delivering.append(queue)
                if stopping.is_set():  # SIGTERM came while it started
                    queue.stop_delivery()
            return

    def stop() -> None:
        stopping.set()
        for queue in delivering:
            queue.stop_delivery()

    _on_sigterm(stop)  # signal handlers are set from the main thread
    threading.Thread(target=start, name="local-task-start", daemon=True).start()


def _on_sigterm(action: Callable[[], None]) -> None:
    """Runs `action`, then gunicorn's own handler (which lets the request in flight finish), on SIGTERM."""
    graceful_exit = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame: FrameType | None) -> None:
        action()
        if callable(graceful_exit):
            graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, handle)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: a request's system calls are not interrupted


def _tolerate_a_shut_listener(worker: Any) -> None:
    """Makes a sync worker that accepts on the shut-down listener stop instead of failing (EINVAL)."""
    accept = getattr(worker, "accept", None)
    if accept is None:
        return

    def accept_until_shut(listener: Any) -> None:
        try:
            accept(listener)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            worker.alive = False  # the server is stopping: when_ready's handler shut the listener down

    worker.accept = accept_until_shut
