"""The write engine: one thread owns the SQLite write connection and runs queued work in
group commits. It knows no domain SQL: a unit of work is any function of a connection.

Every function queued while the previous commit ran goes into the next one: one
transaction, one fsync, for a whole batch of requests, so a handler answers only after its
row is durable without paying a commit of its own. Bulk work (a 15 MiB row) goes alone in a
transaction of its own, after the ordinary work queued before it is committed: a request of
a few KB never waits behind more than one bulk job (it waited 4 s behind a group of them).
If a batch fails for a reason of the DB's (busy past its timeout, disk full, read-only:
`is_db_fault`), every caller gets that OutboxError; for any other reason (which can only
be one function's), the functions are run again one by one, each in its own transaction,
so only the guilty caller fails (with RowRejected: it would fail again). Results go back
to the event loop in queue order: first to `on_committed` with the whole batch, then to
each caller.

The thread stops when it takes the STOP sentinel off the queue: work queued before `close`
is still committed.

Before each COMMIT the file at the DB's path must still be the one the engine opened: a DB
deleted or replaced under a running server would otherwise take commits into a file nobody
will open again (2,000 requests were acknowledged into a deleted one). Such a commit is
rolled back and its callers get 503, until the server is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..db import connect, transaction
from ..errors import OutboxError, RowRejected
from ..process import name_this_thread

log = logging.getLogger("ai_agent_proxy.outbox")

MAX_BATCH = 512
THREAD_NAME = "aiap-db-writer"  # as the system shows it (process.name_this_thread)

Work = Callable[[sqlite3.Connection], Any]


@dataclass
class Job:
    """One unit of work and where its result goes. `tag` is the caller's (the engine never
    reads it): it tells `on_committed` what the work was."""

    work: Work
    future: asyncio.Future[Any]
    tag: Any = None
    result: Any = None
    bulk: bool = False


STOP = object()


def is_db_fault(exc: BaseException) -> bool:
    """A failure of the DB itself (busy, full, read-only, I/O, corrupt), as opposed to
    something about one unit of work (a value it cannot bind, a constraint)."""
    return isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or (
        type(exc) is sqlite3.DatabaseError
    )


class DatabaseGone(sqlite3.OperationalError):
    """The file at the DB's path is no longer the one the engine opened (a DB fault)."""


class FileIdentity:
    """Which file a path named when it was opened (device and inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity = self._of_path()

    def _of_path(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def problem(self) -> str | None:
        """Why the path no longer names the opened file, or None while it does."""
        now = self._of_path()
        if now == self._identity:
            return None
        what = "deleted" if now is None else "replaced by another file"
        return (
            f"the database file {self.path} was {what} while the server ran: nothing more is"
            " accepted into it; restart the server"
        )

    def check(self) -> None:
        if (problem := self.problem()) is not None:
            raise DatabaseGone(problem)


class WriteEngine:
    def __init__(self, path: Path, on_committed: Callable[[list[Job]], None] | None = None) -> None:
        self.path = path
        self.identity: FileIdentity | None = None  # set once the DB is open
        self.on_committed = on_committed
        self.last_error: str | None = None  # a DB fault of the last commit; None once one works
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._opened: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Start the thread; raise OutboxError if the DB cannot be opened."""
        self._loop = asyncio.get_running_loop()
        self._opened = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()
        await self._opened

    async def run(self, work: Work, tag: Any = None, bulk: bool = False) -> Any:
        """Queue `work` for the next group commit (`bulk`: in a commit of its own, after
        the ordinary work); return its result once committed. Raises OutboxError once the
        engine is closed (nothing would ever commit it)."""
        if self._loop is None or self._thread is None:
            raise OutboxError(f"the outbox {self.path} is closed")
        future = self._loop.create_future()
        self._queue.put(Job(work, future, tag, bulk=bulk))
        return await future

    async def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread(THREAD_NAME)
        try:
            conn = connect(self.path)
            self.identity = FileIdentity(self.path)
        except sqlite3.Error as exc:
            error = OutboxError(f"cannot open database {self.path}: {exc}")
            self._call(self._opened.set_exception, error)  # type: ignore[union-attr]
            return
        self._call(self._opened.set_result, None)  # type: ignore[union-attr]
        bulk: deque[Job] = deque()
        try:
            while True:
                batch, stop = [], False
                if not bulk:  # nothing waits: block for the next job
                    first = self._queue.get()
                    if first is STOP:
                        return
                    (bulk if first.bulk else batch).append(first)
                while len(batch) < MAX_BATCH:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is STOP:
                        stop = True
                        break
                    (bulk if job.bulk else batch).append(job)
                if batch:  # ordinary work first, then one bulk job (never starved)
                    self._commit(conn, batch)
                if bulk:
                    self._commit(conn, [bulk.popleft()])
                    # Its WAL frames copied now, in its own turn: else the next commit
                    # (a small request's) ran the automatic checkpoint of 30 MiB.
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                if stop:
                    for job in bulk:  # (committed before the thread ends)
                        self._commit(conn, [job])
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[Job]) -> None:
        assert self.identity is not None
        try:
            _transaction(conn, batch, self.identity)
        except Exception as exc:
            if len(batch) > 1 and not is_db_fault(exc):
                log.error("outbox_batch_failed jobs=%d error=%r; one by one", len(batch), exc)
                for job in batch:
                    self._commit(conn, [job])
                return
            self._call(self._failed, batch, exc)
            return
        self._call(self._committed, batch)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    # -- back on the event loop --------------------------------------------------------

    def _committed(self, batch: list[Job]) -> None:
        self.last_error = None
        if self.on_committed is not None:
            self.on_committed(batch)
        for job in batch:
            if not job.future.done():
                job.future.set_result(job.result)

    def _failed(self, batch: list[Job], exc: BaseException) -> None:
        if is_db_fault(exc):
            error: OutboxError = OutboxError(str(exc))
            self.last_error = str(exc)
        else:
            error = RowRejected(f"{type(exc).__name__}: {exc}")
        log.error("outbox_commit_failed jobs=%d error=%s", len(batch), error)
        for job in batch:
            if not job.future.done():
                job.future.set_exception(error)


def _transaction(conn: sqlite3.Connection, batch: list[Job], identity: FileIdentity) -> None:
    with transaction(conn):
        for job in batch:
            job.result = job.work(conn)
        identity.check()  # (raising here rolls the batch back)
