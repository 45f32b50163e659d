"""`replay`: rewrite inbox files from the DB with the flusher's own payload function."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.progress import Progress

from .audit import Audit, Selection
from .config import Settings
from .inbox import ensure_dir, fsync_dir, render, write_atomically


def replay_rows(
    audit: Audit, selection: Selection, settings: Settings, *, full: bool, dry_run: bool
) -> str:
    """Write (or list) the selected rows; duplicates never had a file and get none now.
    Returns the one-line report."""
    inbox: Path = settings.inbox
    total = audit.count(selection)
    written = skipped = 0
    show_progress = sys.stderr.isatty() and not dry_run
    if not dry_run:
        ensure_dir(inbox)
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("replaying", total=total)
        for row, state in audit.pending_rows(selection):
            progress.advance(task)
            if state == "duplicate":
                skipped += 1
                continue
            kind = "full" if full or row.payload_kind == "full" else "compact"
            if dry_run:
                print(f"{inbox / row.inbox_file}\t{kind}\t{state}")
            else:
                write_atomically(inbox, row.inbox_file, render(row, settings, full=full))
            written += 1
    if written and not dry_run:
        fsync_dir(inbox)
    verb = "would write" if dry_run else "wrote"
    return f"replay: {verb} {written} file(s) to {inbox}; skipped {skipped} duplicate(s)"
