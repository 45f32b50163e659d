"""The outbox: every SQL statement the server runs, behind a small async API.

Requests (and backend outcomes) are committed by a group-commit loop: one
transaction for everything that arrived while the previous commit was running, so a
handler answers only after its row is durable, at one fsync per batch, not per request.
Compaction and repeat detection are decided by the INSERT itself, inside that
transaction, so several worker processes sharing the DB agree on them. The INSERT also
leases each new row to this process's flusher, and the committed rows are handed to it in
memory: the flusher does not have to read back what was just written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from .bodies import PIECE_MAX, PIECE_MIN, RepeatedParts, digest, join_segments, pack_ids, unpack_ids
from .errors import RowRejected, StoreError
from .rows import PENDING_COLUMNS, NewRequest, PendingRow, body_needed

log = logging.getLogger("ai_agent_proxy.store")

BUSY_TIMEOUT_MS = 5000
CLAIM_LEASE_MS = 10_000  # a dead worker's claimed rows go to another flusher after this
MAX_COMMIT_BATCH = 512
ROW_ATTEMPTS = 3  # tries to make a file of a row before it is undeliverable


def is_db_fault(exc: BaseException) -> bool:
    """A failure of the DB itself (busy, full, read-only, I/O, corrupt), as opposed to
    something about one row (a value it cannot bind, a constraint)."""
    return isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or (
        type(exc) is sqlite3.DatabaseError
    )


def describe_commit_error(exc: BaseException) -> StoreError:
    if is_db_fault(exc):
        return StoreError(str(exc))
    return RowRejected(f"{type(exc).__name__}: {exc}")


def in_chunks(values: Sequence[Any]) -> Iterator[tuple[str, list[Any]]]:
    """(placeholders, values) for `... IN (placeholders)` queries of at most _SQL_VARS."""
    values = list(values)
    for i in range(0, len(values), _SQL_VARS):
        chunk = values[i : i + _SQL_VARS]
        yield ", ".join("?" * len(chunk)), chunk


_INSERT = """
INSERT INTO requests (
    id, received_ms, body_segments, body_hash, context_id, channel, target, message_id,
    latest_user_prompt, sender, attachments, modality, claimed_until_ms, claimed_by,
    payload_kind, state, duplicate_of)
SELECT
    :id, :received_ms, :body_segments, :body_hash, :context_id, :channel, :target,
    :message_id, :latest_user_prompt, :sender, :attachments, :modality, :claimed_until_ms,
    :claimed_by,
    CASE WHEN :context_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM requests WHERE context_id = :context_id AND state != 'duplicate'
    ) THEN 'compact' ELSE 'full' END,
    CASE WHEN repeat.of IS NULL THEN :state ELSE 'duplicate' END,
    repeat.of
FROM (
    SELECT coalesce(
        -- an OpenClaw retry of the same turn: same message, same words and media (a
        -- steered follow-up shares the message_id but brings new words: not a repeat)
        (SELECT id FROM requests
         WHERE context_id = :context_id AND message_id = :message_id
           AND latest_user_prompt = :latest_user_prompt AND attachments IS :attachments
           AND state != 'duplicate'
         ORDER BY seq LIMIT 1),
        -- a client re-sending the same body soon after
        (SELECT id FROM requests
         WHERE context_id = :context_id AND body_hash = :body_hash
           AND received_ms >= :dedup_since_ms AND state != 'duplicate'
         ORDER BY seq LIMIT 1)
    ) AS of
) AS repeat
RETURNING seq, payload_kind, state
"""

_MARK_WRITTEN = (
    "UPDATE requests SET state = 'written', written_ms = ?, claimed_until_ms = NULL,"
    " claimed_by = NULL, attempts = attempts + 1 WHERE seq IN (%s)"
)

_FINISH_BACKEND = """
UPDATE requests SET backend_instruction = ?, backend_reply = ?, backend_status = ?,
    backend_error = ?, backend_latency_ms = ?, backend_usage = ?,
    state = CASE state WHEN 'awaiting_backend' THEN 'pending' ELSE state END
