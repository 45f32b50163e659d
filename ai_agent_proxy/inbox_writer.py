"""The inbox writer process: renders batches of rows and writes them as inbox files.

Each server process keeps one of these beside it. Writing a file durably is a dozen
system calls; from a thread of the server, each would give up and then wait to take back
the interpreter lock the request handlers hold, and the files came out slower than the
requests came in. In its own process the writes use the second core instead. The process
only renders and writes (the same `write_batch` that `replay` uses): every decision about
rows (leases, marks, retries) stays with the flusher and the DB. It ignores SIGINT and
SIGTERM and exits when its stdin closes, so it always finishes the batch in hand and never
outlives its server.

Wire format, both directions on pipes: a frame is a 4-byte big-endian length, then
that many bytes. The first frame to the writer holds its options (JSON); each later one a
batch of rows (see `encode_rows`); the writer answers each batch with one JSON frame.
The server's side of the pipes is `inbox_writer_client.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from .bodies import BodyParser
from .inbox import BatchResult, write_batch
from .logs import setup_logging
from .process import return_large_allocations
from .rows import PendingRow

log = logging.getLogger("ai_agent_proxy.inbox_writer")

FRAME_LEN = struct.Struct("!I")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CLOSE_WAIT_S = 2.0  # then a writer that does not end (stopped: SIGSTOP) is killed


@dataclass(frozen=True)
class WriterOptions:
    inbox: Path
    instruction: str
    openclaw_message_cli_skill_path: Path
    debug: bool = False

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "inbox": str(self.inbox),
                "instruction": self.instruction,
                "skill_path": str(self.openclaw_message_cli_skill_path),
                "debug": self.debug,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> WriterOptions:
        o = orjson.loads(data)
        return cls(Path(o["inbox"]), o["instruction"], Path(o["skill_path"]), o["debug"])


def frame(data: bytes) -> bytes:
    return FRAME_LEN.pack(len(data)) + data


def encode_rows(rows: Sequence[PendingRow]) -> bytes:
    """One frame: the length of the rows' fields as JSON (objects by field name, then the
    body sizes), that JSON, then their bodies back to back."""
    meta = orjson.dumps([[r.meta() for r in rows], [len(r.body) for r in rows]])
    return frame(FRAME_LEN.pack(len(meta)) + meta + b"".join(r.body for r in rows))


def decode_rows(data: bytes) -> list[PendingRow]:
    (meta_len,) = FRAME_LEN.unpack_from(data)
    meta, sizes = orjson.loads(data[FRAME_LEN.size : FRAME_LEN.size + meta_len])
    bodies = memoryview(data)[FRAME_LEN.size + meta_len :]
    rows, at = [], 0
    for fields, size in zip(meta, sizes, strict=True):
        rows.append(PendingRow.from_row(fields, bytes(bodies[at : at + size])))
        at += size
    return rows


def encode_result(result: BatchResult) -> bytes:
    return frame(orjson.dumps(result.__dict__))


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(FRAME_LEN.size)
    if len(head) < FRAME_LEN.size:
        return None
    (size,) = FRAME_LEN.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its server dies, even while it is stopped
    (SIGSTOP) and cannot read the end of its stdin."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    # The server decides when this process ends, by closing its stdin (or by dying).
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    # Answers go out on the original stdout; anything printed by mistake goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    first = _read_frame(stdin)
    if first is None:
        return
    options = WriterOptions.decode(first)
    setup_logging(options.debug)
    return_large_allocations()
    # An agent's bodies repeat their system prompt and tools: parse those once.
    parts = BodyParser()
    parse = functools.partial(parts.parse, learn=True)
    while (data := _read_frame(stdin)) is not None:
        rows = decode_rows(data)
        try:
            result = write_batch(options.inbox, rows, options, parse)
        except Exception as exc:  # write_batch reports row errors itself; this is a bug
            log.error("inbox_batch_failed error=%s: %s", type(exc).__name__, exc)
            result = BatchResult([], rows[0].seq, f"{type(exc).__name__}: {exc}")
        try:
            out.write(encode_result(result))
            out.flush()
        except BrokenPipeError:  # the server is gone; its rows stay pending for the next
            return


if __name__ == "__main__":
    main()
