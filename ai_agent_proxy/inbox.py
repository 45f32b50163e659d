"""Inbox files: the payload a row becomes (full or compact) and the atomic write.

Shared by the flusher and by `replay`, so both write byte-identical files. The write
functions are blocking; callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .config import Settings
from .store import PendingRow

log = logging.getLogger("ai_agent_proxy.inbox")

_TEMP = re.compile(r"^\.\d{14}-[0-9a-f]{32}\.json\.\d+\.tmp$")


def build_payload(row: PendingRow, settings: Settings, *, full: bool = False) -> dict[str, Any]:
    """The JSON object written for a row (SPEC §3). `full` forces the full form."""
    common: dict[str, Any] = {
        "instruction": settings.instruction,
        "openclaw_message_cli_skill_path": str(settings.openclaw_message_cli_skill_path),
        "latest-user-prompt": row.latest_user_prompt,
        "context_id": row.context_id,
    }
    if row.channel is not None:
        common["channel"] = row.channel
    if row.target is not None:
        common["target"] = row.target
    if row.backend_reply is not None:
        common["backend-llm-reply"] = row.backend_reply
        common["backend-llm-instruction"] = row.backend_instruction
    if row.payload_kind == "compact" and not full:
        return {**common, "request_id": row.id}
    body = loads(row.body)
    payload = body if isinstance(body, dict) else {"body": body}
    payload.update(common)
    return payload


def loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits that the stdlib (and JSON) allow.
        return json.loads(raw)


def dumps(payload: dict[str, Any]) -> bytes:
    """UTF-8, not ASCII-escaped, indent 2, sorted keys, trailing newline."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    except TypeError:
        text = json.dumps(payload, ensure_ascii=False, indent=2, sort_keys=True)
        return text.encode("utf-8", "surrogatepass") + b"\n"


def render(row: PendingRow, settings: Settings, *, full: bool = False) -> bytes:
    return dumps(build_payload(row, settings, full=full))


def ensure_dir(inbox: Path) -> None:
    inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not inbox.is_dir():
        raise NotADirectoryError(f"inbox {inbox} is not a directory")


def write_atomically(inbox: Path, name: str, data: bytes) -> Path:
    """Dot-named temp file in the same directory, fsync, rename: readers never see a
    partial file, and a re-write after a crash replaces the same name."""
    final = inbox / name
    temp = inbox / f".{name}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return final


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class BatchResult:
    written: list[int]  # seqs written, in order
    failed_seq: int | None = None
    error: str | None = None


def write_batch(inbox: Path, rows: Sequence[PendingRow], settings: Settings) -> BatchResult:
    """Write rows in arrival order; stop at the first failure so order is kept on retry."""
    result = BatchResult(written=[])
    try:
        ensure_dir(inbox)
    except OSError as exc:
        if rows:
            result.failed_seq, result.error = rows[0].seq, _describe(exc)
        return result
    for row in rows:
        try:
            data = render(row, settings)
            path = write_atomically(inbox, row.inbox_file, data)
        except (OSError, ValueError, TypeError) as exc:
            result.failed_seq, result.error = row.seq, _describe(exc)
            break
        log.info("chat_completion request inbox file_size=%d inbox_path=%s", len(data), path)
        result.written.append(row.seq)
    if result.written:
        try:
            fsync_dir(inbox)  # make the renames durable before rows are marked written
        except OSError as exc:
            return BatchResult([], rows[0].seq, _describe(exc))
    return result


def remove_stale_temps(inbox: Path) -> int:
    """Temp files left by a crash mid-write; their rows are still pending."""
    removed = 0
    try:
        entries = list(os.scandir(inbox))
    except OSError:
        return 0
    for entry in entries:
        if _TEMP.match(entry.name):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
