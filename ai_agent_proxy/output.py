"""Rendering history records for people (rich tables) and programs (json, jsonl, csv)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "json", "jsonl", "csv")
CSV_COLUMNS = (
    "id", "received_at", "context_id", "channel", "target", "state", "payload_kind",
    "duplicate_of", "inbox_file", "latest_user_prompt", "backend_status", "backend_error",
    "attempts", "last_error", "written_at",
)  # fmt: skip


def write_records(records: Iterable[dict[str, Any]], fmt: str, out: TextIO = sys.stdout) -> None:
    """Write records as they come (nothing is held in memory but a table's rows)."""
    if fmt == "json":
        sep = "\n  "
        out.write("[")
        for rec in records:
            out.write(sep + json.dumps(rec, ensure_ascii=False))
            sep = ",\n  "
        out.write("]\n" if sep == "\n  " else "\n]\n")
    elif fmt == "jsonl":
        for rec in records:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    else:
        # One line per request; the prompt takes what the terminal width leaves.
        table = Table(expand=True, show_lines=False)
        table.add_column("received (UTC)", style="dim", no_wrap=True, min_width=19)
        table.add_column("id", style="cyan", no_wrap=True, min_width=12)
        table.add_column("state", no_wrap=True)
        table.add_column("context", style="green", no_wrap=True, max_width=28)
        table.add_column("prompt", no_wrap=True, overflow="ellipsis", ratio=1, min_width=12)
        for rec in records:
            table.add_row(
                (rec["received_at"] or "")[:19].replace("T", " "),
                rec["id"][:12],
                rec["state"],
                rec["context_id"] or "-",
                _one_line(rec["latest_user_prompt"], 120),
            )
        Console(file=out).print(table)


def write_document(doc: dict[str, Any], fmt: str, out: TextIO = sys.stdout) -> None:
    """One record (history show) or the stats: JSON for programs, readable text otherwise."""
    if fmt in ("json", "jsonl"):
        out.write(json.dumps(doc, ensure_ascii=False, indent=None if fmt == "jsonl" else 2))
        out.write("\n")
        return
    console = Console(file=out)
    for key, value in doc.items():
        if isinstance(value, (dict, list)):
            console.print(Text(f"{key}:", style="bold"))
            console.print_json(json.dumps(value, ensure_ascii=False))
        else:
            console.print(Text.assemble((key, "bold"), f": {value}"), highlight=False)


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
