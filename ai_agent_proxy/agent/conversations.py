"""Conversations, the agent's unit of work (SPEC section 7): one context_id, or a request
without one as a conversation of its own (`request:<id>`). A conversation waits while any
of its messages does: written (its inbox file is there) and neither replied to nor done,
directly or covered by a reply to a later message (`requests.answered_ms`, migration 0009).

Taking one (`next --as NAME`, an MCP session, a runner's slot) is a lease in the DB
(`conversation_leases`): the other takers' `next` skip it until the lease ends or nothing
in it waits; a taker that dies loses it when it ends. Each function is one statement or
one short write transaction (db.transaction) on the shared WAL database, so processes
taking at once never get the same conversation.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from .. import db
from ..outbox.queries import (
    PROMPT_DATA,
    UNANSWERED,
    WAITING_BY_CHAT_INDEX,
    WAITING_INDEX,
)
from ..rows import State

LEASE_S = 600.0  # a taker holds a conversation this long, renewed by each of its calls
SHOWN = 20  # waiting messages of a conversation shown at most (the newest)
ANSWERED_COUNTED = 1000  # answered messages before the waiting ones are counted up to this
WAITING_COUNTED = 10_000  # a chat's waiting messages are counted up to this (900,000: 0.3 s)
_REQUEST = "request:"  # the conversation of a request without a context_id
MESSAGE_COLUMNS = (
    "id, seq, received_ms, context_id, channel, target, message_id, sender, attachments,"
    " modality, latest_user_prompt, prompt_segment, state"
)


@dataclass(frozen=True)
class Message:
    """A message of a conversation as the agent sees it (views.py renders it)."""

    request_id: str
    seq: int
    received_ms: int
    context_id: str | None
    message_id: str | None
    sender: str | None  # JSON text, as stored
    attachments: str | None  # JSON text, as stored
    modality: str | None
    words: str  # whole, also when long (stored as a segment)
    written: bool  # its inbox file is there (else it is on its way)


@dataclass(frozen=True)
class Conversation:
    """A waiting conversation: its newest waiting messages (at most SHOWN, in arrival
    order), how many older waiting ones were left out (counted up to WAITING_COUNTED:
    `more_left_out` says there are more), how many of its messages were answered before
    the first waiting one (up to ANSWERED_COUNTED), and who holds it."""

    key: str
    context_id: str | None
    messages: list[Message]
    left_out: int
    answered_before: int
    taken_by: str | None
    lease_s: float | None
    more_left_out: bool = False


def key_of(context_id: str | None, request_id: str) -> str:
    """The conversation a request belongs to."""
    return context_id or _REQUEST + request_id


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def oldest_waiting(conn: sqlite3.Connection, taker: str | None, at_ms: int) -> str | None:
    """The conversation whose oldest waiting message arrived first, skipping those another
    taker holds (one walk of the waiting rows' index, in arrival order)."""
    row = conn.execute(
        f"SELECT coalesce(context_id, '{_REQUEST}' || id) FROM requests {WAITING_INDEX}"
        f" WHERE {UNANSWERED}"
        f" AND coalesce(context_id, '{_REQUEST}' || id) NOT IN (SELECT conversation FROM"
        " conversation_leases WHERE until_ms > ? AND taker IS NOT ?) ORDER BY seq LIMIT 1",
        (at_ms, taker),
    ).fetchone()
    return None if row is None else str(row[0])


def take(conn: sqlite3.Connection, taker: str, lease_s: float = LEASE_S) -> str | None:
    """Take the oldest waiting conversation nobody else holds, for `lease_s`; its key, or
    None when none waits. One write transaction: concurrent takers get different ones."""
    with db.transaction(conn):
        at = now_ms()
        key = oldest_waiting(conn, taker, at)
        if key is not None:
            hold(conn, key, taker, lease_s, at)
    return key


def hold(conn: sqlite3.Connection, key: str, taker: str, lease_s: float, at_ms: int) -> None:
    """(In the caller's transaction) `taker` holds conversation `key` for `lease_s` from
    now: a lease of its own renewed, or a new one (another's only once it has ended)."""
    conn.execute(
        "INSERT INTO conversation_leases (conversation, taker, taken_ms, until_ms)"
        " VALUES (:key, :taker, :at, :until) ON CONFLICT (conversation) DO UPDATE SET"
        " taker = :taker, until_ms = :until,"
        " taken_ms = CASE WHEN taker = :taker THEN taken_ms ELSE :at END"
        " WHERE taker = :taker OR until_ms <= :at",
        {"key": key, "taker": taker, "at": at_ms, "until": at_ms + int(lease_s * 1000)},
    )


def renew(conn: sqlite3.Connection, key: str, taker: str, lease_s: float = LEASE_S) -> bool:
    """Renew `taker`'s hold on `key` (or take it, when nobody else holds it); False when
    another taker holds it."""
    with db.transaction(conn):
        at = now_ms()
        hold(conn, key, taker, lease_s, at)
        row = conn.execute(
            "SELECT taker FROM conversation_leases WHERE conversation = ?", (key,)
        ).fetchone()
    return row is not None and row[0] == taker


def release(conn: sqlite3.Connection, taker: str, key: str | None = None) -> int:
    """Give back `taker`'s hold on `key` (on every conversation, without one)."""
    with db.transaction(conn):
        sql = "DELETE FROM conversation_leases WHERE taker = ?"
        params: tuple[str, ...] = (taker,)
        if key is not None:
            sql, params = sql + " AND conversation = ?", (taker, key)
        return conn.execute(sql, params).rowcount


def holder(conn: sqlite3.Connection, key: str, at_ms: int) -> tuple[str | None, float | None]:
    """(who holds `key`, seconds left), or (None, None) when nobody does now."""
    row = conn.execute(
        "SELECT taker, until_ms FROM conversation_leases WHERE conversation = ? AND until_ms > ?",
        (key, at_ms),
    ).fetchone()
    return (None, None) if row is None else (str(row[0]), (row[1] - at_ms) / 1000)


def held(conn: sqlite3.Connection, at_ms: int) -> dict[str, int]:
    """Every conversation some taker holds now: when its lease ends (ms)."""
    return dict(
        conn.execute(
            "SELECT conversation, until_ms FROM conversation_leases WHERE until_ms > ?", (at_ms,)
        ).fetchall()
    )


def unanswered(conn: sqlite3.Connection, request_ids: list[str]) -> list[str]:
    """Those of `request_ids` neither replied to nor done, directly or covered."""
    marks = ", ".join("?" * len(request_ids))
    sql = f"SELECT id FROM requests WHERE id IN ({marks}) AND answered_ms IS NULL"
    return [r[0] for r in conn.execute(sql, request_ids)]


def conversation(conn: sqlite3.Connection, key: str, shown: int = SHOWN) -> Conversation | None:
    """Conversation `key` as the agent is shown it; None when nothing in it waits."""
    at = now_ms()
    if key.startswith(_REQUEST):
        context_id, where, params = None, f"WHERE id = ? AND {UNANSWERED}", [key[len(_REQUEST) :]]
    else:
        context_id = key
        where, params = f"{WAITING_BY_CHAT_INDEX} WHERE context_id = ? AND {UNANSWERED}", [key]
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM requests {where} ORDER BY seq DESC LIMIT ?",
        (*params, shown),
    ).fetchall()
    if not rows:
        return None
    ((waiting,),) = conn.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM requests {where} LIMIT ?)",
        (*params, WAITING_COUNTED + 1),
    )
    first = rows[-1]["seq"] if waiting <= shown else _oldest_waiting_seq(conn, where, params)
    answered = 0
    if context_id is not None:
        # Every written message before the oldest waiting one is answered: counted back
        # from it through the chat's index, up to ANSWERED_COUNTED (a long chat is long).
        ((answered,),) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM requests INDEXED BY requests_chat"
            f" WHERE context_id = ? AND seq < ? AND state = '{State.WRITTEN.value}'"
            " ORDER BY seq DESC LIMIT ?)",
            (context_id, first, ANSWERED_COUNTED),
        )
    taken_by, lease_s = holder(conn, key, at)
    messages = [message_of(conn, r) for r in reversed(rows)]
    more = waiting > WAITING_COUNTED
    left_out = min(waiting, WAITING_COUNTED) - len(messages)
    return Conversation(
        key, context_id, messages, left_out, answered, taken_by, lease_s, more_left_out=more
    )


