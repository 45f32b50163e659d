"""Every statement the server runs on the outbox, as functions of a `sqlite3.Connection`.
One statement per fact; the state words come from rows.State. No I/O but the DB's.

Compaction and repeat detection are decided by the INSERT itself, inside the commit, so
several worker processes sharing the DB agree on them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..bodies import pack_ids
from ..rows import MESSAGE_FIELDS, PENDING_COLUMNS, PayloadKind, ReplyState, State

_SQL_VARS = 500  # parameters per IN (...) query, well under SQLite's limit
LARGE_ROW = 1 << 20  # bytes of body and words from which a row's size is kept (large_rows)
PROMPT_INLINE_MAX = 1 << 16  # characters of words kept in the row itself, at most
PROMPT_PREFIX = 4096  # what the row keeps of longer words (history --search looks there)
_DUP, _PENDING, _WAITING = State.DUPLICATE.value, State.PENDING.value, State.AWAITING_BACKEND.value

INSERT_REQUEST = f"""
INSERT INTO requests (
    id, received_ms, body_segments, body_hash, {", ".join(MESSAGE_FIELDS)}, prompt_segment,
    claimed_until_ms, claimed_by, payload_kind, state, duplicate_of, repeat_reason)
SELECT
    :id, :received_ms, :body_segments, :body_hash, {", ".join(":" + f for f in MESSAGE_FIELDS)},
    :prompt_segment, :claimed_until_ms, :claimed_by,
    CASE WHEN :context_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM requests WHERE context_id = :context_id AND state != '{_DUP}'
    ) THEN '{PayloadKind.COMPACT.value}' ELSE '{PayloadKind.FULL.value}' END,
    CASE WHEN repeat.of IS NULL THEN :state ELSE '{_DUP}' END,
    repeat.of,
    CASE WHEN repeat.of IS NULL THEN NULL WHEN repeat.turn THEN 'retry' ELSE 'resend' END
