"""The one door into the SQLite outbox: every connection, sync or async, for writing or
read-only, is made here with the same settings, and every write transaction goes through
`transaction`. No other module calls sqlite3.connect or writes BEGIN/COMMIT (a test checks).

Settings: WAL (readers never block the writer, nor it them); synchronous=FULL (a commit
is on disk before the client hears 2xx; group commit pays for it); foreign keys on; one
busy timeout for everybody (a writer waits for another writer's lock that long).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (imported where used: the CLI's commands never open an async connection)
    import aiosqlite

BUSY_TIMEOUT_MS = 5000
BUSY_STEP_S = 0.001  # how often a writer tries again for a lock another process holds

_WRITING = ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL")


def _pragmas(readonly: bool) -> tuple[str, ...]:
    always = (f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}", "PRAGMA foreign_keys = ON")
    return always if readonly else always + _WRITING


def _target(path: Path, readonly: bool) -> tuple[str, bool]:
    """(what sqlite3.connect takes, whether it is a URI). A read-only connection is opened
    by URI; as_uri() percent-encodes the path, so a '#' or '?' in it stays in the name."""
    if readonly:
        return Path(path).absolute().as_uri() + "?mode=ro", True
    return str(path), False


def connect(
    path: Path, *, readonly: bool = False, rows_by_name: bool = False
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions only through `transaction`); rows as
    sqlite3.Row (by name) when asked, else tuples (the server's hot path)."""
    target, uri = _target(path, readonly)
    conn = sqlite3.connect(target, uri=uri, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        for pragma in _pragmas(readonly):
            conn.execute(pragma)
    except BaseException:
        conn.close()
        raise
    if rows_by_name:
        conn.row_factory = sqlite3.Row
    return conn


async def connect_async(path: Path, *, readonly: bool = False) -> aiosqlite.Connection:
    """The same, for the event loop (aiosqlite runs it in a thread of its own)."""
    import aiosqlite

    target, uri = _target(path, readonly)
    conn = await aiosqlite.connect(
        target, uri=uri, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
    )
    try:
        for pragma in _pragmas(readonly):
            await conn.execute(pragma)
    except BaseException:
        await conn.close()
        raise
    return conn


_OPEN: set[int] = set()  # the connections inside a transaction() now (by id)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock at once: no deadlock upgrading a read), then COMMIT,
    or ROLLBACK if anything raises (the error goes on). Inside another transaction() on the
    connection it joins that one: steps that must land together (a run's end and its
    count) nest. (Only inside transaction(): a transaction left open some other way is an
    error, as before, never joined and so never committed.)"""
    if id(conn) in _OPEN:
        yield conn
        return
    begin(conn)
    _OPEN.add(id(conn))
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    finally:
        _OPEN.discard(id(conn))


def begin(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write lock in short steps, up to
    BUSY_TIMEOUT_MS. SQLite's own busy handler sleeps longer each try (up to 100 ms), so
    under steady contention (two workers, or a CLI writing beside the server) a writer
    could wait seconds for a lock free most of the time: WORKER=2 answered with a p99
    over a second. Raises sqlite3.OperationalError ("database is locked") after that."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    conn.execute("PRAGMA busy_timeout = 0")  # tried here instead, every BUSY_STEP_S
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(BUSY_STEP_S)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY or "locked" in str(exc)


def scalar(conn: sqlite3.Connection, sql: str, params: Any = ()) -> Any:
    """The first column of the first row (None when there is no row)."""
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]
