"""`Outbox`: the async face of the outbox (see the package's docstring) for the app,
the flusher, metrics and retention."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite

from ..bodies import PIECE_MAX, PIECE_MIN, digest, join_segments, unpack_ids
from ..db import connect_async
from ..errors import OutboxError, RowRejected
from ..rows import NewRequest, PendingRow, State, body_needed
from . import queries
from .engine import Job, WriteEngine
from .queries import LARGE_ROW

CLAIM_LEASE_MS = 10_000  # a dead worker's claimed rows go to another flusher after this
ROW_ATTEMPTS = 3  # tries to make a file of a row before it is undeliverable
SEGMENT_CACHE_SIZE = 50_000


@dataclass(frozen=True)
class _Inserted:
    """Tag of an insert job: the request, for the flusher once committed."""

    request: NewRequest


NEW_WORK = "new-work"  # tag of a job that makes rows pending that only a claim finds


class Outbox:
    def __init__(self, path: Path, dedup_window_s: float) -> None:
        self.path = path
        self.dedup_window_ms = int(dedup_window_s * 1000)
        self.token = secrets.token_hex(8)  # names this process's flusher in leases
        self._engine = WriteEngine(path, on_committed=self._committed)
        self._reader: aiosqlite.Connection | None = None
        self._on_rows: Callable[[list[PendingRow]], None] | None = None
        self._on_claimable: Callable[[], None] | None = None
        self._segment_ids: dict[bytes, int] = {}  # hash -> id of committed segments
        self._recent_hashes: dict[tuple[int, bytes, bytes], tuple[bytes, bytes]] = {}

    async def open(self) -> None:
        await self._engine.open()
        try:
            self._reader = await connect_async(self.path)
        except sqlite3.Error as exc:
            await self._engine.close()
            raise OutboxError(f"cannot open database {self.path}: {exc}") from None

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        await self._engine.close()
        if self._reader is not None:
            await self._reader.close()

    def listen(
        self, rows: Callable[[list[PendingRow]], None], claimable: Callable[[], None]
    ) -> None:
        """`rows` gets the new pending rows of each commit, in arrival order (leased to
        this process); `claimable` is called when a commit made rows pending that only a
        claim finds (backend outcomes)."""
        self._on_rows, self._on_claimable = rows, claimable

    @property
    def last_commit_error(self) -> str | None:
        """The DB fault of the last commit, None once one works (for /readyz)."""
        return self._engine.last_error

    def file_problem(self) -> str | None:
        """Why the DB's path no longer names the file this process writes, if it does not
        (deleted, or replaced), for /readyz: found without waiting for a commit."""
        identity = self._engine.identity
        return None if identity is None else identity.problem()

    # -- ingest ---------------------------------------------------------------------------

    async def record(self, req: NewRequest) -> None:
        """Return once the request row is committed; raise OutboxError if it cannot be (and
        RowRejected if it never could)."""
        segments = [(self._segment_hash(part), part) for part in req.segments]
        # The body's own hash, from its segments' (cheaper than hashing the body again).
        body_hash = digest(b"".join(h for h, _ in segments))
        words, words_data = queries.stored_prompt(req.latest_user_prompt)
        prompt = None if words_data is None else (digest(words_data), words_data)
        params = {
            "id": req.id,
            "received_ms": req.received_ms,
            "body_hash": body_hash,
            **req.message(),
            "latest_user_prompt": words,
            "retry": req.retry,
            "state": (State.AWAITING_BACKEND if req.awaiting_backend else State.PENDING).value,
            "dedup_since_ms": req.received_ms - self.dedup_window_ms,
            # A row waiting for the backend is claimed once its outcome is recorded.
            "claimed_until_ms": None if req.awaiting_backend else _now_ms() + CLAIM_LEASE_MS,
            "claimed_by": None if req.awaiting_backend else self.token,
        }
        check_storable(params)
        work = partial(
            queries.insert_request, params=params, segments=segments, known=self._segment_ids,
            prompt=prompt,
        )  # fmt: skip
        large = sum(len(p) for p in req.segments) + len(req.latest_user_prompt) >= LARGE_ROW
        await self._engine.run(work, tag=_Inserted(req), bulk=large)

    def _segment_hash(self, part: bytes) -> bytes:
        """digest(part), skipping the hashing for a piece equal to one seen recently: a
        system prompt compares far faster than it hashes."""
        if not PIECE_MIN <= len(part) <= PIECE_MAX:  # (nor keep a huge one in memory)
            return digest(part)
        key = (len(part), part[:64], part[-64:])
        seen = self._recent_hashes.get(key)
        if seen is not None and seen[1] == part:
            return seen[0]
        h = digest(part)
        if len(self._recent_hashes) >= 64:
            self._recent_hashes = {}
        self._recent_hashes[key] = (h, part)
        return h

    def _committed(self, batch: list[Job]) -> None:
        """On the event loop, after a commit: remember the segment ids now stored, hand the
        new pending rows to the flusher, wake it for rows only a claim finds."""
        handed: list[PendingRow] = []
        for job in batch:
            if isinstance(job.tag, _Inserted):
                (seq, payload_kind, state), learned = job.result
                if len(self._segment_ids) + len(learned) > SEGMENT_CACHE_SIZE:
                    self._segment_ids = {}  # a new dict: jobs in flight keep the old one
                self._segment_ids.update(learned)
                job.result = None
                if state == State.PENDING.value:
                    handed.append(PendingRow.handed(job.tag.request, seq, payload_kind))
        if handed and self._on_rows is not None:
            self._on_rows(handed)
        if any(job.tag == NEW_WORK for job in batch) and self._on_claimable is not None:
            self._on_claimable()

    # -- flusher side ---------------------------------------------------------------------

    async def claim_pending(self, limit: int, max_bytes: int) -> tuple[list[PendingRow], bool]:
        """Lease the oldest pending rows to this flusher, in arrival order (at most `limit`,
        and past the first at most `max_bytes`); and whether more were pending."""
        work = partial(
            queries.claim_pending, token=self.token, now_ms=_now_ms(), lease_ms=CLAIM_LEASE_MS,
            limit=limit, max_bytes=max_bytes,
        )  # fmt: skip
        rows, more = await self._engine.run(work)
        ids = [
            unpack_ids(r["body_segments"]) if body_needed(r["payload_kind"]) else [] for r in rows
        ]
        words = {r["prompt_segment"] for r in rows if r["prompt_segment"] is not None}
        data: dict[int, bytes] = {}
        needed = {i for row_ids in ids for i in row_ids} | words
        for marks, chunk in queries.in_chunks(sorted(needed)):
            data.update(await self._read(queries.SEGMENT_DATA % marks, chunk))
        return [
            PendingRow.from_row(
                r, join_segments(row_ids, data),
                None if r["prompt_segment"] is None else data[r["prompt_segment"]].decode(),
            )
            for r, row_ids in zip(rows, ids, strict=True)
        ], more  # fmt: skip

    async def mark_written(self, seqs: Iterable[int], bulk: bool = False) -> None:
        """Mark rows written (`bulk`: large ones among them, each rewritten whole by SQLite:
        committed after the ordinary work, see WriteEngine)."""
        seqs = list(seqs)
        if seqs:
            work = partial(queries.mark_written, seqs=seqs, now_ms=_now_ms())
            await self._engine.run(work, bulk=bulk)

    async def record_inbox_failure(self, seq: int, error: str, release: Iterable[int]) -> None:
        """The inbox failed at row `seq`; the lease on the other rows is given back."""
        others = list(release)

        def work(conn: sqlite3.Connection) -> None:
            queries.record_inbox_failure(conn, seq, error, _now_ms())
            queries.release(conn, others)

        await self._engine.run(work)

    async def record_row_failure(self, seq: int, error: str) -> str | None:
        """Row `seq` could not be made into a file. After ROW_ATTEMPTS such failures it is
        undeliverable: returns its id then, else None (released for a later claim)."""
        work = partial(
            queries.record_row_failure, seq=seq, error=error, now_ms=_now_ms(),
            give_up_after=ROW_ATTEMPTS,
        )  # fmt: skip
        return await self._engine.run(work)  # type: ignore[no-any-return]

    async def finish_backend(self, request_id: str, outcome: dict[str, Any]) -> None:
        """Record the backend's outcome; the row becomes pending for the flusher."""
        work = partial(queries.finish_backend, request_id=request_id, outcome=outcome)
        await self._engine.run(work, tag=NEW_WORK)

    async def deliver_stale_backend_waits(self, older_than_ms: int) -> int:
        """Rows whose backend call outlived any timeout are delivered without a reply."""
        work = partial(queries.deliver_without_reply, received_before_ms=_now_ms() - older_than_ms)
        return int(await self._engine.run(work, tag=NEW_WORK))

    async def prune_delivered(self, cutoff_ms: int, limit: int = 1000) -> int:
        work = partial(queries.prune_delivered, received_before_ms=cutoff_ms, limit=limit)
        return int(await self._engine.run(work))

    # -- reads ----------------------------------------------------------------------------

    async def backlog(self) -> tuple[int, int | None]:
        """(rows not yet in the inbox, receipt time in ms of the oldest one)."""
        ((count, oldest),) = await self._read(queries.BACKLOG)
        return count, oldest

    async def count_in_state(self, state: State) -> int:
        ((count,),) = await self._read(queries.COUNT_IN_STATE, (state.value,))
        return int(count)

    async def count_unanswered(self) -> tuple[int, int]:
        """(requests written to the inbox that the agent has neither replied to nor done,
        the conversations they are in)."""
        ((count, chats),) = await self._read(queries.COUNT_UNANSWERED)
        return int(count), int(chats)

    async def agent_runner(self) -> tuple[dict[str, int], int]:
        """(the agent runner's runs of the last day by outcome, the conversations it set
        aside whose messages still wait)."""
        day_ago = int((time.time() - 86400) * 1000)
        runs = dict(await self._read(queries.RUNS_SINCE, (day_ago,)))
        ((aside,),) = await self._read(queries.COUNT_SET_ASIDE)
        return runs, int(aside)

    async def reply_delivery(self, newest: int = 1000) -> dict[str, list[int]]:
        """How long the newest `newest` replies took to deliver (ms), by transport."""
        out: dict[str, list[int]] = {}
        for transport, ms in await self._read(queries.DELIVERY_TIMES, (newest,)):
            out.setdefault(transport, []).append(int(ms))
        return out

    async def counts_by_state(self) -> dict[str, int]:
        return dict(await self._read(queries.COUNTS_BY_STATE))

    async def _read(self, sql: str, params: Any = ()) -> list[Any]:
        assert self._reader is not None
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise OutboxError(str(exc)) from None


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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
