"""The runner's state, as rows (migration 0010): a row per run, begun when it starts and
ended when it ends; each conversation's session with an agent CLI; a conversation's
failures, its next try and whether it is set aside. A runner killed with -9 and started
again finds its unfinished runs here. Each function is one short statement or write
transaction (db.transaction) on the shared WAL database.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ... import db
from ...ids import new_request_id
from ...outbox.queries import STILL_WAITS
from ..conversations import now_ms


class Outcome(str, enum.Enum):
    """How a run ended: the one word its record, its log line and `agent runs` give."""

    ANSWERED = "answered"  # every message it was given is replied to or done
    PARTLY = "partly"  # some of them are
    UNANSWERED = "unanswered"  # none is, and the CLI gave no answer to send
    FAILED = "failed"  # the CLI failed (or could not start), and nothing is answered
    TIMED_OUT = "timed_out"  # stopped at --timeout
    IDLE = "idle"  # stopped after --idle-timeout without output
    STOPPED = "stopped"  # stopped by the runner's own stop, or `agent stop`
    INTERRUPTED = "interrupted"  # its runner died mid-run (found when one starts again)
    HELD = "held"  # its answer was held back: the person wrote again meanwhile (run again)


@dataclass(frozen=True)
class Begun:
    """A run as it starts."""

    id: str
    conversation: str
    request_ids: Sequence[str]
    command: Sequence[str]  # secrets masked
    runner: dict[str, Any]  # {"name", "pid", "started"}
    slot: int
    attempt: int
    session_before: str | None


def new_run_id() -> str:
    return new_request_id()[0]


def begin(conn: sqlite3.Connection, run: Begun) -> None:
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO agent_runs (id, conversation, request_ids, command, runner, slot,"
            " attempt, started_ms, session_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.id, run.conversation, json.dumps(list(run.request_ids)),
             json.dumps(list(run.command)), json.dumps(run.runner), run.slot, run.attempt,
             now_ms(), run.session_before),
        )  # fmt: skip


def started(conn: sqlite3.Connection, run_id: str, pid: int, pid_started: int | None) -> None:
    with db.transaction(conn):
        conn.execute(
            "UPDATE agent_runs SET pid = ?, pid_started = ? WHERE id = ?",
            (pid, pid_started, run_id),
        )


END_FIELDS = (
    "exit_status", "limit_fired", "outcome", "sent_output", "session_after", "cost_usd",
    "tokens", "error", "output_tail",
)  # fmt: skip


def end(conn: sqlite3.Connection, run_id: str, **fields: Any) -> None:
    """The run ended: when, and how (END_FIELDS; `outcome` an Outcome, a str: stored as its
    value)."""
    unknown = set(fields) - set(END_FIELDS)
    assert not unknown, unknown
    sets = ", ".join(f"{name} = :{name}" for name in fields)
    with db.transaction(conn):
        conn.execute(
            f"UPDATE agent_runs SET ended_ms = :ended, {sets} WHERE id = :id",
            {**fields, "ended": now_ms(), "id": run_id},
        )


def unfinished(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM agent_runs INDEXED BY agent_runs_unfinished WHERE ended_ms IS NULL"
        " ORDER BY started_ms"
    ).fetchall()


def interrupted(conn: sqlite3.Connection, run_id: str, runner_pid: int | None) -> None:
    """A run whose runner died while it ran (found by the next runner): recorded as
    interrupted, and that runner's leases given back, so its conversations come back at
    once rather than when their leases end."""
    with db.transaction(conn):
        conn.execute(
            "UPDATE agent_runs SET ended_ms = ?, outcome = ?, error = ? WHERE id = ?",
            (now_ms(), Outcome.INTERRUPTED.value,
             "its runner ended while it ran (found by the next runner)", run_id),
        )  # fmt: skip
        conn.execute(
            "DELETE FROM conversation_leases WHERE taker LIKE 'runner:%' AND taker LIKE ?",
            (f"%:{int(runner_pid or 0)}/slot-%",),
        )


def stop_requested(conn: sqlite3.Connection, run_id: str) -> bool:
    row = conn.execute(
        "SELECT stop_requested_ms FROM agent_runs WHERE id = ?", (run_id,)
    ).fetchone()
    return row is not None and row[0] is not None


def request_stop(conn: sqlite3.Connection, which: str) -> list[sqlite3.Row]:
    """`agent stop RUN|CONTEXT`: the unfinished runs of that id (any unique part of it) or
    conversation, marked as asked to stop. The caller signals their process groups."""
    with db.transaction(conn):
        rows = conn.execute(
            "SELECT * FROM agent_runs WHERE ended_ms IS NULL AND (conversation = ? OR id = ?"
            " OR (length(?) >= 8 AND id LIKE '%' || ? || '%'))",
            (which, which, which, which.lower()),
        ).fetchall()
        conn.executemany(
            "UPDATE agent_runs SET stop_requested_ms = ? WHERE id = ?",
            [(now_ms(), r["id"]) for r in rows],
        )
    return rows


# -- sessions ------------------------------------------------------------------------------


def session(conn: sqlite3.Connection, conversation: str, agent: str) -> tuple[str, str | None]:
    """(the conversation's stable id for `agent` (AIAP_SESSION), the CLI's own session id
    to resume, if one was stored). The stable id is made on first use."""
    with db.transaction(conn):
        row = conn.execute(
            "SELECT stable_id, session_id FROM agent_sessions WHERE conversation = ? AND agent = ?",
            (conversation, agent),
        ).fetchone()
        if row is not None:
            return str(row[0]), row[1]
        stable = str(uuid.uuid4())
        conn.execute(
            "INSERT INTO agent_sessions (conversation, agent, stable_id, updated_ms)"
            " VALUES (?, ?, ?, ?)",
            (conversation, agent, stable, now_ms()),
        )
        return stable, None


def keep_session(
    conn: sqlite3.Connection, conversation: str, agent: str, session_id: str | None
) -> None:
    """Store the CLI's session id for the next run of the conversation (None: drop it,
    the next run starts fresh)."""
    with db.transaction(conn):
        conn.execute(
            "UPDATE agent_sessions SET session_id = ?, updated_ms = ? WHERE conversation = ?"
            " AND agent = ?",
            (session_id, now_ms(), conversation, agent),
        )


# -- a conversation's failures ---------------------------------------------------------------


@dataclass(frozen=True)
class Failures:
    count: int
    retry_after_ms: int | None
    set_aside_seq: int | None


def failures(conn: sqlite3.Connection) -> dict[str, Failures]:
    """Every conversation that failed since it was last answered."""
    return {
        r["conversation"]: Failures(r["failures"], r["retry_after_ms"], r["set_aside_seq"])
        for r in conn.execute(
            "SELECT conversation, failures, retry_after_ms, set_aside_seq FROM agent_conversations"
        )
    }


def failed(
    conn: sqlite3.Connection,
    conversation: str,
    outcome: Outcome,
    retry_after_ms: int | None,
    set_aside_seq: int | None,
) -> None:
    """Count a failed run of the conversation: when to try it again, or (its attempts
    spent) that it is set aside until a message newer than `set_aside_seq` arrives."""
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO agent_conversations (conversation, failures, retry_after_ms,"
            " set_aside_seq, set_aside_ms, last_outcome) VALUES (:c, 1, :retry, :seq,"
            " :aside, :outcome) ON CONFLICT (conversation) DO UPDATE SET failures ="
            " failures + 1, retry_after_ms = :retry, set_aside_seq = :seq,"
            " set_aside_ms = :aside, last_outcome = :outcome",
            {"c": conversation, "retry": retry_after_ms, "seq": set_aside_seq,
             "aside": now_ms() if set_aside_seq is not None else None,
             "outcome": outcome.value},
        )  # fmt: skip


def cleared(conn: sqlite3.Connection, conversation: str) -> None:
    """The conversation was answered, or a newer message came: its failures are past."""
    with db.transaction(conn):
        conn.execute("DELETE FROM agent_conversations WHERE conversation = ?", (conversation,))


def set_aside(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """The conversations set aside as failed whose messages still wait (for history
    stats, /metrics, doctor), longest set aside first."""
    return conn.execute(
        "SELECT conversation, failures, set_aside_ms, last_outcome FROM agent_conversations"
        f" WHERE set_aside_seq IS NOT NULL AND {STILL_WAITS} ORDER BY set_aside_ms"
    ).fetchall()


def prune(conn: sqlite3.Connection) -> int:
    """Forget the failures of conversations in which nothing waits any more (answered by
    someone else meanwhile)."""
    with db.transaction(conn):
        return conn.execute(f"DELETE FROM agent_conversations WHERE NOT {STILL_WAITS}").rowcount


# -- for `agent runs` and `history show` ------------------------------------------------------


def listed(
    conn: sqlite3.Connection,
    *,
    conversation: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    outcome: str | None = None,
    limit: int | None = 50,
) -> Iterator[dict[str, Any]]:
    """Runs, newest first, by the filters `agent runs` takes."""
    clauses, params = [], []
    for sql, value in (("conversation = ?", conversation), ("started_ms >= ?", since_ms),
                       ("started_ms <= ?", until_ms)):  # fmt: skip
        if value is not None:
            clauses.append(sql)
            params.append(value)
    if outcome == "running":
        clauses.append("ended_ms IS NULL")
    elif outcome is not None:
        clauses.append("outcome = ?")
        params.append(outcome)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = f"SELECT * FROM agent_runs{where} ORDER BY started_ms DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    for row in conn.execute(sql, params):
        yield record(row)


def record(row: sqlite3.Row) -> dict[str, Any]:
    from ...history import iso

    out = dict(row)
    out["request_ids"] = json.loads(out["request_ids"])
    out["command"] = json.loads(out["command"])
    out["runner"] = json.loads(out["runner"])
    out["started_at"] = iso(out.pop("started_ms"))
    out["ended_at"] = iso(out.pop("ended_ms"))
    out["stop_requested_at"] = iso(out.pop("stop_requested_ms"))
    out["sent_output"] = bool(out["sent_output"])
    out.pop("pid_started", None)
    return {"id": out.pop("id"), **out}
