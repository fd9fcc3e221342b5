"""A TCP relay between the service and an emulator, which a test cuts and restores to stage an outage.

Cut, the relay resets every open connection and stops listening: the service sees its server go away
(connections reset, then refused), exactly as when the server's process dies. Restored, it listens on
the same port again and relays to whatever the emulator behind it is by then. Because the service
reaches the emulator only through the relay, a test can stop and restart the emulator behind a cut
relay and know that no request reached the emulator between the two.
"""

from __future__ import annotations

import socket
import struct
import threading

ACCEPT_POLL_SECONDS = 0.05
BUFFER_BYTES = 65536


def _reset(sock: socket.socket) -> None:
    """Ends a connection abortively (SO_LINGER 0: a reset), as when a server's process dies; shutting it
    down first wakes the relay's thread blocked reading it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class TcpRelay:
    """Relays 127.0.0.1:`port` to 127.0.0.1:`upstream_port`; `address` is the host:port the service is given.

    start() / stop(), or a with-block; cut() and restore() in between.
    """

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.connections = 0  # accepted since start, for tests that want to see the service came back
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpRelay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(ACCEPT_POLL_SECONDS)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._cut.clear()
        self._accepting = threading.Thread(target=self._accept, args=(listener,), name="tcp-relay", daemon=True)
        self._accepting.start()
        return self

    def cut(self) -> None:
        """Stops listening and resets every relayed connection; returns once nothing is relayed any more."""
        self._cut.set()
        if self._accepting is not None:
            self._accepting.join(timeout=5)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _reset(sock)

    def restore(self) -> None:
        """Listens on the same port again."""
        self.start()

    def stop(self) -> None:
        self.cut()

    def __enter__(self) -> TcpRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self, listener: socket.socket) -> None:
        while not self._cut.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                _reset(client)  # nothing behind the relay: the service sees its connection refused
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._cut.is_set():
                    _reset(client)
                    _reset(upstream)
                    return
                self._open.update((client, upstream))
                self.connections += 1
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), name="tcp-relay-pump", daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER_BYTES):
                target.sendall(data)
        except OSError:
            pass
        # One side ended (or the relay was cut): end the other, so neither end waits on a dead peer.
        with self._lock:
            ours = source in self._open
            self._open.discard(source)
            self._open.discard(target)
        if ours:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
