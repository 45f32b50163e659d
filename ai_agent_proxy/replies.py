"""The agent's replies: claimed in the DB before they are sent, so each request is
answered once (`reply`), or marked as needing no answer (`done`); and the oldest request
still waiting for either (`next`). Runs in the CLI, beside a running server: every change is
one short write transaction (db.transaction) on the shared WAL database.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import db
from .agent_view import agent_view
from .config import Settings
from .errors import HistoryError, ReplyFailed, ReplyRefused
from .history import History, Selection
from .outbox.queries import ANSWERED, UNANSWERED
from .printable import printable
from .rows import PendingRow, ReplyState, State

SEND_TIMEOUT_S = 120.0
# A claim ('sending') older than this is abandoned (its process was killed mid-send): the
# next `reply` or `done` takes it over. Longer than any send may take.
LEASE_MS = int((SEND_TIMEOUT_S + 60) * 1000)
OUTPUT_KEPT = 4000  # characters of the CLI's output kept with the reply


@dataclass(frozen=True)
class Target:
    request_id: str
    channel: str
    target: str
    message_id: str | None


def connect(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise HistoryError(f"database {db_path} does not exist (set --db or DB)")
    return db.connect(db_path, rows_by_name=True)


@contextmanager
def session(db_path: Path) -> Iterator[tuple[History, sqlite3.Connection]]:
    """The History of the DB (to resolve ids and read rows) and a read-write connection
    for replies, closed together. HistoryError if the DB cannot be used."""
    history = History(db_path)
    try:
        conn = connect(db_path)
        try:
            yield history, conn
        finally:
            conn.close()
    finally:
        history.close()


def target_of(conn: sqlite3.Connection, request_id: str) -> Target:
    row = conn.execute(
        "SELECT channel, target, message_id FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    if row is None or not row["channel"] or not row["target"]:
        raise HistoryError(f"request {request_id} has no channel and target: nobody to reply to")
    return Target(request_id, row["channel"], row["target"], row["message_id"])


def claim(conn: sqlite3.Connection, request_id: str, message: str | None, again: bool) -> None:
    """Claim the request for a reply (`message`) or for `done` (None). Raises ReplyRefused if it
    is answered already or a reply is being sent (a claim younger than LEASE_MS), unless
    `again`. A claim older than that was abandoned: it is taken over, and noted."""
    with db.transaction(conn):
        row = conn.execute(
            "SELECT state, claimed_ms FROM replies WHERE request_id = ?", (request_id,)
        ).fetchone()
        now = _now_ms()
        abandoned = (
            row is not None
            and row["state"] == ReplyState.SENDING.value
            and now - row["claimed_ms"] >= LEASE_MS
        )
        if row is not None and not again and not abandoned:
            if row["state"] in ANSWERED:
                raise ReplyRefused(f"request {request_id} is answered already ({row['state']})")
            if row["state"] == ReplyState.SENDING.value:
                raise ReplyRefused(f"a reply to request {request_id} is being sent")
        if abandoned:
            conn.execute(
                "UPDATE replies SET abandoned_ms = ? WHERE request_id = ?", (now, request_id)
            )
        state = ReplyState.SENDING if message is not None else ReplyState.DONE
        conn.execute(
            "INSERT INTO replies (request_id, state, message, claimed_ms, finished_ms, attempts)"
            " VALUES (:id, :state, :message, :now, :finished, 1)"
            " ON CONFLICT (request_id) DO UPDATE SET state = :state, message = :message,"
            " claimed_ms = :now, finished_ms = :finished, exit_status = NULL, output = NULL,"
            " attempts = attempts + 1",
            {"id": request_id, "state": state.value, "message": message, "now": now,
             "finished": None if message is not None else now},
        )  # fmt: skip


def reply(
    conn: sqlite3.Connection,
    settings: Settings,
    request_id: str,
    text: str,
    reply_to: bool,
    again: bool,
) -> Target:
    """The whole `reply`: claim the request, send through `openclaw message send`, record
    the outcome. Returns where it went; ReplyRefused (answered already, being sent) or
    ReplyFailed (the send failed: recorded, a later reply may try again)."""
    to = target_of(conn, request_id)
    claim(conn, request_id, text, again)
    status, output = send(settings.openclaw_bin, to, text, reply_to)
    finish(conn, request_id, status, settings.redact(output))
    if status != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit status {status}"
        raise ReplyFailed(
            f"reply to {request_id} failed: {printable(last, one_line=True)} (try again later)"
        )
    return to


def finish(conn: sqlite3.Connection, request_id: str, exit_status: int, output: str) -> None:
    state = ReplyState.SENT if exit_status == 0 else ReplyState.FAILED
    conn.execute(
        "UPDATE replies SET state = ?, finished_ms = ?, exit_status = ?, output = ?"
        " WHERE request_id = ?",
        (state.value, _now_ms(), exit_status, output[-OUTPUT_KEPT:], request_id),
    )


def send(openclaw: str, to: Target, message: str, reply_to: bool) -> tuple[int, str]:
    """`openclaw message send` for a request: (exit status, output)."""
    argv = [openclaw, "message", "send", "--channel", to.channel, "--target", to.target,
            "--message", message]  # fmt: skip
    if reply_to and to.message_id:
        argv += ["--reply-to", to.message_id]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=SEND_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        return 127, f"{openclaw}: not found (set OPENCLAW_BIN)"
    except OSError as exc:  # not executable, not a program, ...: recorded as a failed send
        return 126, f"{openclaw}: cannot run it: {exc.strerror or exc}"
    except subprocess.TimeoutExpired:
        return 124, f"{openclaw} message send did not finish in {SEND_TIMEOUT_S:.0f} s"
    return done.returncode, (done.stdout + done.stderr).strip()


def oldest_unanswered(conn: sqlite3.Connection) -> str | None:
    row = conn.execute(
        f"SELECT id FROM requests WHERE {UNANSWERED} ORDER BY seq LIMIT 1"
    ).fetchone()
    return None if row is None else str(row["id"])


def earlier_requests(conn: sqlite3.Connection, context_id: str | None, seq: int) -> int:
    """How many requests of the same conversation came before (repeats not counted)."""
    if context_id is None:
        return 0
    row = conn.execute(
        "SELECT count(*) FROM requests WHERE context_id = ? AND seq < ? AND state != ?",
        (context_id, seq, State.DUPLICATE.value),
    ).fetchone()
    return int(row[0])


def row_of(history: History, request_id: str) -> PendingRow:
    """A request's row, as the flusher renders it."""
    ((row, _),) = list(history.pending_rows(Selection(ids=[request_id])))
    return row


def view_of(conn: sqlite3.Connection, row: PendingRow, inbox: Path) -> dict[str, Any]:
    """The agent's short view of a request (agent_view): its file, how long it has waited,
    and how many came before it in its conversation."""
    earlier = earlier_requests(conn, row.context_id, row.seq)
    return agent_view(row, inbox / row.inbox_file, time.time() - row.received_ms / 1000, earlier)


def wait_for_unanswered(conn: sqlite3.Connection, timeout_s: float | None) -> str | None:
    """The oldest unanswered request, waiting up to `timeout_s` (None: for ever)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        found = oldest_unanswered(conn)
        if found is not None or (deadline is not None and time.monotonic() >= deadline):
            return found
        time.sleep(0.2)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
