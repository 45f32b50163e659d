"""The outbox: every SQL statement the server runs, behind a small async API.

Requests (and backend outcomes) are committed by a group-commit loop: one
transaction for everything that arrived while the previous commit was running, so a
handler answers only after its row is durable, at one fsync per batch, not per request.
Compaction and repeat detection are decided by the INSERT itself, inside that
transaction, so several worker processes sharing the DB agree on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger("ai_agent_proxy.store")

BUSY_TIMEOUT_MS = 5000
CLAIM_LEASE_MS = 30_000
MAX_COMMIT_BATCH = 512


class StoreError(Exception):
    """The outbox could not do what was asked (locked, read-only, disk full, ...)."""


@dataclass(frozen=True)
class NewRequest:
    id: str
    received_ms: int
    inbox_file: str
    body: bytes
    body_hash: str
    context_id: str | None
    channel: str | None
    target: str | None
    message_id: str | None
    latest_user_prompt: str
    awaiting_backend: bool = False


@dataclass(frozen=True)
class PendingRow:
    """What the flusher needs to turn a row into an inbox file."""

    seq: int
    id: str
    received_ms: int
    inbox_file: str
    body: bytes
    context_id: str | None
    channel: str | None
    target: str | None
    latest_user_prompt: str
    payload_kind: str
    backend_instruction: str | None
    backend_reply: str | None


_INSERT = """
INSERT INTO requests (
    id, received_ms, inbox_file, body, body_hash, context_id, channel, target, message_id,
    latest_user_prompt, payload_kind, state, duplicate_of)
SELECT
    :id, :received_ms, :inbox_file, :body, :body_hash, :context_id, :channel, :target,
    :message_id, :latest_user_prompt,
    CASE WHEN :context_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM requests WHERE context_id = :context_id AND state != 'duplicate'
    ) THEN 'compact' ELSE 'full' END,
    CASE WHEN repeat.of IS NULL THEN :state ELSE 'duplicate' END,
    repeat.of
FROM (
    -- A client retry (same body soon after) or an OpenClaw retry of the same turn.
    SELECT (
        SELECT id FROM requests
        WHERE context_id = :context_id AND state != 'duplicate'
          AND ((body_hash = :body_hash AND received_ms >= :dedup_since_ms)
               OR message_id = :message_id)
        ORDER BY seq LIMIT 1
    ) AS of
) AS repeat
"""

_FINISH_BACKEND = """
UPDATE requests SET backend_instruction = ?, backend_reply = ?, backend_status = ?,
    backend_error = ?, backend_latency_ms = ?, backend_usage = ?,
    state = CASE state WHEN 'awaiting_backend' THEN 'pending' ELSE state END
