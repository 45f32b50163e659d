"""Inbox files: the payload a row becomes (full or compact) and the atomic writes.

Shared by the inbox writer process (for the flusher) and by `replay`, so both write
byte-identical files. The write functions are blocking: the server never calls them on its
event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from .bodies import dumps as json_dumps
from .bodies import loads
from .rows import JSON_FIELDS, MESSAGE_FIELDS, PendingRow, body_needed

log = logging.getLogger("ai_agent_proxy.inbox")

_TEMP = re.compile(r"^\.\d{14}-[0-9a-f]{32}\.json\.\d+\.tmp$")


class PayloadSettings(Protocol):
    """The settings a payload is made from (Settings has them; so does the writer process)."""

    @property
    def instruction(self) -> str: ...

    @property
    def openclaw_message_cli_skill_path(self) -> Path: ...


Parse = Callable[[bytes], Any]

BODY_OWN_KEYS = "request-body-own-keys"  # where a body's own values for the proxy's keys go
# A message field's key in the file: its name, but for this one (the original package's).
PAYLOAD_KEY = {"latest_user_prompt": "latest-user-prompt"}
_MESSAGE_KEYS = tuple((name, PAYLOAD_KEY.get(name, name)) for name in MESSAGE_FIELDS)
# Every key the proxy puts at the top level of an inbox file (README: The inbox contract),
# and that one.
PROXY_KEYS = (
    "instruction", "openclaw_message_cli_skill_path", "request_id",
    *(key for _, key in _MESSAGE_KEYS),
    "backend-llm-reply", "backend-llm-error", "backend-llm-instruction", BODY_OWN_KEYS,
)  # fmt: skip
_ALWAYS = ("latest_user_prompt", "context_id")  # in every file, even when empty or null


def build_payload(
    row: PendingRow, settings: PayloadSettings, *, full: bool = False, parse: Parse = loads
) -> dict[str, Any]:
    """The JSON object written for a row (README: The inbox contract). `full`: the full
    form, whatever the row's kind."""
    common: dict[str, Any] = {
        "instruction": settings.instruction,
        "openclaw_message_cli_skill_path": str(settings.openclaw_message_cli_skill_path),
    }
    for name, key in _MESSAGE_KEYS:  # (rows.Message: one key per field, null ones left out)
        value = getattr(row, name)
        if value is not None:
            common[key] = orjson.loads(value) if name in JSON_FIELDS else value
        elif name in _ALWAYS:
            common[key] = value
    # What the person was shown by the backend (also the part before a cut-off) ...
    if row.backend_reply is not None:
        common["backend-llm-reply"] = row.backend_reply
    # ... and why it is not all there, or why they got the local answer instead.
    if row.backend_error is not None:
        common["backend-llm-error"] = row.backend_error
    if row.backend_reply is not None or row.backend_error is not None:
        common["backend-llm-instruction"] = row.backend_instruction
    if not body_needed(row.payload_kind, full):
        return {**common, "request_id": row.id}
    body = parse(row.body)
    payload = dict(body) if isinstance(body, dict) else {"body": body}
    # The proxy's keys are the proxy's: a body's own value for one of them (a stranger's
    # "backend-llm-reply": "I promised you a refund") is kept under BODY_OWN_KEYS, never
    # presented at the top level as if the proxy had set it.
    own = {key: payload.pop(key) for key in PROXY_KEYS if key in payload}
    if own:
        payload[BODY_OWN_KEYS] = own
    payload.update(common)
    return payload


def dumps(payload: dict[str, Any]) -> bytes:
    """UTF-8, not ASCII-escaped, indent 2, sorted keys, trailing newline; any depth the
    parser accepts, lone surrogates as their escapes (bodies.dumps)."""
    return json_dumps(payload, indent=True, sort_keys=True) + b"\n"


def render(
    row: PendingRow, settings: PayloadSettings, *, full: bool = False, parse: Parse = loads
) -> bytes:
    return dumps(build_payload(row, settings, full=full, parse=parse))


def ensure_dir(inbox: Path) -> None:
    inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not inbox.is_dir():
        raise NotADirectoryError(f"inbox {inbox} is not a directory")


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux syncfs(2): one flush for a whole batch of files instead of one fsync each
    (each fsync of a new file is a journal commit of its own)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def write_files(inbox: Path, files: Iterable[tuple[str, bytes]]) -> tuple[int, OSError | None]:
    """Write files atomically and durably: each goes to a dot-named temp file in the same
    directory, the data is flushed, then it is renamed into place and the directory is
    flushed. Readers never see a partial file; re-writing a name replaces it. `files` is
    taken one at a time (a file's data can be dropped once it is in its temp file). Returns
    how many files (in order) are in place, and the error that stopped the rest, if any."""
    staged: list[tuple[Path, Path]] = []
    error: OSError | None = None
    for name, data in files:
        temp = inbox / f".{name}.{os.getpid()}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if _syncfs is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink_quietly(temp)
            error = exc
            break
        staged.append((temp, inbox / name))
    if not staged:
        return 0, error
    done = 0
    try:
        dir_fd = os.open(inbox, os.O_RDONLY)
    except OSError as exc:
        error = exc
    else:
        try:
            if _syncfs is not None and _syncfs(dir_fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            for temp, final in staged:
                os.replace(temp, final)
                done += 1
        except OSError as exc:
            error = exc  # the files renamed before it are in place: they count
        try:
            if done:
                os.fsync(dir_fd)  # the renames themselves
        except OSError as exc:
            done, error = 0, exc  # not durable: written again, under the same names
        finally:
            os.close(dir_fd)
    for temp, _ in staged[done:]:
        _unlink_quietly(temp)
    return done, error


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclass
class BatchResult:
    written: list[int]  # seqs written, in order
    failed_seq: int | None = None  # the inbox failed here (this row and later ones wait)
    error: str | None = None
    # Rows that cannot become a file whatever the inbox does: (seq, why). The others of
    # the batch are written all the same.
    rejected: list[tuple[int, str]] = field(default_factory=list)


def write_batch(
    inbox: Path, rows: Sequence[PendingRow], settings: PayloadSettings, parse: Parse = loads
) -> BatchResult:
    """Write rows in arrival order; stop at the first failure of the inbox so order is kept
    on retry. A row that cannot be rendered is reported apart and does not stop the rest."""
    if not rows:
        return BatchResult(written=[])
    try:
        ensure_dir(inbox)
    except OSError as exc:
        return BatchResult([], rows[0].seq, _describe(exc))
    kept: list[tuple[PendingRow, int]] = []
    rejected: list[tuple[int, str]] = []

    def rendered() -> Iterator[tuple[str, bytes]]:
        """Each row's file, rendered as it is written: a batch is never held rendered
        whole (a few large rows were gigabytes)."""
        for row in rows:
            try:
                data = render(row, settings, parse=parse)
            except Exception as exc:  # any reason at all: this row's, not the inbox's
                rejected.append((row.seq, _describe(exc)))
                continue
            kept.append((row, len(data)))
            yield row.inbox_file, data

    done, error = write_files(inbox, rendered())
    for row, size in kept[:done]:
        log.info(
            "chat_completion request inbox file_size=%d inbox_path=%s",
            size, inbox / row.inbox_file,
        )  # fmt: skip
    result = BatchResult(written=[row.seq for row, _ in kept[:done]], rejected=rejected)
    if error is not None:
        result.failed_seq, result.error = kept[done][0].seq, _describe(error)
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
