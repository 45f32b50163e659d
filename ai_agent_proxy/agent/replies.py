"""The agent's replies, each request answered once: a reply is claimed in the DB before it
is sent (with a lease, so a process killed mid-send is taken over later), sent, and its
outcome recorded; `done` marks requests that need no answer.

A reply to a message answers the earlier waiting messages of its conversation too: they
are claimed with it and recorded as covered by it (`replies.covered_by`). A reply to a
message while newer ones of the conversation wait (or are on their way to the inbox) sends
nothing (NewerMessagesWait, exit 4): the person changed the question, and the agent should
read them first. Runs in the CLI, the MCP server and the runner, beside a running server:
every change is one short write transaction (db.transaction) on the shared WAL database.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import db
from ..config import Settings
from ..errors import HistoryError, NewerMessagesWait, ReplyFailed, ReplyRefused
from ..history import History
from ..outbox.queries import ANSWERED, UNANSWERED, WAITING_BY_CHAT_INDEX
from ..printable import printable
from ..rows import ReplyState
from . import conversations
from .conversations import LEASE_S, now_ms
from .delivery import CLI_TIMEOUT_S, Address, Delivered, Deliverer, Verdict

# A claim ('sending') older than this is abandoned (its process was killed mid-send): the
# next `reply` or `done` takes it over. Longer than any send may take.
LEASE_MS = int((CLI_TIMEOUT_S + 60) * 1000)
OUTPUT_KEPT = 4000  # characters of the CLI's output kept with the reply
_SENDING = ReplyState.SENDING.value


@dataclass(frozen=True)
class Target:
    """Where a reply to a request goes, and where the request sits in its conversation."""

    request_id: str
    seq: int
    context_id: str | None
    channel: str
    target: str
    message_id: str | None


@dataclass
class Outcome:
    """What a reply or `done` did: the request, the earlier ones it covered (oldest
    first), where it went, and a note for the person at the CLI (why it was not threaded)."""

    request_id: str
    to: Target | None
    covered: list[str] = field(default_factory=list)
    threaded: bool = False
    note: str | None = None
    delivered: Delivered | None = None
    took_ms: int = 0  # from the claim to the delivery's answer


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


def target_of(conn: sqlite3.Connection, request_id: str, need_chat: bool = True) -> Target:
    row = conn.execute(
        "SELECT seq, context_id, channel, target, message_id FROM requests WHERE id = ?",
        (request_id,),
    ).fetchone()
    if row is None or (need_chat and (not row["channel"] or not row["target"])):
        raise HistoryError(f"request {request_id} has no channel and target: nobody to reply to")
    return Target(
        request_id, row["seq"], row["context_id"], row["channel"] or "", row["target"] or "",
        row["message_id"],
    )  # fmt: skip


def reply(
    conn: sqlite3.Connection,
    settings: Settings,
    request_id: str,
    text: str,
    *,
    reply_to: bool = False,
    again: bool = False,
    anyway: bool = False,
    taker: str | None = None,
    deliverer: Deliverer | None = None,
) -> Outcome:
    """The whole `reply`: claim the request and the earlier waiting ones of its
    conversation, deliver it (delivery.py: the gateway, or the `openclaw` CLI; through
    `deliverer`, a long-lived caller's kept connection, or one made for this reply),
    record the outcome. NewerMessagesWait (newer ones wait: nothing sent, unless
    `anyway`), ReplyRefused (answered already, being sent) or ReplyFailed (the delivery
    failed: recorded, a later reply may try again)."""
    to = target_of(conn, request_id)
    started = now_ms()
    covered, gateway_only = claim(
        conn, to, text, again=again, check_newer=not (anyway or again), taker=taker
    )
    outcome = Outcome(request_id, to, covered)
    if reply_to and to.message_id:
        if shares_message_id(conn, to):
            outcome.note = (
                f"not threaded: message id {to.message_id} is also an earlier message's of"
                " this chat (OpenClaw steered it into a running turn), so a threaded reply"
                " would sit under words it does not answer"
            )
        else:
            outcome.threaded = True
    address = Address(to.channel, to.target, to.message_id if outcome.threaded else None)
    own = deliverer is None
    deliverer = Deliverer(settings) if deliverer is None else deliverer
    try:
        delivered = deliverer.deliver(address, text, request_id, gateway_only=gateway_only)
    finally:
        if own:
            deliverer.close()
    finish(conn, request_id, delivered)
    outcome.delivered, outcome.took_ms = delivered, now_ms() - started
    if not delivered.ok:
        raise ReplyFailed(f"reply to {request_id} failed: {failure(delivered)} (try again later)")
    return outcome


# a line of the CLI's output that says what went wrong (its last line may be a detail)
_TELLING = re.compile(r"(?i)error|fail|not reachable|unreachable|denied|invalid|refused")


def how(outcome: Outcome) -> str:
    """How a reply went, for the person at the CLI: the transport and its time; why the
    gateway was not used, when it was not; queued, when the gateway holds it."""
    delivered = outcome.delivered
    if delivered is None:
        return "not delivered"
    took = f"{outcome.took_ms / 1000:.1f} s" if outcome.took_ms >= 1000 else f"{outcome.took_ms} ms"
    if delivered.transport == "cli":
        why = f"; the gateway: {delivered.fell_back}" if delivered.fell_back else ""
        return f"with the openclaw CLI, {took}{why}"
    if delivered.verdict is Verdict.QUEUED:
        return f"queued by the gateway for later delivery, not to be sent again; {took}"
    return f"through the gateway, {took}"


def failure(delivered: Delivered) -> str:
    """A failed delivery in one line: the last line of the CLI's output, or the gateway's
    verdict; why the gateway was not used, when the CLI was."""
    detail = delivered.detail.strip()
    if delivered.transport == "cli":
        lines = [line.strip() for line in detail.splitlines() if line.strip()]
        telling = [line for line in lines if _TELLING.search(line)]
        detail = (telling or lines[-1:] or [f"exit status {delivered.exit_status}"])[0]
        if delivered.fell_back:
            detail += f" (openclaw CLI; the gateway: {delivered.fell_back})"
    return printable(detail, one_line=True)


def done(
    conn: sqlite3.Connection,
    request_id: str,
    *,
    only: bool = False,
    again: bool = False,
    taker: str | None = None,
) -> Outcome:
    """Mark a request handled without a reply, and (unless `only`) the earlier waiting
    ones of its conversation, as covered by it."""
    to = target_of(conn, request_id, need_chat=False)
    covered, _ = claim(conn, to, None, again=again, check_newer=False, taker=taker, cover=not only)
    return Outcome(request_id, to, covered)


def claim(
    conn: sqlite3.Connection,
    to: Target,
    message: str | None,
    *,
    again: bool,
    check_newer: bool,
    taker: str | None,
    cover: bool = True,
) -> tuple[list[str], bool]:
    """In one transaction: refuse if newer messages of the conversation wait
    (`check_newer`); claim the request for a reply (`message`) or for `done` (None); claim
    the earlier waiting ones of its conversation as covered by it (`cover`); renew
    `taker`'s hold on the conversation. Returns the ids covered, oldest first.

    ReplyRefused if the request is answered already or a reply to it is being sent (a
    claim younger than LEASE_MS), unless `again`. An older claim was abandoned (its
    process was killed mid-send): it is taken over, and noted. Also says whether an
    earlier attempt may have reached the gateway (then only the gateway may send it)."""
    with db.transaction(conn):
        if check_newer:
            newer = conversations.after(conn, to.context_id, to.seq, to.request_id)
            if newer:
                raise NewerMessagesWait(
                    f"{len(newer)} newer message(s) of this conversation wait: nothing sent",
                    list(newer),
                )
        now = now_ms()
        gateway_only = _claim_one(conn, to.request_id, message, again, None, now)
        covered = _claim_earlier(conn, to, message is None, now) if cover else []
        if message is None:  # done: answered at once
            _answered(conn, [to.request_id, *covered], now)
        if taker is not None:
            conversations.hold(conn, conversations.key_of(to.context_id, to.request_id),
                               taker, LEASE_S, now)  # fmt: skip
    return covered, gateway_only


def _claim_one(
    conn: sqlite3.Connection,
    request_id: str,
    message: str | None,
    again: bool,
    covered_by: str | None,
    now: int,
) -> bool:
    """Claim one request; whether an earlier attempt may have reached the gateway."""
    row = conn.execute(
        "SELECT state, claimed_ms, covered_by, maybe_sent FROM replies WHERE request_id = ?",
        (request_id,),
    ).fetchone()
    abandoned = row is not None and row["state"] == _SENDING and now - row["claimed_ms"] >= LEASE_MS
    if row is not None and not again and not abandoned:
        by = f" (by the reply to {row['covered_by']})" if row["covered_by"] else ""
        if row["state"] in ANSWERED:
            raise ReplyRefused(f"request {request_id} is answered already ({row['state']}{by})")
        if row["state"] == _SENDING:
            raise ReplyRefused(f"a reply to request {request_id} is being sent{by}")
    if abandoned:  # (its send may have reached the gateway: only the gateway may try)
        conn.execute(
            "UPDATE replies SET abandoned_ms = ?, maybe_sent = 1 WHERE request_id = ?",
            (now, request_id),
        )
    state = ReplyState.SENDING if message is not None else ReplyState.DONE
    conn.execute(
        "INSERT INTO replies (request_id, state, message, claimed_ms, finished_ms, attempts,"
        " covered_by) VALUES (:id, :state, :message, :now, :finished, 1, :by)"
        " ON CONFLICT (request_id) DO UPDATE SET state = :state, message = :message,"
        " claimed_ms = :now, finished_ms = :finished, exit_status = NULL, output = NULL,"
        " attempts = attempts + 1, covered_by = :by",
        {"id": request_id, "state": state.value, "message": message, "now": now,
         "finished": None if message is not None else now, "by": covered_by},
    )  # fmt: skip
    return bool(abandoned or (row is not None and row["maybe_sent"]))


def _claim_earlier(conn: sqlite3.Connection, to: Target, done: bool, now: int) -> list[str]:
    """Claim the earlier waiting messages of the conversation as covered by `to`'s reply
    (or done), skipping those another reply being sent has claimed."""
    if to.context_id is None:
        return []
    ids = [
        r[0]
        for r in conn.execute(
            f"SELECT id FROM requests {WAITING_BY_CHAT_INDEX} WHERE context_id = ? AND {UNANSWERED}"
            " AND seq < ?"
            " AND NOT EXISTS (SELECT 1 FROM replies WHERE request_id = requests.id"
            " AND state = ? AND claimed_ms > ?) ORDER BY seq",
            (to.context_id, to.seq, _SENDING, now - LEASE_MS),
        )
    ]
    state = (ReplyState.DONE if done else ReplyState.SENDING).value
    conn.executemany(
        "INSERT INTO replies (request_id, state, claimed_ms, finished_ms, attempts, covered_by)"
        " VALUES (:id, :state, :now, :finished, 0, :by) ON CONFLICT (request_id) DO UPDATE"
        " SET state = :state, message = NULL, claimed_ms = :now, finished_ms = :finished,"
        " exit_status = NULL, output = NULL, covered_by = :by",
        [{"id": i, "state": state, "now": now, "finished": now if done else None,
          "by": to.request_id} for i in ids],
    )  # fmt: skip
    return ids


def _answered(conn: sqlite3.Connection, ids: list[str], now: int) -> None:
    conn.executemany("UPDATE requests SET answered_ms = ? WHERE id = ?", [(now, i) for i in ids])


_STATE_OF = {Verdict.SENT: ReplyState.SENT, Verdict.QUEUED: ReplyState.QUEUED,
             Verdict.FAILED: ReplyState.FAILED}  # fmt: skip


def finish(conn: sqlite3.Connection, request_id: str, delivered: Delivered) -> None:
    """Record a delivery's outcome: sent (or queued by the gateway), the request and those
    it covers are answered; failed, the covered ones wait again (a later reply may cover
    them)."""
    now = now_ms()
    state = _STATE_OF[delivered.verdict].value
    output = delivered.detail
    if delivered.fell_back:
        output = (
            f"{output}\n(through the openclaw CLI; the gateway: {delivered.fell_back})".lstrip()
        )
    with db.transaction(conn):
        conn.execute(
            "UPDATE replies SET state = ?, finished_ms = ?, exit_status = ?, output = ?,"
            " transport = ?, delivered_id = ?, maybe_sent = max(maybe_sent, ?)"
            " WHERE request_id = ?",
            (state, now, delivered.exit_status, output[-OUTPUT_KEPT:], delivered.transport,
             delivered.message_id, int(delivered.may_have_sent), request_id),
        )  # fmt: skip
        if not delivered.ok:
            conn.execute(
                "DELETE FROM replies WHERE covered_by = ? AND state = ?", (request_id, _SENDING)
            )
            return
        covered = [
            r[0]
            for r in conn.execute(
                "UPDATE replies SET state = ?, finished_ms = ? WHERE covered_by = ? AND state = ?"
                " RETURNING request_id",
                (state, now, request_id, _SENDING),
            )
        ]
        _answered(conn, [request_id, *covered], now)


def shares_message_id(conn: sqlite3.Connection, to: Target) -> bool:
    """Whether an earlier distinct message of the chat has `to`'s message id: OpenClaw
    sends a steered message under the id of the first one of its turn."""
    row = conn.execute(
        "SELECT 1 FROM requests WHERE context_id = ? AND message_id = ? AND seq < ?"
        " AND state != 'duplicate' LIMIT 1",
        (to.context_id, to.message_id, to.seq),
    ).fetchone()
    return row is not None