WHERE id = ?
"""

SEGMENT_CACHE_SIZE = 50_000
SEGMENT_DATA = "SELECT id, data FROM segments WHERE id IN (%s)"
_SQL_VARS = 500  # parameters per IN (...) query, well under SQLite's limit


Work = Callable[[sqlite3.Connection], Any]  # runs in the DB thread, inside the transaction


@dataclass
class _Waiting:
    """One statement (or one piece of work) waiting for the next group commit."""

    done: asyncio.Future[Any]
    sql: str = ""
    params: dict[str, Any] | tuple[Any, ...] = ()
    segments: list[tuple[bytes, bytes]] | None = None  # (hash, data) of a body, in order
    work: Work | None = None  # instead of sql: runs in the transaction, result for the caller
    result: Any = None
    new_work: bool = False  # committing it makes rows pending that the flusher must claim
    request: NewRequest | None = None  # an insert: handed to the flusher once committed


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is fsynced before the client hears 2xx (group commit pays for it).
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Store:
    """Async outbox over two connections. Every write goes through the group-commit loop on
    the first, so writers in one process never wait on each other's locks (SQLite's busy
    handler sleeps for milliseconds); the second only reads."""

    def __init__(
        self, path: Path, dedup_window_s: float, parts: RepeatedParts | None = None
    ) -> None:
        self.path = path
        self.dedup_window_ms = int(dedup_window_s * 1000)
        self._ingest: aiosqlite.Connection | None = None
        self._conn: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._commit_task: asyncio.Task[None] | None = None
        self._committing = False
        self.last_commit_error: str | None = None  # cleared by the next successful commit
        self.token = secrets.token_hex(8)  # names this process's flusher in leases
        self._on_rows: Callable[[list[PendingRow]], None] | None = None
        self._on_claimable: Callable[[], None] | None = None
        self._segment_ids: dict[bytes, int] = {}  # hash -> id of committed segments
        self._recent_segments: dict[tuple[int, bytes, bytes], tuple[bytes, bytes]] = {}
        self.parts = parts if parts is not None else RepeatedParts()

    async def open(self) -> None:
        try:
            self._ingest = await _connect(self.path)
            self._conn = await _connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        self._commit_task = asyncio.create_task(self._commit_loop(), name="outbox-commit")

    def listen(
        self, rows: Callable[[list[PendingRow]], None], claimable: Callable[[], None]
    ) -> None:
        """`rows` gets the new pending rows of each commit, in arrival order (leased to
        this process); `claimable` is called when a commit made rows pending that only a
        claim finds (backend outcomes)."""
        self._on_rows, self._on_claimable = rows, claimable

    async def close(self) -> None:
        if self._commit_task:
            # Let queued and committing requests finish before the connection goes.
            while not self._queue.empty() or self._committing:
                await asyncio.sleep(0.005)
            self._commit_task.cancel()
            await asyncio.gather(self._commit_task, return_exceptions=True)
        for conn in (self._ingest, self._conn):
            if conn is not None:
                await conn.close()

    # -- ingest ---------------------------------------------------------------------------

    async def record(self, req: NewRequest) -> None:
        """Return once the request row is committed; raise StoreError if it cannot be."""
        parts = self.parts.split(req.body)
        self.parts.remember(parts)
        segments = [(self._segment_hash(part), part) for part in parts]
        # The body's own hash, from its segments' (hashing 60 KB twice costs more).
        body_hash = digest(b"".join(h for h, _ in segments))
        params = {
            "id": req.id,
            "received_ms": req.received_ms,
            "body_segments": None,  # filled in by the commit, once segment ids are known
            "body_hash": body_hash,
            "context_id": req.context_id,
            "channel": req.channel,
            "target": req.target,
            "message_id": req.message_id,
            "latest_user_prompt": req.latest_user_prompt,
            "sender": req.sender,
            "attachments": req.attachments,
            "modality": req.modality,
            "state": "awaiting_backend" if req.awaiting_backend else "pending",
            "dedup_since_ms": req.received_ms - self.dedup_window_ms,
            # A row waiting for the backend is claimed once its outcome is recorded.
            "claimed_until_ms": None if req.awaiting_backend else _now_ms() + CLAIM_LEASE_MS,
            "claimed_by": None if req.awaiting_backend else self.token,
        }
        check_storable(params)
        await self._group_commit(_INSERT, params, segments, request=req)

    def _segment_hash(self, part: bytes) -> bytes:
        """digest(part), skipping the hashing for a piece equal to one seen recently: the
        49 KB system prompt compares in microseconds but hashes in ~70."""
        if not PIECE_MIN <= len(part) <= PIECE_MAX:  # (nor keep a huge one in memory)
            return digest(part)
        key = (len(part), part[:64], part[-64:])
        seen = self._recent_segments.get(key)
        if seen is not None and seen[1] == part:
            return seen[0]
        h = digest(part)
        if len(self._recent_segments) >= 64:
            self._recent_segments.clear()
        self._recent_segments[key] = (h, part)
        return h

    async def _group_commit(
        self,
        sql: str = "",
        params: dict[str, Any] | tuple[Any, ...] = (),
        segments: list[tuple[bytes, bytes]] | None = None,
        work: Work | None = None,
        new_work: bool = False,
        request: NewRequest | None = None,
    ) -> Any:
        """Queue a statement (or work) for the next group commit; return once committed."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(
            _Waiting(done, sql, params, segments, work, new_work=new_work, request=request)
        )
        return await done

    async def _commit_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_COMMIT_BATCH:
                batch.append(self._queue.get_nowait())
            self._committing = True
            try:
                await self._commit(batch)
            finally:
                self._committing = False

    async def _commit(self, batch: list[_Waiting]) -> None:
        """Commit a batch as one transaction. If it fails for a reason of the DB's (locked,
        full, read-only), every waiter gets that StoreError; for any other reason (which can
        only be one row's), the rows are committed one by one, so only the guilty one
        fails, and with RowRejected, as it would fail again."""
        assert self._ingest is not None
        try:
            learned = await run_in_db_thread(self._ingest, _commit_batch, batch, self._segment_ids)
        except Exception as exc:
            if len(batch) > 1 and not is_db_fault(exc):
                log.error("outbox_batch_failed rows=%d error=%r; one by one", len(batch), exc)
                for waiting in batch:
                    await self._commit([waiting])
                return
            error = describe_commit_error(exc)
            log.error("outbox_commit_failed rows=%d error=%s", len(batch), error)
            if isinstance(error, RowRejected):
                self.last_commit_error = None  # the DB is fine
            else:
                self.last_commit_error = str(error)
            for w in batch:
                if not w.done.done():
                    w.done.set_exception(error)
            return
        self.last_commit_error = None
        # Only committed segments may be referenced without being inserted again.
        if len(self._segment_ids) + len(learned) > SEGMENT_CACHE_SIZE:
            self._segment_ids.clear()
        self._segment_ids.update(learned)
        for w in batch:
            if not w.done.done():
                w.done.set_result(w.result)
        # Only new work wakes the flusher: its own claims and marks also pass through
        # here, and must not wake it again.
        handed = [_handed_row(w) for w in batch if w.request is not None]
        handed = [row for row in handed if row is not None]
        if handed and self._on_rows is not None:
            self._on_rows(handed)
        if any(w.new_work for w in batch) and self._on_claimable is not None:
            self._on_claimable()

    # -- flusher side ---------------------------------------------------------------------

    async def claim_pending(self, limit: int) -> list[PendingRow]:
        """Lease the oldest pending rows to this flusher, in arrival order: rows nobody
        holds, rows whose lease ran out, and rows this process already holds."""
        now = _now_ms()
        sql = f"""
            UPDATE requests SET claimed_until_ms = ?, claimed_by = ?
            WHERE seq IN (
                SELECT seq FROM requests
                WHERE state = 'pending' AND (claimed_until_ms IS NULL OR claimed_until_ms < ?
                                             OR claimed_by = ?)
                ORDER BY seq LIMIT ?)
            RETURNING {PENDING_COLUMNS}
        """
        params = (now + CLAIM_LEASE_MS, self.token, now, self.token, limit)
        rows = await self._group_commit(work=lambda c: named_rows(c.execute(sql, params)))
        rows.sort(key=lambda r: r["seq"])
        ids = [
            unpack_ids(r["body_segments"]) if body_needed(r["payload_kind"]) else [] for r in rows
        ]
        data = await self._segment_data({i for row_ids in ids for i in row_ids})
        return [
            PendingRow.from_row(r, join_segments(row_ids, data))
            for r, row_ids in zip(rows, ids, strict=True)
        ]

    async def _segment_data(self, ids: set[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for marks, chunk in in_chunks(ids):
            out.update(await self._read(SEGMENT_DATA % marks, chunk))
        return out

    async def mark_written(self, seqs: Iterable[int]) -> None:
        now = _now_ms()
        seqs = list(seqs)

        def work(c: sqlite3.Connection) -> None:
            for marks, chunk in in_chunks(seqs):
                c.execute(_MARK_WRITTEN % marks, (now, *chunk))

        if seqs:
            await self._group_commit(work=work)

    async def mark_failed(self, seq: int, error: str, release: Iterable[int]) -> None:
        """Record a failed write of row `seq` and give back the lease on the other rows."""
        now = _now_ms()
        others = [(s,) for s in release]

        def work(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE requests SET attempts = attempts + 1, last_error = ?,"
                " claimed_until_ms = NULL, claimed_by = NULL WHERE seq = ?",
                (error, seq),
            )
            c.execute(
                "INSERT INTO inbox_failures (request_seq, at_ms, error) VALUES (?, ?, ?)",
                (seq, now, error),
            )
            c.executemany(
                "UPDATE requests SET claimed_until_ms = NULL, claimed_by = NULL WHERE seq = ?",
                others,
            )

        await self._group_commit(work=work)

    async def record_row_failure(self, seq: int, error: str) -> str | None:
        """Row `seq` could not be made into a file (not the inbox's fault). After
        ROW_ATTEMPTS such failures it is undeliverable and leaves the queue: returns its id
        then, else None (it stays pending, released for a later claim)."""
        now = _now_ms()

        def work(c: sqlite3.Connection) -> str | None:
            c.execute(
                "UPDATE requests SET row_failures = row_failures + 1, last_error = ?,"
                " claimed_until_ms = NULL, claimed_by = NULL WHERE seq = ?",
                (error, seq),
            )
            c.execute(
                "INSERT INTO inbox_failures (request_seq, at_ms, error) VALUES (?, ?, ?)",
                (seq, now, error),
            )
            row = c.execute(
                "UPDATE requests SET state = 'undeliverable'"
                " WHERE seq = ? AND state = 'pending' AND row_failures >= ? RETURNING id",
                (seq, ROW_ATTEMPTS),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._group_commit(work=work)  # type: ignore[no-any-return]

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
        await self._group_commit(_FINISH_BACKEND, params, new_work=True)

    async def release_stale_backend_waits(self, older_than_ms: int) -> int:
        """Rows whose backend call outlived any timeout (their worker died, or recording
        the outcome failed) are delivered without a reply."""
        cutoff = _now_ms() - older_than_ms

        def work(c: sqlite3.Connection) -> int:
            return c.execute(
                "UPDATE requests SET state = 'pending', backend_error = 'interrupted'"
                " WHERE state = 'awaiting_backend' AND received_ms < ?",
                (cutoff,),
            ).rowcount

        return int(await self._group_commit(work=work))

    async def prune_written(self, cutoff_ms: int, limit: int = 1000) -> int:
        """Delete up to `limit` delivered (written or duplicate) rows received before
        `cutoff_ms`. Rows not yet in the inbox are never pruned."""

        def work(c: sqlite3.Connection) -> int:
            return c.execute(
                "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests"
                " WHERE received_ms < ? AND state IN ('written', 'duplicate') LIMIT ?)",
                (cutoff_ms, limit),
            ).rowcount

        return int(await self._group_commit(work=work))

    async def backlog(self) -> tuple[int, int | None]:
        """(rows not yet in the inbox, receipt time in ms of the oldest one)."""
        ((count, oldest),) = await self._read(
            "SELECT count(*), min(received_ms) FROM requests"
            " WHERE state IN ('pending', 'awaiting_backend')"
        )
        return count, oldest

    async def count_in_state(self, state: str) -> int:
        ((count,),) = await self._read("SELECT count(*) FROM requests WHERE state = ?", (state,))
        return int(count)

    async def counts_by_state(self) -> dict[str, int]:
        return dict(await self._read("SELECT state, count(*) FROM requests GROUP BY state"))

    # -- helpers --------------------------------------------------------------------------

    async def _read(self, sql: str, params: Any = ()) -> list[Any]:
        assert self._conn is not None
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None


async def run_in_db_thread(conn: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(sqlite3_connection, *args)` in the connection's own thread, in one hop.

    A group commit is several statements; as separate aiosqlite calls each would wait for a
    turn of a busy event loop. aiosqlite has no public call for this, so this one function
    uses its internals (`_execute`, `_conn`); the dependency is pinned to a tested range."""
    return await conn._execute(lambda: fn(conn._conn, *args))


def _commit_batch(
    db: sqlite3.Connection, batch: list[_Waiting], known: dict[bytes, int]
) -> dict[bytes, int]:
    """One group commit, in the DB thread: store unseen body segments, then the batch's
    statements in order. Returns the segment ids it learned."""
    learned: dict[bytes, int] = {}
    db.execute("BEGIN IMMEDIATE")
    try:
        unseen = {h: data for w in batch for h, data in w.segments or () if h not in known}
        if unseen:
            db.executemany(
                "INSERT OR IGNORE INTO segments (hash, data) VALUES (?, ?)", unseen.items()
            )
            for marks, chunk in in_chunks(list(unseen)):
                learned.update(
                    db.execute(f"SELECT hash, id FROM segments WHERE hash IN ({marks})", chunk)
                )
        for w in batch:
            if w.segments is not None:
                ids = [known.get(h) or learned[h] for h, _ in w.segments]
                w.params["body_segments"] = pack_ids(ids)  # type: ignore[index]
        i = 0
        while i < len(batch):
            if batch[i].work is not None:
                batch[i].result = batch[i].work(db)  # type: ignore[misc]
                i += 1
                continue
            if batch[i].request is not None:  # an insert: RETURNING what it decided
                batch[i].result = db.execute(batch[i].sql, batch[i].params).fetchone()
                i += 1
                continue
            # Runs of the same statement go to SQLite as one executemany.
            j = i
            while j < len(batch) and batch[j].work is None and batch[j].sql == batch[i].sql:
                j += 1
            db.executemany(batch[i].sql, [w.params for w in batch[i:j]])
            i = j
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return learned


def _handed_row(w: _Waiting) -> PendingRow | None:
    """The flusher's row for a committed insert, or None if it is not for the flusher now
    (a repeat, or waiting for the backend)."""
    req = w.request
    assert req is not None
    seq, payload_kind, state = w.result
    if state != "pending":
        return None
    return PendingRow(
        seq=seq,
        id=req.id,
        received_ms=req.received_ms,
        body=req.body if body_needed(payload_kind) else b"",
        payload_kind=payload_kind,
        context_id=req.context_id,
        channel=req.channel,
        target=req.target,
        latest_user_prompt=req.latest_user_prompt,
        message_id=req.message_id,
        sender=req.sender,
        attachments=req.attachments,
        modality=req.modality,
    )


def check_storable(params: dict[str, Any]) -> None:
    """Refuse a row SQLite would refuse before it joins a batch: text that is not valid
    Unicode (lone surrogates), integers beyond 64 bits. Raises RowRejected."""
    for name, value in params.items():
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RowRejected(f"{name} is not valid Unicode text") from None
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise RowRejected(f"{name} is beyond a 64-bit integer")


def named_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A cursor's rows as dicts by column name: nobody reads `r[8]`."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


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
            "UPDATE requests SET claimed_until_ms = NULL, claimed_by = NULL"
            " WHERE claimed_until_ms IS NOT NULL"
        )
        pending = conn.execute("SELECT count(*) FROM requests WHERE state = 'pending'").fetchone()[
            0
        ]
        conn.execute("COMMIT")
        return interrupted, pending
    finally:
        conn.close()


def collect_segment_garbage(db_path: Path) -> int:
    """Delete segments no row refers to any more (after pruning). Only safe while no server
    process runs: workers cache segment ids. Called at start-up, before workers exist."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("BEGIN IMMEDIATE")
        used: set[int] = set()
        for (blob,) in conn.execute("SELECT body_segments FROM requests"):
            used.update(unpack_ids(blob))
        unused = [(i,) for (i,) in conn.execute("SELECT id FROM segments") if i not in used]
        conn.executemany("DELETE FROM segments WHERE id = ?", unused)
        conn.execute("COMMIT")
        return len(unused)
    finally:
        conn.close()
