"""The server's side of the inbox writer process (`inbox_writer.py`): starts it on first
use (and again after it died), sends it batches over its stdin, reads its answers. Kept
apart so that the process itself never imports asyncio (it starts beside every server)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from .inbox import BatchResult
from .inbox_writer import CLOSE_WAIT_S, FRAME_LEN, WriterOptions, encode_rows, frame
from .rows import PendingRow

log = logging.getLogger("ai_agent_proxy.inbox_writer")

__all__ = ["InboxWriter", "WriterOptions"]


class InboxWriter:
    """The server's side: starts the writer process on first use (and again after it
    died), sends it a batch, returns what it wrote."""

    def __init__(self, options: WriterOptions) -> None:
        self.options = options
        self._proc: asyncio.subprocess.Process | None = None

    async def write(self, rows: Sequence[PendingRow]) -> BatchResult:
        if not rows:
            return BatchResult(written=[])
        try:
            proc = await self._running()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(encode_rows(rows))
            await proc.stdin.drain()
            (size,) = FRAME_LEN.unpack(await proc.stdout.readexactly(FRAME_LEN.size))
            answer: dict[str, Any] = orjson.loads(await proc.stdout.readexactly(size))
        except (OSError, asyncio.IncompleteReadError, orjson.JSONDecodeError) as exc:
            # Nothing it wrote in this batch is counted: the rows are written again (same
            # names, same bytes) by the next attempt.
            await self._discard()
            return BatchResult([], rows[0].seq, f"inbox writer process failed: {exc!r}")
        answer["rejected"] = [(seq, error) for seq, error in answer["rejected"]]
        return BatchResult(**answer)

    async def start(self) -> None:
        """Start the process now, so the first batch does not wait for it to import."""
        with contextlib.suppress(OSError):
            await self._running()

    async def _running(self) -> asyncio.subprocess.Process:
        if self._proc is not None:
            if self._proc.returncode is None:
                return self._proc
            log.warning("inbox_writer_died returncode=%s; starting another", self._proc.returncode)
        await self._discard()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ai_agent_proxy.inbox_writer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(frame(self.options.encode()))
        return self._proc

    async def kill(self) -> None:
        """End the process now (SIGKILL works on a stopped one too); its batch is lost and
        its rows stay pending."""
        await self._discard()

    async def _discard(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def close(self) -> None:
        """Let it finish the batch in hand, then end it (closing its stdin)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:  # (no batch is in hand: it only has to read the end of its stdin)
            await asyncio.wait_for(proc.wait(), CLOSE_WAIT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