def _oldest_waiting_seq(conn: sqlite3.Connection, where: str, params: list[str]) -> int:
    ((seq,),) = conn.execute(f"SELECT min(seq) FROM requests {where}", params)
    return int(seq)


def message_of(conn: sqlite3.Connection, row: sqlite3.Row) -> Message:
    words = row["latest_user_prompt"]
    if row["prompt_segment"] is not None:  # long words: kept whole as a segment
        ((data,),) = conn.execute(PROMPT_DATA, (row["prompt_segment"],))
        words = bytes(data).decode("utf-8")
    return Message(
        row["id"], row["seq"], row["received_ms"], row["context_id"], row["message_id"],
        row["sender"], row["attachments"], row["modality"], words,
        row["state"] == State.WRITTEN.value,
    )  # fmt: skip


def after(
    conn: sqlite3.Connection, context_id: str | None, seq: int, request_id: str
) -> list[Message]:
    """The messages of a conversation newer than `seq` that wait, or are on their way to
    the inbox (committed, not written yet: the person wrote again a moment ago). Two index
    walks: the chat's waiting rows, and the few not yet written."""
    if context_id is None:
        return []  # a conversation of one request has nothing newer
    written = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM requests {WAITING_BY_CHAT_INDEX}"
        f" WHERE context_id = ? AND {UNANSWERED} AND seq > ? ORDER BY seq",
        (context_id, seq),
    ).fetchall()
    coming = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM requests WHERE state IN (?, ?) AND seq > ?"
        " AND context_id = ? ORDER BY seq",
        (State.PENDING.value, State.AWAITING_BACKEND.value, seq, context_id),
    ).fetchall()
    rows = sorted([*written, *coming], key=lambda r: r["seq"])
    return [message_of(conn, r) for r in rows if r["id"] != request_id]


