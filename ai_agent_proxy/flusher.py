"""Pending outbox rows -> inbox files, in arrival order, retried with backoff.

The files are rendered and written by the inbox writer process; the event loop only waits
on it. Where the flusher takes its rows from is its `source` (see Flusher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .config import Settings
from .errors import OutboxError
from .inbox_writer_client import InboxWriter, WriterOptions
from .outbox.queries import LARGE_ROW
from .outbox.store import CLAIM_LEASE_MS, Outbox
from .rows import PendingRow

log = logging.getLogger("ai_agent_proxy.flusher")

BATCH = 128
# A batch's bytes (bodies and words) at most, past its first row: the writer holds a batch
# whole, and 128 rows of 15 MiB were 2 GB in each process.
BATCH_BYTES = 16 * 1024 * 1024
# Handed rows kept in memory at most; beyond this the flusher is far behind (or failing)
# and claims take over: the rows are in the DB, leased to this process.
HANDED_MAX_ROWS = 4096
HANDED_MAX_BYTES = 64 * 1024 * 1024


def row_bytes(row: PendingRow) -> int:
    """What a row holds in memory, roughly: its body (when carried) and the person's words."""
    return len(row.body) + len(row.latest_user_prompt)


IDLE_POLL_S = 1.0  # also picks up rows whose flusher (another worker) died
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
STALE_BACKEND_MARGIN_S = 60.0
STOP_WRITE_S = 5.0  # beyond twice BACKEND_TIMEOUT a backend wait is abandoned


# A batch the writer process holds longer than this makes the server not ready (/readyz):
# stopped (SIGSTOP), or stuck on a dead disk. A batch is a few MiB: it takes milliseconds.
WRITER_STALL_S = 10.0
STOP_WAIT_S = STOP_WRITE_S + 1.0  # a stop then gives up on a writer that does not answer


@dataclass
class FlusherStatus:
    files_written: int = 0
    write_failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    retry_in_s: float = 0.0
    writing_since: float | None = None  # monotonic time the batch in hand went to the writer
    batch_rows: int = 0

    def stalled_s(self, now: float) -> float | None:
        """How long the writer has held its batch, once that is past WRITER_STALL_S."""
        if self.writing_since is None:
            return None
        held = now - self.writing_since
        return held if held > WRITER_STALL_S else None