FROM (
    SELECT turn.of IS NOT NULL AS turn, coalesce(turn.of, resend.of) AS of FROM (
        SELECT coalesce(
            -- an OpenClaw retry of the same turn: same message, same words and media (a
            -- steered follow-up shares the message_id but brings new words: not a repeat)
            (SELECT id FROM requests
             WHERE context_id = :context_id AND message_id = :message_id
               AND latest_user_prompt = :latest_user_prompt
               AND prompt_segment IS :prompt_segment AND attachments IS :attachments
               AND state != '{_DUP}'
             ORDER BY seq LIMIT 1),
            -- OpenClaw's retry notice: the newest request of the same message. OpenClaw may
            -- re-assemble the turn's words for the retry (after a queued re-send it merges
            -- them into one message); without a message id (a local session), the same
            -- words, recently
            (SELECT id FROM requests
             WHERE :retry AND context_id IS :context_id AND message_id IS :message_id
               AND (:message_id IS NOT NULL OR (
                    latest_user_prompt = :latest_user_prompt
                    AND prompt_segment IS :prompt_segment AND attachments IS :attachments
                    AND received_ms >= :dedup_since_ms))
               AND state != '{_DUP}'
             ORDER BY seq DESC LIMIT 1)
        ) AS of
    ) AS turn, (
        -- a client re-sending the same body soon after
        SELECT (SELECT id FROM requests
         WHERE context_id = :context_id AND body_hash = :body_hash
           AND received_ms >= :dedup_since_ms AND state != '{_DUP}'
         ORDER BY seq LIMIT 1) AS of
    ) AS resend
) AS repeat
RETURNING seq, payload_kind, state
"""


def in_chunks(values: Sequence[Any]) -> Iterator[tuple[str, list[Any]]]:
    """(placeholders, values) for `... IN (placeholders)` queries of at most _SQL_VARS."""
    values = list(values)
    for i in range(0, len(values), _SQL_VARS):
        chunk = values[i : i + _SQL_VARS]
        yield ", ".join("?" * len(chunk)), chunk


def named_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A cursor's rows as dicts by column name: nobody reads `r[8]`."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def insert_request(
    conn: sqlite3.Connection,
    params: dict[str, Any],
    segments: Sequence[tuple[bytes, bytes]],
    known: Mapping[bytes, int],
    prompt: tuple[bytes, bytes] | None = None,
) -> tuple[tuple[int, str, str], dict[bytes, int]]:
    """The row of a request, with its body's (hash, data) segments, storing those not known
    to be stored (and `prompt`, the person's words as a segment when they are too long to
    keep in the row: `stored_prompt`): ((seq, payload_kind, state), the segment ids it
    looked up, which the caller may remember once the commit is done)."""
    pieces = [*segments, prompt] if prompt else list(segments)
    ids = {h: known.get(h) for h, _ in pieces}  # each looked up once: `known` may change
    unseen = {h: data for h, data in pieces if ids[h] is None}
    learned: dict[bytes, int] = {}
    if unseen:
        conn.executemany(
            "INSERT OR IGNORE INTO segments (hash, data) VALUES (?, ?)", unseen.items()
        )
        for marks, chunk in in_chunks(list(unseen)):
            learned.update(
                conn.execute(f"SELECT hash, id FROM segments WHERE hash IN ({marks})", chunk)
            )
        ids.update(learned)
    body_segments = pack_ids([ids[h] for h, _ in segments])  # type: ignore[misc]
    prompt_segment = ids[prompt[0]] if prompt else None
    (row,) = named_rows(
        conn.execute(
            INSERT_REQUEST,
            {**params, "body_segments": body_segments, "prompt_segment": prompt_segment},
        )
    )
    size = sum(len(data) for _, data in pieces) + len(params["latest_user_prompt"])
    if size >= LARGE_ROW:
        conn.execute("INSERT INTO large_rows (seq, bytes) VALUES (?, ?)", (row["seq"], size))
    return (row["seq"], row["payload_kind"], row["state"]), learned


def stored_prompt(words: str) -> tuple[str, bytes | None]:
    """(what the row keeps of the person's words, the words as a segment's data or None):
    words of PROMPT_INLINE_MAX characters or more stay out of the row (migration 0008)."""
    if len(words) < PROMPT_INLINE_MAX:
        return words, None
    return words[:PROMPT_PREFIX], words.encode("utf-8")


def claim_pending(
    conn: sqlite3.Connection, token: str, now_ms: int, lease_ms: int, limit: int, max_bytes: int
) -> tuple[list[dict[str, Any]], bool]:
    """Lease the oldest pending rows to flusher `token`: rows nobody holds, rows whose lease
    ran out, and rows it already holds; at most `limit` of them and, past the first, no
    more than `max_bytes` (large rows by their recorded size, the others as LARGE_ROW).
    Returns them in arrival order, and whether more were pending beyond them."""
    candidates = conn.execute(
        f"""SELECT seq, coalesce(large_rows.bytes, 0) FROM requests
        LEFT JOIN large_rows USING (seq)
        WHERE state = '{_PENDING}' AND (claimed_until_ms IS NULL
            OR claimed_until_ms < ? OR claimed_by = ?)
        ORDER BY seq LIMIT ?""",
        (now_ms, token, limit),
    ).fetchall()
    chosen, total = [], 0
    for seq, size in candidates:
        if chosen and total + size > max_bytes:
            break
        chosen.append(seq)
        total += size
    if not chosen:
        return [], False
    rows = named_rows(
        conn.execute(
            f"UPDATE requests SET claimed_until_ms = ?, claimed_by = ?"
            f" WHERE seq IN ({', '.join('?' * len(chosen))}) RETURNING {PENDING_COLUMNS}",
            (now_ms + lease_ms, token, *chosen),
        )
    )
    rows.sort(key=lambda r: r["seq"])
    return rows, len(chosen) < len(candidates) or len(candidates) == limit


def mark_written(conn: sqlite3.Connection, seqs: Sequence[int], now_ms: int) -> None:
    for marks, chunk in in_chunks(seqs):
        conn.execute(
            f"UPDATE requests SET state = '{State.WRITTEN.value}', written_ms = ?,"
            " claimed_until_ms = NULL, claimed_by = NULL, attempts = attempts + 1"
            f" WHERE seq IN ({marks})",
            (now_ms, *chunk),
        )


def release(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    """Give back the lease on rows (another claim may take them)."""
    conn.executemany(
        "UPDATE requests SET claimed_until_ms = NULL, claimed_by = NULL WHERE seq = ?",
        [(s,) for s in seqs],
    )


def record_inbox_failure(conn: sqlite3.Connection, seq: int, error: str, now_ms: int) -> None:
    """The inbox failed at row `seq` (it stays pending, to be retried in order)."""
    conn.execute(
        "UPDATE requests SET attempts = attempts + 1, last_error = ? WHERE seq = ?", (error, seq)
    )
    _log_failure(conn, seq, error, now_ms)
    release(conn, [seq])


def record_row_failure(
    conn: sqlite3.Connection, seq: int, error: str, now_ms: int, give_up_after: int
) -> str | None:
    """Row `seq` could not be made into a file (not the inbox's fault). After
    `give_up_after` such failures it is undeliverable: returns its id then."""
    conn.execute(
        "UPDATE requests SET row_failures = row_failures + 1, last_error = ? WHERE seq = ?",
        (error, seq),
    )
    _log_failure(conn, seq, error, now_ms)
    release(conn, [seq])
    row = conn.execute(
        f"UPDATE requests SET state = '{State.UNDELIVERABLE.value}'"
        f" WHERE seq = ? AND state = '{_PENDING}' AND row_failures >= ? RETURNING id",
        (seq, give_up_after),
    ).fetchone()
    return None if row is None else str(row[0])


def _log_failure(conn: sqlite3.Connection, seq: int, error: str, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO inbox_failures (request_seq, at_ms, error) VALUES (?, ?, ?)",
        (seq, now_ms, error),
    )


def finish_backend(conn: sqlite3.Connection, request_id: str, outcome: dict[str, Any]) -> None:
    """Record the backend's outcome; a row waiting for it becomes pending."""
    conn.execute(
        f"""UPDATE requests SET backend_instruction = :instruction, backend_reply = :reply,
            backend_status = :status, backend_error = :error,
            backend_latency_ms = :latency_ms, backend_usage = :usage,
            state = CASE state WHEN '{_WAITING}' THEN '{_PENDING}' ELSE state END
        WHERE id = :id""",
        {**outcome, "id": request_id},
    )


def deliver_without_reply(conn: sqlite3.Connection, received_before_ms: int | None) -> int:
    """Rows caught waiting for the backend (their worker died, or the outcome could not be
    recorded) are delivered without a reply; all of them when `received_before_ms` is None."""
    where = "" if received_before_ms is None else " AND received_ms < :before"
    return conn.execute(
        f"UPDATE requests SET state = '{_PENDING}', backend_error = 'interrupted'"
        f" WHERE state = '{_WAITING}'{where}",
        {"before": received_before_ms},
    ).rowcount


def prune_delivered(conn: sqlite3.Connection, received_before_ms: int, limit: int) -> int:
    """Delete up to `limit` delivered (written or duplicate) rows received before the
    cutoff. Rows not yet in the inbox are never pruned."""
    return conn.execute(
        "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE received_ms < ?"
        f" AND state IN ('{State.WRITTEN.value}', '{_DUP}') LIMIT ?)",
        (received_before_ms, limit),
    ).rowcount


SEGMENT_DATA = "SELECT id, data FROM segments WHERE id IN (%s)"
PROMPT_DATA = "SELECT data FROM segments WHERE id = ?"
BACKLOG = (
    f"SELECT count(*), min(received_ms) FROM requests WHERE state IN ('{_PENDING}', '{_WAITING}')"
)
COUNT_IN_STATE = "SELECT count(*) FROM requests WHERE state = ?"
ANSWERED = (ReplyState.SENT.value, ReplyState.QUEUED.value, ReplyState.DONE.value)
# Requests the agent has a file for and has neither replied to nor done, directly or
# covered (migration 0009). Spelled as the waiting rows' partial indexes' condition.
UNANSWERED = f"requests.state = '{State.WRITTEN.value}' AND requests.answered_ms IS NULL"
# The waiting rows' indexes, named where a query must use one: without statistics SQLite
# prefers (state, seq) and walks every written row (700 ms at 1M rows for a count).
WAITING_INDEX = "INDEXED BY requests_waiting"
WAITING_BY_CHAT_INDEX = "INDEXED BY requests_waiting_by_chat"
COUNT_UNANSWERED = (
    "SELECT count(*), count(DISTINCT coalesce(context_id, 'request:' || id)) FROM requests"
    f" {WAITING_INDEX} WHERE {UNANSWERED}"
)
COUNTS_BY_STATE = "SELECT state, count(*) FROM requests GROUP BY state"

# How long the newest deliveries took (a reply's claim to the transport's answer), by
# transport; the rows a reply covered are not deliveries of their own.
DELIVERY_TIMES = (
    "SELECT transport, finished_ms - claimed_ms FROM replies WHERE transport IS NOT NULL"
    " AND finished_ms IS NOT NULL AND state IN ('sent', 'queued') ORDER BY finished_ms DESC"
    " LIMIT ?"
)

# The agent runner's (agent/runner/runs.py): a conversation it set aside whose messages
# still wait (one index seek), and its runs of the last day by outcome.
STILL_WAITS = (
    f"EXISTS (SELECT 1 FROM requests {WAITING_BY_CHAT_INDEX} WHERE {UNANSWERED} AND"
    " (requests.context_id = agent_conversations.conversation OR (requests.context_id IS NULL"
    " AND 'request:' || requests.id = agent_conversations.conversation)))"
)
COUNT_SET_ASIDE = (
    f"SELECT count(*) FROM agent_conversations WHERE set_aside_seq IS NOT NULL AND {STILL_WAITS}"
)
RUNS_SINCE = (
    "SELECT coalesce(outcome, 'running'), count(*) FROM agent_runs INDEXED BY agent_runs_started"
    " WHERE started_ms >= ? GROUP BY 1"
)
