"""RETENTION_DAYS: prune delivered rows in the background, a small batch per transaction so
requests never wait behind a big delete. Rows not yet in the inbox are never pruned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .errors import OutboxError
from .outbox.store import Outbox

log = logging.getLogger("ai_agent_proxy.retention")

BATCH = 1000
MAX_INTERVAL_S = 600.0


def prune_interval(retention_days: float) -> float:
    """Every 10 minutes, or more often for a retention shorter than 40 minutes."""
    return max(0.2, min(MAX_INTERVAL_S, retention_days * 86400 / 4))


class Pruner:
    def __init__(self, outbox: Outbox, retention_days: float) -> None:
        self.outbox = outbox
        self.retention_s = retention_days * 86400
        self.interval_s = prune_interval(retention_days)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="retention")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except OutboxError as exc:
                log.warning("retention_prune_failed error=%s", exc)
            await asyncio.sleep(self.interval_s)

    async def prune_once(self) -> int:
        cutoff_ms = int((time.time() - self.retention_s) * 1000)
        total = 0
        while (n := await self.outbox.prune_delivered(cutoff_ms, BATCH)) > 0:
            total += n
            await asyncio.sleep(0)  # let requests in between batches
        if total:
            log.info("retention_pruned rows=%d older_than_days=%g", total, self.retention_s / 86400)
        return total