def seq_of(conn: sqlite3.Connection, request_id: str) -> tuple[int, str | None] | None:
    row = conn.execute(
        "SELECT seq, context_id FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    return None if row is None else (int(row[0]), row[1])


def waiting_count(conn: sqlite3.Connection) -> tuple[int, int]:
    """(waiting messages, waiting conversations), from the waiting rows' index."""
    ((messages, chats),) = conn.execute(
        f"SELECT count(*), count(DISTINCT coalesce(context_id, '{_REQUEST}' || id))"
        f" FROM requests {WAITING_INDEX} WHERE {UNANSWERED}"
    )
    return int(messages), int(chats)


@dataclass(frozen=True)
class Waiting:
    """A waiting conversation as a scheduler sees it: its oldest and newest waiting
    message (seq), and when the newest arrived."""

    key: str
    first_seq: int
    last_seq: int
    newest_ms: int


CHATS_LISTED = 10_000  # chats with a waiting message listed at most (by context_id)

# The chats with a waiting message, one index seek each (a loose index scan of
# requests_waiting_by_chat: the next context_id after the last one), so that the cost
# follows how many chats wait, not how many messages: 8 chats holding 1M waiting messages
# were listed in 0.05 ms, where GROUP BY over the same rows took 1 s.
_CHATS = (
    "WITH RECURSIVE chats(c, n) AS ("
    f" SELECT (SELECT min(context_id) FROM requests {WAITING_BY_CHAT_INDEX}"
    f"  WHERE {UNANSWERED} AND context_id IS NOT NULL), 1"
    " UNION ALL"
    f" SELECT (SELECT min(context_id) FROM requests {WAITING_BY_CHAT_INDEX}"
    f"  WHERE {UNANSWERED} AND context_id > chats.c), n + 1"
    " FROM chats WHERE chats.c IS NOT NULL AND n < :most)"
    " SELECT c,"
    f" (SELECT min(seq) FROM requests {WAITING_BY_CHAT_INDEX} WHERE {UNANSWERED}"
    "  AND context_id = c),"
    f" (SELECT seq FROM requests {WAITING_BY_CHAT_INDEX} WHERE {UNANSWERED}"
    "  AND context_id = c ORDER BY seq DESC LIMIT 1),"
    f" (SELECT received_ms FROM requests {WAITING_BY_CHAT_INDEX} WHERE {UNANSWERED}"
    "  AND context_id = c ORDER BY seq DESC LIMIT 1)"
    " FROM chats WHERE c IS NOT NULL"
)
_LONE = (
    f"SELECT '{_REQUEST}' || id, seq, seq, received_ms FROM requests {WAITING_BY_CHAT_INDEX}"
    f" WHERE {UNANSWERED} AND context_id IS NULL ORDER BY seq LIMIT :most"
)


def waiting_conversations(conn: sqlite3.Connection, most: int = CHATS_LISTED) -> list[Waiting]:
    """The waiting conversations, oldest waiting message first: up to `most` chats (by
    context_id) and the `most` oldest requests without one."""
    rows = [*conn.execute(_CHATS, {"most": most}), *conn.execute(_LONE, {"most": most})]
    return sorted((Waiting(*r) for r in rows), key=lambda w: w.first_seq)


POLL_S = 0.2  # how often a waiting `next` looks again (one indexed query)


def wait_for(
    conn: sqlite3.Connection, taker: str | None, lease_s: float, timeout_s: float | None
) -> Conversation | None:
    """The oldest waiting conversation (taken for `lease_s` when there is a `taker`, else
    only looked at, skipping those others hold), waiting up to `timeout_s` for one (None:
    for ever; 0: not at all)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        key = take(conn, taker, lease_s) if taker else oldest_waiting(conn, None, now_ms())
        chat = None if key is None else conversation(conn, key)
        if chat is not None or (deadline is not None and time.monotonic() >= deadline):
            return chat
        time.sleep(
            POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
        )
