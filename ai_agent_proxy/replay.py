"""`replay`: rewrite inbox files from the DB with the flusher's own payload function."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.progress import Progress

from .config import Settings
from .errors import ReplayError
from .history import History, Selection
from .inbox import ensure_dir, render, write_files
from .rows import State

CHUNK = 256  # files per durable batch


def replay_rows(
    audit: History, selection: Selection, settings: Settings, *, full: bool, dry_run: bool
) -> str:
    """Write (or list) the selected rows; duplicates never had a file and get none now.
    Returns the one-line report."""
    inbox: Path = settings.inbox
    total = audit.count(selection)
    written = skipped = 0
    show_progress = sys.stderr.isatty() and not dry_run
    if not dry_run:
        ensure_dir(inbox)
    pending: list[tuple[str, bytes]] = []

    def flush() -> None:
        _, error = write_files(inbox, pending)
        if error is not None:
            raise error
        pending.clear()

    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("replaying", total=total)
        for row, state in audit.pending_rows(selection, full):
            progress.advance(task)
            if state == State.DUPLICATE.value:
                skipped += 1
                continue
            kind = "full" if full or row.payload_kind == "full" else "compact"
            if dry_run:
                print(f"{inbox / row.inbox_file}\t{kind}\t{state}")
            else:
                try:
                    data = render(row, settings, full=full)
                except Exception as exc:  # e.g. a stored body no parser reads
                    raise ReplayError(
                        f"cannot render request {row.id}: {type(exc).__name__}: {exc}"
                    ) from None
                pending.append((row.inbox_file, data))
                if len(pending) >= CHUNK:
                    flush()
            written += 1
        if pending:
            flush()
    verb = "would write" if dry_run else "wrote"
    return f"replay: {verb} {written} file(s) to {inbox}; skipped {skipped} duplicate(s)"
