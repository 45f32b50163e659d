"""Read-only queries over the outbox for `history` and `replay`.

Opens the DB read-only (safe while the server runs: WAL readers never block the writer)
and streams rows from a cursor instead of loading a large history into memory.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import db
from .bodies import join_segments, loads, unpack_ids
from .errors import HistoryError, SchemaError
from .ids import inbox_file_name
from .migrations import check_version
from .outbox.queries import (
    ANSWERED,
    BACKLOG,
    DELIVERY_TIMES,
    PROMPT_DATA,
    RUNS_SINCE,
    SEGMENT_DATA,
    UNANSWERED,
    WAITING_INDEX,
    in_chunks,
)
from .printable import printable
from .rows import (
    JSON_FIELDS,
    MESSAGE_FIELDS,
    PENDING_COLUMNS,
    PendingRow,
    ReplyState,
    State,
    body_needed,
)

FAILED = "failed"  # not a state of its own: pending, and its last write failed
STATES = (
    State.PENDING.shown, State.WRITTEN.shown, FAILED, State.DUPLICATE.shown,
    State.AWAITING_BACKEND.shown, State.UNDELIVERABLE.shown,
)  # fmt: skip
_FAILED_SQL = f"state = '{State.PENDING.value}' AND last_error IS NOT NULL"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.I)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

RECORD_COLUMNS = (
    f"id, received_ms, {', '.join(MESSAGE_FIELDS)}, prompt_segment, state, payload_kind,"
    " duplicate_of,"
    " backend_status, backend_error, attempts, last_error, written_ms,"
    " (SELECT state FROM replies WHERE request_id = requests.id) AS reply_state,"
    " (SELECT finished_ms FROM replies WHERE request_id = requests.id"
    f" AND state IN {ANSWERED}) AS replied_ms"
)
SEGMENT_CACHE_SIZE = 20_000
MAX_LIMIT = 1_000_000_000
UNANSWERED_AFTER_S = 300  # `stats`: unanswered for longer than this
SEARCH_MAX_CHARS = 10_000  # longer is no search (a 50 MB one failed inside SQLite)
LATENCY_ROWS = 100_000  # `stats`: request->file percentiles over the newest this many


def parse_when(text: str, now: float | None = None) -> int:
    """'90s', '2h', '3d' (that long ago) or an ISO 8601 time -> unix ms (UTC if naive)."""
    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m:
        back_s = float(m.group(1)) * _UNIT_S[m.group(2).lower()]
        if back_s > now:  # before 1970: no request is older, and SQLite has no such time
            raise HistoryError(f"time {text!r} is too far back: no request is that old")
        return int((now - back_s) * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(
            f"cannot read time {text!r}: use a duration like 90s, 15m, 2h, 3d or an ISO time "
            "like 2026-11-24T21:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Selection:
    """Which rows a history or replay command is about."""

    context_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    state: str | None = None
    search: str | None = None
    ids: list[str] = field(default_factory=list)
    limit: int | None = None
    unanswered: bool = False  # written, and neither replied to nor done

    @classmethod
    def of_filters(
        cls,
        context_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        state: str | None = None,
        search: str | None = None,
        limit: int | None = None,
        ids: list[str] | None = None,
    ) -> Selection:
        """From the filters as typed (`--since 2h`); HistoryError saying which one is wrong."""
        if limit is not None and not 0 <= limit <= MAX_LIMIT:
            raise HistoryError(f"--limit must be 0 (no limit) to {MAX_LIMIT:,}, got {limit}")
        if state and state not in STATES:
            raise HistoryError(f"unknown --state {state!r}: use one of {', '.join(STATES)}")
        if search and len(search) > SEARCH_MAX_CHARS:
            raise HistoryError(
                f"--search is {len(search):,} characters; at most {SEARCH_MAX_CHARS:,}"
            )
        return cls(
            context_id=context_id,
            since_ms=parse_when(since) if since else None,
            until_ms=parse_when(until) if until else None,
            state=state,
            search=search,
            ids=list(ids or []),
            limit=limit or None,
        )

    def is_empty(self) -> bool:
        return not (
            self.context_id or self.since_ms or self.until_ms or self.state or self.search
            or self.ids or self.limit or self.unanswered
        )  # fmt: skip

    def where(self) -> tuple[str, list[Any]]:
        """SQL WHERE clause and parameters (pure, so it is easy to test)."""
        clauses, params = [], []
        if self.context_id:
            clauses.append("context_id = ?")
            params.append(self.context_id)
        if self.since_ms is not None:
            clauses.append("received_ms >= ?")
            params.append(self.since_ms)
        if self.until_ms is not None:
            clauses.append("received_ms <= ?")
            params.append(self.until_ms)
        if self.state:
            if self.state not in STATES:
                raise HistoryError(f"unknown state {self.state!r}: use one of {', '.join(STATES)}")
            if self.state == FAILED:
                clauses.append(_FAILED_SQL)
            else:
                clauses.append("state = ?")
                params.append(State.from_shown(self.state).value)
        if self.search:
            clauses.append("latest_user_prompt LIKE ? ESCAPE '\\'")
            escaped = re.sub(r"([%_\\])", r"\\\1", self.search)
            params.append(f"%{escaped}%")
        if self.ids:
            clauses.append(f"id IN ({', '.join('?' * len(self.ids))})")
            params.extend(self.ids)
        if self.unanswered:
            clauses.append(UNANSWERED)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def record(row: sqlite3.Row, words: str | None = None) -> dict[str, Any]:
    """A history record as shown to users (json, csv, table); `words`: the person's whole
    words, when the row keeps only their start (prompt_segment)."""
    out = dict(row)
    out.pop("prompt_segment", None)
    if words is not None:
        out["latest_user_prompt"] = words
    received_ms = out.pop("received_ms")
    out["inbox_file"] = written_file(out["id"], received_ms, out["state"])
    out["written_at"] = iso(out.pop("written_ms"))
    out["replied_at"] = iso(out.pop("replied_ms"))
    out["state"] = display_state(out["state"], out.get("last_error"))
    for key in JSON_FIELDS:
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return {"id": out.pop("id"), "received_at": iso(received_ms), **out}


def body_for_json(raw: bytes) -> Any:
    """A stored body as JSON; one no parser here can read comes back as its text."""
    try:
        return loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")


def written_file(request_id: str, received_ms: int, state: str) -> str | None:
    """The inbox file of a row that was written; a duplicate never gets one, and a row not
    yet written has none yet."""
    return inbox_file_name(request_id, received_ms) if state == State.WRITTEN.value else None


def display_state(state: str, last_error: str | None) -> str:
    if state == State.PENDING.value and last_error:
        return "failed"
    return State(state).shown


class History:
    """A read-only view of one outbox DB."""

    def __init__(self, db_path: Path) -> None:
        if not db_path.is_file():
            raise HistoryError(f"database {db_path} does not exist (set --db or DB)")
        try:
            self.conn = db.connect(db_path, readonly=True, rows_by_name=True)
            if check_version(self.conn, db_path) == 0:
                raise HistoryError(f"{db_path} is not an ai-agent-proxy database")
        except SchemaError as exc:
            raise HistoryError(str(exc)) from None
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open database {db_path}: {exc}") from None
        self.path = db_path
        self._segments: dict[int, bytes] = {}

    def close(self) -> None:
        self.conn.close()

    def _stream(self, sql: str, params: list[Any]) -> Iterator[sqlite3.Row]:
        try:
            cur = self.conn.execute(sql, params)
            while batch := cur.fetchmany(500):
                yield from batch
        except sqlite3.Error as exc:
            raise HistoryError(f"query failed on {self.path}: {exc}") from None

    def count(self, sel: Selection) -> int:
        where, params = sel.where()
        ((n,),) = self._query(f"SELECT count(*) FROM requests{where}", params)
        return min(n, sel.limit) if sel.limit else n

    def records(self, sel: Selection) -> Iterator[dict[str, Any]]:
        """Matching rows, newest first."""
        where, params = sel.where()
        sql = f"SELECT {RECORD_COLUMNS} FROM requests{where} ORDER BY seq DESC"
        if sel.limit:
            sql += f" LIMIT {int(sel.limit)}"
        return (record(r, self.words(r["prompt_segment"])) for r in self._stream(sql, params))

    def pending_rows(self, sel: Selection, full: bool = False) -> Iterator[tuple[PendingRow, str]]:
        """Rows as the flusher sees them (with their state), oldest first, for replay; the
        body is joined only where the payload will carry it."""
        where, params = sel.where()
        inner = f"SELECT {PENDING_COLUMNS}, state FROM requests{where}"
        if sel.limit:  # the newest N, written oldest first
            sql = f"SELECT * FROM ({inner} ORDER BY seq DESC LIMIT {int(sel.limit)}) ORDER BY seq"
        else:
            sql = inner + " ORDER BY seq"
        for r in self._stream(sql, params):
            body = self.body(r["body_segments"]) if body_needed(r["payload_kind"], full) else b""
            yield PendingRow.from_row(r, body, self.words(r["prompt_segment"])), r["state"]

    def body(self, segments_blob: bytes) -> bytes:
        """Join a body's segments; they repeat across rows, so recent ones are cached."""
        ids = unpack_ids(segments_blob)
        missing = [i for i in dict.fromkeys(ids) if i not in self._segments]
        for marks, chunk in in_chunks(missing):
            self._segments.update(self._query(SEGMENT_DATA % marks, chunk))
        body = join_segments(ids, self._segments)
        if len(self._segments) > SEGMENT_CACHE_SIZE:
            self._segments.clear()
        return body

    def words(self, prompt_segment: int | None) -> str | None:
        """The person's whole words kept as a segment (long words), or None for a row that
        keeps them itself."""
        if prompt_segment is None:
            return None
        ((data,),) = self._query(PROMPT_DATA, (prompt_segment,))
        return bytes(data).decode("utf-8")

    def resolve_id(self, text: str) -> str:
        """A full request id, an inbox file name, or any unambiguous part of an id of 8+ hex
        digits (its start, or the random tail the history table shows)."""
        key = text.strip().removesuffix(".json")
        key = key.rsplit("-", 1)[-1].lower()
        if not re.fullmatch(r"[0-9a-f]{8,32}", key):
            raise HistoryError(f"{text!r} is not a request id (32 hex digits, or 8+ of them)")
        rows = self._query(
            "SELECT id FROM requests WHERE id >= ? AND id < ? LIMIT 2", (key, key + "g")
        )
        if not rows:  # ids hold only hex digits: LIKE has nothing to escape here
            rows = self._query("SELECT id FROM requests WHERE id LIKE ? LIMIT 2", (f"%{key}%",))
        if not rows:
            raise HistoryError(f"no request with id {text!r} in {self.path}")
        if len(rows) > 1:
            raise HistoryError(f"{text!r} matches several requests; give more digits")
        return str(rows[0]["id"])

    def _query(self, sql: str, params: Any = ()) -> list[Any]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise HistoryError(f"query failed on {self.path}: {exc}") from None

    def document(self, request_id: str, inbox: Path, body_as_json: bool) -> dict[str, Any]:
        """`history show`: `show`, with the inbox file's path, and the body last (by far
        the longest part) as JSON, or as its size."""
        doc = self.show(request_id)
        if doc["inbox_file"]:
            doc["inbox_path"] = str(inbox / doc["inbox_file"])
        raw = doc.pop("body")
        doc["body"] = (
            body_for_json(raw) if body_as_json else f"{len(raw):,} bytes (--format json shows it)"
        )
        return doc

    def show(self, request_id: str) -> dict[str, Any]:
        rid = self.resolve_id(request_id)
        (row,) = self._query("SELECT * FROM requests WHERE id = ?", (rid,))
        out = dict(row)
        failures = self._query(
            "SELECT at_ms, error FROM inbox_failures WHERE request_seq = ? ORDER BY at_ms",
            (out["seq"],),
        )
        out["inbox_file"] = written_file(rid, out["received_ms"], out["state"])
        if (words := self.words(out.pop("prompt_segment"))) is not None:
            out["latest_user_prompt"] = words
        out["state"] = display_state(out["state"], out["last_error"])
        out["received_at"] = iso(out.pop("received_ms"))
        out["written_at"] = iso(out.pop("written_ms"))
        out["failed_attempts"] = [{"at": iso(f["at_ms"]), "error": f["error"]} for f in failures]
        for key in (*JSON_FIELDS, "backend_usage"):  # stored as JSON text
            if out.get(key) is not None:
                out[key] = json.loads(out[key])
        # OpenClaw's retries of this turn and clients' re-sends: stored, answered, no file.
        repeats = self._query(
            "SELECT id, received_ms, repeat_reason FROM requests WHERE duplicate_of = ?"
            " ORDER BY seq",
            (rid,),
        )
        out["repeats"] = [
            {"id": r["id"], "why": r["repeat_reason"], "received_at": iso(r["received_ms"])}
            for r in repeats
        ]
        replies = self._query("SELECT * FROM replies WHERE request_id = ?", (rid,))
        out["reply"] = None
        for r in replies:
            out["reply"] = {
                "state": r["state"], "message": r["message"], "claimed_at": iso(r["claimed_ms"]),
                "finished_at": iso(r["finished_ms"]), "exit_status": r["exit_status"],
                "output": r["output"], "attempts": r["attempts"],
                # an earlier send's process died mid-send; this one took its claim over
                "abandoned_attempt_found_at": iso(r["abandoned_ms"]),
                # answered by the reply (or done) to this later message of its conversation
                "covered_by": r["covered_by"],
                # how it went: the gateway or the openclaw CLI, the channel's message id
                "transport": r["transport"], "delivered_id": r["delivered_id"],
                "may_have_reached_gateway": bool(r["maybe_sent"]),
            }  # fmt: skip
        out["body"] = self.body(out.pop("body_segments"))
        out["answered_at"] = iso(out.pop("answered_ms", None))
        out["agent_runs"] = self.runs_of(rid)
        for key in ("seq", "claimed_until_ms", "body_hash"):
            out.pop(key, None)
        return out

    def runs_of(self, request_id: str) -> list[dict[str, Any]]:
        """The runner's runs that were given this request, oldest first (`agent runs`
        has the whole record)."""
        rows = self._query(
            "SELECT id, started_ms, ended_ms, outcome, exit_status, limit_fired, sent_output,"
            " error FROM agent_runs WHERE request_ids LIKE ? ORDER BY started_ms",
            (f'%"{request_id}"%',),
        )
        return [
            {"id": r["id"], "started_at": iso(r["started_ms"]), "ended_at": iso(r["ended_ms"]),
             "outcome": r["outcome"] or "running", "exit_status": r["exit_status"],
             "limit_fired": r["limit_fired"], "sent_output": bool(r["sent_output"]),
             "error": r["error"]}
            for r in rows
        ]  # fmt: skip

    def oldest_unanswered_ms(self) -> int | None:
        """When the oldest message still waiting for the agent arrived (doctor)."""
        ((oldest,),) = self._query(
            f"SELECT min(received_ms) FROM (SELECT received_ms FROM requests {WAITING_INDEX}"
            f" WHERE {UNANSWERED} ORDER BY seq LIMIT 1)"
        )
        return None if oldest is None else int(oldest)

    def failed_replies_since(self, since_ms: int) -> tuple[int, str | None]:
        """(replies whose last attempt failed since then, what the newest said) (doctor)."""
        rows = self._query(
            "SELECT output FROM replies WHERE state = ? AND finished_ms >= ?"
            " ORDER BY finished_ms DESC",
            (ReplyState.FAILED.value, since_ms),
        )
        last = (rows[0]["output"] or "").strip().splitlines() if rows else []
        return len(rows), (printable(last[-1], one_line=True)[:200] if last else None)

    def agent_stats(self) -> dict[str, Any]:
        """The runner's last day (runs by outcome) and the conversations it set aside
        whose messages still wait (tried `--attempts` times; tried again on a new message)."""
        day_ago = int((time.time() - 86400) * 1000)
        outcomes = dict(self._query(RUNS_SINCE, (day_ago,)))
        from .agent.runner.runs import set_aside  # (the agent's half, read here only)

        try:
            aside = set_aside(self.conn)
        except sqlite3.Error as exc:
            raise HistoryError(f"query failed on {self.path}: {exc}") from None
        return {
            "runs_last_day": outcomes,
            "set_aside": [
                {
                    "conversation": r["conversation"],
                    "failed_runs": r["failures"],
                    "since": iso(r["set_aside_ms"]),
                    "last_outcome": r["last_outcome"],
                }
                for r in aside
            ],
        }

    def stats(self, top: int = 10) -> dict[str, Any]:
        q = self._query
        counts = {
            display_state(state, None): n
            for state, n in q("SELECT state, count(*) FROM requests GROUP BY state")
        }
        ((failed,),) = q(f"SELECT count(*) FROM requests WHERE {_FAILED_SQL}")
        ((backlog, oldest),) = q(BACKLOG)
        # The newest LATENCY_ROWS written requests: a figure for now, and a cost that does
        # not grow with the DB (all of 1M rows took over a second).
        latencies = sorted(
            r["l"]
            for r in q(
                "SELECT written_ms - received_ms AS l FROM requests"
                f" WHERE state = '{State.WRITTEN.value}' ORDER BY seq DESC LIMIT ?",
                (LATENCY_ROWS,),
            )
        )
        # max(seq), not max(received_ms): the context index holds seq, so the scan never
        # reads the table; only the top contexts' newest rows are then read, by seq.
        tops = q(
            "SELECT context_id, n, (SELECT received_ms FROM requests WHERE seq = last) FROM"
            " (SELECT context_id, count(*) AS n, max(seq) AS last FROM requests"
            "  WHERE context_id IS NOT NULL GROUP BY context_id ORDER BY n DESC LIMIT ?)",
            (top,),
        )
        (backend,) = q(
            "SELECT count(*) AS calls, sum(backend_error IS NOT NULL) AS failed,"
            " avg(backend_latency_ms) AS latency"
            " FROM requests WHERE backend_status IS NOT NULL OR backend_error IS NOT NULL"
        )
        reply_latencies = [
            r["l"]
            for r in q(
                "SELECT replies.finished_ms - requests.received_ms AS l FROM replies JOIN"
                " requests ON requests.id = replies.request_id"
                f" WHERE replies.state = '{ReplyState.SENT.value}' ORDER BY l"
            )
        ]
        delivery: dict[str, list[int]] = {}
        for r in q(DELIVERY_TIMES, (LATENCY_ROWS,)):
            delivery.setdefault(r[0], []).append(r[1])
        stale_ms = int((time.time() - UNANSWERED_AFTER_S) * 1000)
        ((unanswered, stale),) = q(
            f"SELECT count(*), coalesce(sum(received_ms < ?), 0) FROM requests WHERE {UNANSWERED}",
            (stale_ms,),
        )
        return {
            "db": str(self.path),
            "total": sum(counts.values()),
            "by_state": {**counts, "failed": failed},
            "backlog": backlog,
            "oldest_unwritten_at": iso(oldest),
            "request_to_file_ms": percentiles(latencies),
            "request_to_reply_ms": percentiles(reply_latencies),
            # `reply` start -> the gateway's (or the CLI's) answer, by transport
            "reply_delivery_ms": {t: percentiles(sorted(v)) for t, v in sorted(delivery.items())},
            "unanswered": unanswered,
            "unanswered_over_5_min": stale,
            "top_contexts": [
                {"context_id": c, "requests": n, "last_at": iso(last)} for c, n, last in tops
            ],
            "backend": {
                "calls": backend["calls"],
                "failed": backend["failed"] or 0,
                "avg_latency_ms": None
                if backend["latency"] is None
                else round(backend["latency"], 1),
            },
            "agent_runner": self.agent_stats(),
        }


def percentiles(sorted_values: list[int]) -> dict[str, float | None]:
    if not sorted_values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    n = len(sorted_values)

    def at(p: float) -> float:
        return float(sorted_values[min(n - 1, int(p * n))])

    return {"count": n, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)}
