"""Start-up maintenance, run once before any worker starts: crash recovery and the
collection of body segments no row uses any more."""

from __future__ import annotations

from pathlib import Path

from ..bodies import unpack_ids
from ..db import connect, scalar, transaction
from ..rows import State
from . import queries


def recover_on_start(db_path: Path) -> tuple[int, int]:
    """Rows cut off mid-backend-call are delivered without a reply, and leases of a dead
    process are dropped. Returns (interrupted, pending)."""
    conn = connect(db_path)
    try:
        with transaction(conn):
            interrupted = queries.deliver_without_reply(conn, None)
            conn.execute(
                "UPDATE requests SET claimed_until_ms = NULL, claimed_by = NULL"
                " WHERE claimed_until_ms IS NOT NULL"
            )
            pending = scalar(conn, queries.COUNT_IN_STATE, (State.PENDING.value,))
        return interrupted, pending
    finally:
        conn.close()


def collect_segment_garbage(db_path: Path) -> int:
    """Delete segments no row refers to any more (after pruning). Only safe while no server
    process runs: workers cache segment ids. Called at start-up, before workers exist."""
    conn = connect(db_path)
    try:
        with transaction(conn):
            used: set[int] = set()
            for blob, words in conn.execute("SELECT body_segments, prompt_segment FROM requests"):
                used.update(unpack_ids(blob))
                if words is not None:  # (long words: outbox/queries.stored_prompt)
                    used.add(words)
            unused = [(i,) for (i,) in conn.execute("SELECT id FROM segments") if i not in used]
            conn.executemany("DELETE FROM segments WHERE id = ?", unused)
        return len(unused)
    finally:
        conn.close()
