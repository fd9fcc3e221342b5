"""The embedded database: one SQLite file shared by the local registry, feature, assessment, run and task stores."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from shared.errors import StoreUnavailable


class SqliteDatabase:
    """Hands each thread its own connection to one SQLite file, in WAL mode so readers never wait for writers."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._schemas: set[str] = set()
        self._schema_lock = threading.Lock()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def ensure_schema(self, name: str, ddl: str) -> None:
        """Runs a store's CREATE statements once per process."""
        if name in self._schemas:
            return
        with self._schema_lock:
            if name not in self._schemas:
                with self.transaction() as conn:
                    for statement in _statements(ddl):
                        conn.execute(statement)
                self._schemas.add(name)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Yields a connection inside BEGIN IMMEDIATE ... COMMIT; a lock or I/O failure becomes StoreUnavailable."""
        conn = self.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"The database {self.path} is unavailable: {exc}") from exc
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            conn.execute("ROLLBACK")
            raise StoreUnavailable(f"The database {self.path} is unavailable: {exc}") from exc
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                conn.execute("ROLLBACK")
                raise StoreUnavailable(f"The database {self.path} is unavailable: {exc}") from exc

    def query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        try:
            return self.connection().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"The database {self.path} is unavailable: {exc}") from exc


def _statements(ddl: str) -> list[str]:
    return [s.strip() for s in ddl.split(";") if s.strip()]


_databases: dict[Path, SqliteDatabase] = {}
_databases_lock = threading.Lock()


def sqlite_path(url: str) -> Path | None:
    """Returns the file of a `sqlite:///path` URL or plain path, or None if the URL names another backend."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return Path(unquote(parsed.netloc + parsed.path))
    if parsed.scheme == "":
        return Path(url)
    return None


def open_database(path: Path) -> SqliteDatabase:
    """Returns the process's one handle on a database file."""
    key = Path(path).resolve()
    with _databases_lock:
        if key not in _databases:
            _databases[key] = SqliteDatabase(key)
        return _databases[key]