WHERE id = ?
"""

PENDING_COLUMNS = (
    "seq, id, received_ms, inbox_file, body, context_id, channel, target, latest_user_prompt, "
    "payload_kind, backend_instruction, backend_reply"
)


@dataclass
class _Waiting:
    sql: str
    params: dict[str, Any] | tuple[Any, ...]
    done: asyncio.Future[None]


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is fsynced before the client hears 2xx (group commit pays for it).
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Store:
    """Async outbox over two connections: one for the group-commit loop, one for the rest."""

    def __init__(self, path: Path, dedup_window_s: float) -> None:
        self.path = path
        self.dedup_window_ms = int(dedup_window_s * 1000)
        self._ingest: aiosqlite.Connection | None = None
        self._conn: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._commit_task: asyncio.Task[None] | None = None
        self._on_commit: list[Callable[[], None]] = []
        self._conn_lock = asyncio.Lock()  # one transaction at a time on the shared connection

    async def open(self) -> None:
        try:
            self._ingest = await _connect(self.path)
            self._conn = await _connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        self._commit_task = asyncio.create_task(self._commit_loop(), name="outbox-commit")

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._on_commit.append(callback)

    async def close(self) -> None:
        if self._commit_task:
            # Let queued requests finish committing before the connection goes.
            while not self._queue.empty():
                await asyncio.sleep(0.005)
            self._commit_task.cancel()
            await asyncio.gather(self._commit_task, return_exceptions=True)
        for conn in (self._ingest, self._conn):
            if conn is not None:
                await conn.close()

    # -- ingest ---------------------------------------------------------------------------

    async def record(self, req: NewRequest) -> None:
        """Return once the request row is committed; raise StoreError if it cannot be."""
        params = {
            "id": req.id,
            "received_ms": req.received_ms,
            "inbox_file": req.inbox_file,
            "body": req.body,
            "body_hash": req.body_hash,
            "context_id": req.context_id,
            "channel": req.channel,
            "target": req.target,
            "message_id": req.message_id,
            "latest_user_prompt": req.latest_user_prompt,
            "state": "awaiting_backend" if req.awaiting_backend else "pending",
            "dedup_since_ms": req.received_ms - self.dedup_window_ms,
        }
        await self._group_commit(_INSERT, params)

    async def _group_commit(self, sql: str, params: dict[str, Any] | tuple[Any, ...]) -> None:
        """Queue one statement for the next group commit; return once it is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Waiting(sql, params, done))
        await done

    async def _commit_loop(self) -> None:
        assert self._ingest is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_COMMIT_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._in_transaction(self._ingest, partial(_execute_in_order, batch))
            except Exception as exc:
                log.error("outbox_commit_failed rows=%d error=%s", len(batch), exc)
                error = StoreError(str(exc))
                for w in batch:
                    if not w.done.done():
                        w.done.set_exception(error)
                continue
            for w in batch:
                if not w.done.done():
                    w.done.set_result(None)
            for callback in self._on_commit:
                callback()

    @staticmethod
    async def _in_transaction(conn: aiosqlite.Connection, work: Callable[[Any], Any]) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await work(conn)
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
            raise

    # -- flusher side ---------------------------------------------------------------------

    async def claim_pending(self, limit: int) -> list[PendingRow]:
        """Lease the oldest pending rows to this flusher, in arrival order."""
        now = _now_ms()
        sql = f"""
            UPDATE requests SET claimed_until_ms = ?
            WHERE seq IN (
                SELECT seq FROM requests
                WHERE state = 'pending' AND (claimed_until_ms IS NULL OR claimed_until_ms < ?)
                ORDER BY seq LIMIT ?)
            RETURNING {PENDING_COLUMNS}
        """
        rows = await self._write_returning(sql, (now + CLAIM_LEASE_MS, now, limit))
        return sorted((PendingRow(*r) for r in rows), key=lambda r: r.seq)

    async def mark_written(self, seqs: Iterable[int]) -> None:
        now = _now_ms()
        params = [(now, seq) for seq in seqs]
        if not params:
            return
        await self._run(
            lambda c: c.executemany(
                "UPDATE requests SET state = 'written', written_ms = ?, claimed_until_ms = NULL,"
                " attempts = attempts + 1 WHERE seq = ?",
                params,
            )
        )

    async def mark_failed(self, seq: int, error: str, release: Iterable[int]) -> None:
        """Record a failed write of row `seq` and give back the lease on the other rows."""
        now = _now_ms()
        others = [(s,) for s in release]

        async def work(c: Any) -> None:
            await c.execute(
                "UPDATE requests SET attempts = attempts + 1, last_error = ?,"
                " claimed_until_ms = NULL WHERE seq = ?",
                (error, seq),
            )
            await c.execute(
                "INSERT INTO inbox_failures (request_seq, at_ms, error) VALUES (?, ?, ?)",
                (seq, now, error),
            )
            await c.executemany("UPDATE requests SET claimed_until_ms = NULL WHERE seq = ?", others)

        await self._run(work)

    async def finish_backend(
        self,
        request_id: str,
        instruction: str,
        reply: str | None,
        status: int | None,
        error: str | None,
        latency_ms: float | None,
        usage: str | None,
    ) -> None:
        """Record the backend's outcome; the row becomes pending for the flusher."""
        params = (instruction, reply, status, error, latency_ms, usage, request_id)
        await self._group_commit(_FINISH_BACKEND, params)

    async def release_stale_backend_waits(self, older_than_ms: int) -> int:
        """Rows whose backend call outlived any timeout (their worker died, or recording
        the outcome failed) are delivered without a reply."""
        cutoff = _now_ms() - older_than_ms
        count = 0

        async def work(c: Any) -> None:
            nonlocal count
            cur = await c.execute(
                "UPDATE requests SET state = 'pending', backend_error = 'interrupted'"
                " WHERE state = 'awaiting_backend' AND received_ms < ?",
                (cutoff,),
            )
            count = cur.rowcount

        await self._run(work)
        return count

    async def backlog(self) -> tuple[int, int | None]:
        """(rows not yet in the inbox, receipt time in ms of the oldest one)."""
        row = await self._fetchone(
            "SELECT count(*), min(received_ms) FROM requests"
            " WHERE state IN ('pending', 'awaiting_backend')"
        )
        return (row[0], row[1]) if row else (0, None)

    async def counts_by_state(self) -> dict[str, int]:
        assert self._conn is not None
        try:
            async with self._conn.execute(
                "SELECT state, count(*) FROM requests GROUP BY state"
            ) as cur:
                return {state: n async for state, n in cur}
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    # -- helpers --------------------------------------------------------------------------

    async def _run(self, work: Callable[[Any], Any]) -> None:
        assert self._conn is not None
        try:
            async with self._conn_lock:
                await self._in_transaction(self._conn, work)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def _write_returning(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        assert self._conn is not None
        rows: list[Any] = []

        async def work(c: Any) -> None:
            async with c.execute(sql, params) as cur:
                rows.extend(await cur.fetchall())

        await self._run(work)
        return rows

    async def _fetchone(self, sql: str) -> Any:
        assert self._conn is not None
        try:
            async with self._conn.execute(sql) as cur:
                return await cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None


async def _execute_in_order(batch: list[_Waiting], conn: aiosqlite.Connection) -> None:
    """Runs of the same statement go to SQLite as one executemany (one thread hop)."""
    i = 0
    while i < len(batch):
        j = i
        while j < len(batch) and batch[j].sql == batch[i].sql:
            j += 1
        await conn.executemany(batch[i].sql, [w.params for w in batch[i:j]])
        i = j


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def recover_on_start(db_path: Path) -> tuple[int, int]:
    """Run once before any worker starts: rows cut off mid-backend-call are delivered
    without a reply, and leases of a dead process are dropped. Returns (interrupted,
    pending)."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("BEGIN IMMEDIATE")
        interrupted = conn.execute(
            "UPDATE requests SET state = 'pending', backend_error = 'interrupted'"
            " WHERE state = 'awaiting_backend'"
        ).rowcount
        conn.execute(
            "UPDATE requests SET claimed_until_ms = NULL WHERE claimed_until_ms IS NOT NULL"
        )
        pending = conn.execute("SELECT count(*) FROM requests WHERE state = 'pending'").fetchone()[
            0
        ]
        conn.execute("COMMIT")
        return interrupted, pending
    finally:
        conn.close()
