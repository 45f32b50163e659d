"""Start-up maintenance, run once before any worker starts: crash recovery and the
collection of body segments no row uses any more."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..bodies import unpack_ids
from ..rows import State
from . import queries
from .engine import BUSY_TIMEOUT_MS


def recover_on_start(db_path: Path) -> tuple[int, int]:
    """Rows cut off mid-backend-call are delivered without a reply, and leases of a dead
    process are dropped. Returns (interrupted, pending)."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("BEGIN IMMEDIATE")
        interrupted = queries.deliver_without_reply(conn, None)
        conn.execute(
            "UPDATE requests SET claimed_until_ms = NULL, claimed_by = NULL"
            " WHERE claimed_until_ms IS NOT NULL"
        )
        ((pending,),) = conn.execute(queries.COUNT_IN_STATE, (State.PENDING.value,))
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
