"""Rendering history records for people (a table, plain text) and programs (json, jsonl, csv).

Chat text is written by strangers and read back here by operators, on a terminal or in a
spreadsheet. Everything shown to people goes through `printable`: control characters
(ESC, BEL, CR, C1, DEL) and the bidi controls that reorder what a line seems to say are
shown as visible escapes, never sent raw. JSON and JSONL stay exact (JSON escapes control
characters itself). CSV cells that a spreadsheet would run as a formula are neutralised the
way OWASP recommends: a leading `'`.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .bodies import dumps as json_dumps
from .printable import json_safe, printable
from .rows import MESSAGE_FIELDS

FORMATS = ("table", "json", "jsonl", "csv")
CSV_COLUMNS = (
    "id", "received_at", *MESSAGE_FIELDS, "state", "payload_kind", "duplicate_of",
    "inbox_file", "backend_status", "backend_error", "attempts", "last_error", "written_at",
    "reply_state", "replied_at",
)  # fmt: skip

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: control characters escaped, and a leading
    `'` before a cell that starts like a formula (= + - @, tab, CR)."""
    if isinstance(value, (dict, list)):  # sender, attachments: as JSON
        value = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        return value
    if value.startswith(_FORMULA_START):
        value = "'" + value
    return printable(value)


def write_records(
    records: Iterable[dict[str, Any]],
    fmt: str,
    out: TextIO | None = None,
    columns: tuple[str, ...] | None = None,
    table: Callable[[Iterable[dict[str, Any]], TextIO], None] | None = None,
) -> None:
    """Write records as they come (nothing is held in memory but a table's rows): history's
    by default; another kind's with its `columns` (csv) and `table` writer."""
    out = out or sys.stdout  # looked up now: a test may have replaced it
    if fmt == "json":
        sep = "\n  "
        out.write("[")
        for rec in records:
            out.write(sep + json_safe(json.dumps(rec, ensure_ascii=False)))
            sep = ",\n  "
        out.write("]\n" if sep == "\n  " else "\n]\n")
    elif fmt == "jsonl":
        for rec in records:
            out.write(json_safe(json.dumps(rec, ensure_ascii=False)) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns or CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: csv_cell(v) for k, v in rec.items()})
    else:
        (table or write_table)(records, out)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here; a reader that stopped reading (`| head`) is the CLI's to judge.
        raise BrokenPipeError


def write_table(records: Iterable[dict[str, Any]], out: TextIO) -> None:
    """One line per request (UTC `MM-DD HH:MM`); the prompt takes what the terminal width
    leaves. The id shown is its random tail: unique, and `history show` and `replay` take
    it as it is."""
    console = _Console(file=out, width=None if out.isatty() else 200, highlight=False)
    table = Table(box=None, expand=True, pad_edge=False, padding=(0, 1, 0, 0))
    # Only the prompt gives way when the line is short: the other columns keep their width.
    table.add_column("received", style="dim", no_wrap=True, min_width=11)
    table.add_column("id", style="cyan", no_wrap=True, min_width=8)
    table.add_column("state", no_wrap=True, min_width=len("awaiting-backend"))
    table.add_column("backend", no_wrap=True, min_width=len("backend"))
    table.add_column("context", style="green", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", ratio=1)
    for rec in records:
        table.add_row(
            (rec["received_at"] or "")[5:16].replace("T", " "),
            rec["id"][-8:],
            rec["state"],
            backend_cell(rec),
            Text(printable(rec["context_id"], one_line=True)),
            Text(_shorten(printable(rec["latest_user_prompt"], one_line=True), 200)),
        )
    console.print(table)


RUN_COLUMNS = (
    "id", "conversation", "request_ids", "started_at", "ended_at", "outcome", "exit_status",
    "limit_fired", "attempt", "sent_output", "session_before", "session_after", "cost_usd",
    "tokens", "error", "command",
)  # fmt: skip


def write_runs_table(records: Iterable[dict[str, Any]], out: TextIO) -> None:
    """`agent runs`: one line per run, newest first (UTC `MM-DD HH:MM`, its id's tail)."""
    console = _Console(file=out, width=None if out.isatty() else 200, highlight=False)
    table = Table(box=None, expand=True, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("started", style="dim", no_wrap=True, min_width=11)
    table.add_column("run", style="cyan", no_wrap=True, min_width=8)
    table.add_column("outcome", no_wrap=True, min_width=len("interrupted"))
    table.add_column("exit", no_wrap=True, justify="right")
    table.add_column("took", no_wrap=True, justify="right")
    table.add_column("msgs", no_wrap=True, justify="right")
    table.add_column("conversation", style="green", no_wrap=True, max_width=22, overflow="ellipsis")
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for rec in records:
        took = "-"
        if rec["started_at"] and rec["ended_at"]:
            seconds = datetime.fromisoformat(rec["ended_at"]) - datetime.fromisoformat(
                rec["started_at"]
            )
            took = f"{seconds.total_seconds():.0f}s"
        table.add_row(
            (rec["started_at"] or "")[5:16].replace("T", " "),
            rec["id"][-8:],
            rec["outcome"] or "running",
            "-" if rec["exit_status"] is None else str(rec["exit_status"]),
            took,
            str(len(rec["request_ids"])),
            Text(printable(rec["conversation"], one_line=True)),
            Text(_shorten(printable(rec["error"] or "", one_line=True), 200)),
        )
    console.print(table)


def backend_cell(rec: dict[str, Any]) -> str:
    if rec.get("backend_error"):
        return "error"
    status = rec.get("backend_status")
    return "-" if status is None else str(status)


def write_document(doc: dict[str, Any], fmt: str, out: TextIO | None = None) -> None:
    """One record (history show) or the stats: JSON for programs; for people, one
    `key: value` line each (nested keys dotted, lists numbered), never wrapped."""
    out = out or sys.stdout
    if fmt in ("json", "jsonl"):
        # bodies.dumps: a stored body of any depth the server accepted, lone surrogates too
        out.write(json_safe(json_dumps(doc, indent=fmt == "json").decode()) + "\n")
        return
    for key, value in _flatten(doc, ""):
        text = printable(value)
        if "\n" in text:  # a multi-line value (a prompt, a reply) indented under its key
            out.write(f"{key}:\n" + "".join(f"    {line}\n" for line in text.split("\n")))
        else:
            out.write(f"{key}: {text}\n")


def _flatten(value: Any, key: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        if not value and key:
            yield key, "-"
        for k, v in value.items():
            yield from _flatten(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        if not value:
            yield key, "-"
        for i, v in enumerate(value, 1):
            yield from _flatten(v, f"{key}[{i}]")
    else:
        yield key, value


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