def next_backoff(failures: int) -> float:
    """0.05 s, 0.1 s, 0.2 s ... capped at 2 s: quick recovery, little churn meanwhile."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * (2 ** max(0, failures - 1)))


class Source(Enum):
    """Where the flusher takes its next rows from."""

    HANDED = "handed"  # the rows each commit hands over in memory, already leased to us
    CLAIMS = "claims"  # leases taken in the DB, oldest pending first


class Flusher:
    """Writes pending rows as inbox files, in arrival order.

    Each commit hands its new rows over in memory (`hand`), already leased to this process,
    so a file usually appears within milliseconds of the answer. Everything else (rows from
    before a restart or of a dead worker, rows whose backend outcome was just recorded, rows
    after a failed write or a dropped hand-over) is claimed from the DB. `source` says which
    feeds the next batch; `_use` is the one place it changes, and says why.

    Invariants:
    - Order: handed rows and claims agree on order by seq. While claims are in charge,
      handed rows wait; a claim takes every pending row up to its last seq, so the handed
      rows up to there are dropped (the claim has them). Claims stay in charge until one
      comes back short: then every row committed before it was in it, and the handed rows
      after it follow on.
    - No row written twice by one process: before a claim, the rows already written are
      marked in the DB (a claim also takes back this process's own leased rows).
    - A handed row near the end of its lease is re-leased by a claim before it is written,
      so another worker does not take it over meanwhile.
    - Memory: handed rows are bounded (HANDED_MAX_ROWS / HANDED_MAX_BYTES); past that they
      are dropped and claims take over (the rows are in the DB, leased to us).
    - A failed write keeps its row pending and the next try starts from it (claims).
    """

    def __init__(
        self,
        outbox: Outbox,
        settings: Settings,
        on_written: Callable[[float], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self._on_written = on_written  # gets request->file latency in seconds
        self._unmarked: list[int] = []  # written, not yet marked so in the DB
        self._marking: asyncio.Task[None] | None = None
        self._handed: deque[PendingRow] = deque()
        self._handed_bytes = 0
        self._drops = 0  # times the handed rows were dropped for claims to take over
        self.source = Source.CLAIMS  # at start: whatever is pending from before
        self.writer = InboxWriter(
            WriterOptions(
                settings.inbox,
                settings.instruction,
                settings.openclaw_message_cli_skill_path,
                settings.debug,
            )
        )
        self.status = FlusherStatus()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def hand(self, rows: list[PendingRow]) -> None:
        """New rows just committed, leased to this process."""
        self._handed.extend(rows)
        self._handed_bytes += sum(row_bytes(r) for r in rows)
        if len(self._handed) > HANDED_MAX_ROWS or self._handed_bytes > HANDED_MAX_BYTES:
            self._handed.clear()
            self._handed_bytes = 0
            self._drops += 1
            self._use(Source.CLAIMS, "handed rows over their bound")
        self._wake.set()

    def wake(self) -> None:
        """Rows became pending that only a claim finds."""
        self._use(Source.CLAIMS, "rows only a claim finds")
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="inbox-flusher")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task:
            done, _ = await asyncio.wait({self._task}, timeout=STOP_WAIT_S)
            if not done:  # the writer holds a batch and does not answer (stopped, stuck)
                since = self.status.writing_since
                log.error(
                    "inbox_writer_unresponsive held_batch_s=%.1f: killed; its rows stay"
                    " pending for the next start",
                    0.0 if since is None else time.monotonic() - since,
                )
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if not done:
                await self.writer.kill()
        await self.writer.close()

    async def run(self) -> None:
        await self.writer.start()
        try:
            await self._run()
            await self._write_remaining()
        finally:
            with contextlib.suppress(OutboxError):
                await self._settle_marks()

    async def _write_remaining(self) -> None:
        """On stop: write what is committed and waiting, for up to STOP_WRITE_S (what is
        left then stays pending in the DB and is written at the next start)."""
        deadline = time.monotonic() + STOP_WRITE_S
        self._use(Source.CLAIMS, "stopping: whatever is pending")
        while time.monotonic() < deadline:
            try:
                if not await self.flush_once():
                    return
            except OutboxError:
                return

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before claiming, so a commit from now on is not missed
            try:
                progressed = await self.flush_once()
            except OutboxError as exc:
                log.warning("flusher_db_error error=%s", exc)
                self._use(Source.CLAIMS, "a DB error: what was handed may not be marked")
                await self._sleep(self._fail(f"database: {exc}"))
                continue
            except Exception:  # never let the flusher die silently
                log.exception("flusher_crashed; restarting in 1s")
                self._use(Source.CLAIMS, "after a crash")
                await self._sleep(1.0)
                continue
            if progressed:
                continue
            if self.status.consecutive_failures:
                await self._sleep(self.status.retry_in_s)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            except asyncio.TimeoutError:
                self._use(Source.CLAIMS, "idle: rows a dead worker held, once their lease ends")
                await self._release_stale_backend_waits()

    async def _release_stale_backend_waits(self) -> None:
        if not self.settings.url:
            return
        limit_ms = int((self.settings.backend_timeout * 2 + STALE_BACKEND_MARGIN_S) * 1000)
        try:
            released = await self.outbox.deliver_stale_backend_waits(limit_ms)
        except OutboxError as exc:
            log.warning("flusher_db_error error=%s", exc)
            return
        if released:
            log.warning("backend_wait_expired rows=%d delivered_without_reply", released)
            self._wake.set()

    async def flush_once(self) -> bool:
        """Write one batch; True if all of it was written (so there may be more to do).
        The batch is marked written in the DB while the next one is being written."""
        rows = await self._next_rows()
        if not rows:
            await self._settle_marks()
            self._recovered()  # the DB answers and nothing is left failing
            return False
        self.status.writing_since, self.status.batch_rows = time.monotonic(), len(rows)
        try:
            result = await self.writer.write(rows)
        finally:
            self.status.writing_since = None
        # Written is written: counted, reported and due a mark before anything may raise
        # (else a retry's claim would take these rows again and write them twice).
        self.status.files_written += len(result.written)
        if self._on_written and result.written:
            now_ms = time.time() * 1000
            received = {r.seq: r.received_ms for r in rows}
            for seq in result.written:
                self._on_written(max(0.0, (now_ms - received[seq]) / 1000))
        self._unmarked.extend(result.written)
        if result.rejected:
            await self._record_rejected(result.rejected, rows)
        await self._settle_marks()  # the previous batch's, done meanwhile
        if result.written:
            large = any(row_bytes(r) >= LARGE_ROW for r in rows)
            self._marking = asyncio.create_task(self._mark(list(self._unmarked), large))
        if result.failed_seq is None:
            self._recovered()
            return True
        done = set(result.written)
        release = [r.seq for r in rows if r.seq not in done and r.seq != result.failed_seq]
        self._use(Source.CLAIMS, "a failed write: the retry starts from its row")
        error = result.error or "unknown error"
        await self.outbox.record_inbox_failure(result.failed_seq, error, release)
        delay = self._fail(error)
        log.warning(
            "inbox_write_failed request_seq=%d error=%s retry_in=%.2fs",
            result.failed_seq,
            error,
            delay,
        )
        return False

    async def _record_rejected(
        self, rejected: list[tuple[int, str]], rows: list[PendingRow]
    ) -> None:
        """Rows the writer could not render: counted apart from inbox failures, retried by a
        later claim, and after a few tries undeliverable (one log line each), so that one
        odd row never holds up the queue."""
        ids = {r.seq: r.id for r in rows}
        for seq, error in rejected:
            undeliverable = await self.outbox.record_row_failure(seq, error)
            if undeliverable is not None:  # (counted in the DB: /readyz, /metrics)
                log.error("inbox_row_undeliverable request_id=%s error=%s", ids[seq], error)
            else:
                log.warning("inbox_row_failed request_id=%s error=%s", ids[seq], error)
        self._use(Source.CLAIMS, "rows rejected by the writer, to try again")

    async def _mark(self, seqs: list[int], bulk: bool = False) -> None:
        await self.outbox.mark_written(seqs, bulk)
        done = set(seqs)
        self._unmarked = [seq for seq in self._unmarked if seq not in done]

    async def _settle_marks(self) -> None:
        """Wait for the mark in flight; raise OutboxError if it failed (its rows stay in
        `_unmarked` and are marked before the next claim)."""
        task, self._marking = self._marking, None
        if task is not None:
            await task

    async def _next_rows(self) -> list[PendingRow]:
        """The next batch, in arrival order: handed rows, or claimed ones while claims
        are in charge (until a claim comes back short: then every row committed before
        it was in it, and the handed rows after it follow on)."""
        handed = self._handed
        # A handed row near the end of its lease is re-leased by a claim first, so that
        # another worker does not take it over while it is being written.
        if handed and handed[0].received_ms < time.time() * 1000 - CLAIM_LEASE_MS / 2:
            self._use(Source.CLAIMS, "a handed row near the end of its lease")
        if self.source is Source.CLAIMS:
            # A claim takes back this process's own leased rows: first mark those already
            # in the inbox (also after a DB failure), or they would be written twice.
            await self._settle_marks()
            if self._unmarked:
                await self._mark(list(self._unmarked))
            drops = self._drops
            rows, more = await self.outbox.claim_pending(BATCH, BATCH_BYTES)
            # Claims stay in charge while there may be more, or if rows were dropped from
            # memory meanwhile (committed after this claim, so not in it).
            if not more and self._drops == drops:
                self._use(Source.HANDED, "a claim came back short: nothing older is pending")
            if rows:
                # Handed rows up to here were pending and leased to us: the claim took them.
                last = rows[-1].seq
                while handed and handed[0].seq <= last:
                    self._handed_bytes -= row_bytes(handed.popleft())
            return rows
        rows, size = [], 0
        while (
            handed
            and len(rows) < BATCH
            and not (rows and size + row_bytes(handed[0]) > BATCH_BYTES)
        ):
            rows.append(handed.popleft())
            size += row_bytes(rows[-1])
        self._handed_bytes -= size
        return rows

    def _use(self, source: Source, why: str) -> None:
        """The one place the source of rows changes."""
        if source is not self.source:
            log.debug("flusher_source %s -> %s: %s", self.source.value, source.value, why)
            self.source = source

    def _recovered(self) -> None:
        self.status.consecutive_failures = 0
        self.status.last_error = None
        self.status.retry_in_s = 0.0

    def _fail(self, error: str) -> float:
        self.status.write_failures += 1
        self.status.consecutive_failures += 1
        self.status.last_error = error
        self.status.retry_in_s = next_backoff(self.status.consecutive_failures)
        return self.status.retry_in_s

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
