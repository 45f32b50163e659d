"""How many bytes of large request bodies a server process receives and reads at once.

A body costs the server about four times its size from the moment it is read until it is
committed (its bytes, the parsed value, the segments stored, the person's words: 53 MiB for
a 15 MiB body, measured with tracemalloc), and 200 of 15 MiB sent at once took 13.6 GB. So
a body of LARGE_BODY bytes or more reserves EXPANSION times its size from BODY_MEMORY before
a byte of it is read (the client's upload waits meanwhile: the kernel holds it back), and
gives it back once it is committed. Small bodies are never held back: they are what a
normal client sends, and they are bounded by the connections anyway.
"""

from __future__ import annotations

import asyncio

LARGE_BODY = 1 << 20  # bodies from this size on reserve memory; OpenClaw's are ~60 KB
EXPANSION = 4  # what a body costs in memory until it is committed, in times its size
ADMIT_WAIT_S = 5.0  # a large body waits this long for room, then gets 503 + Retry-After
RETRY_AFTER_S = 2


class BodyBudget:
    """The bytes of large bodies in flight in this process (on its event loop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0
        self._freed = asyncio.Event()

    async def reserve(self, size: int, wait_s: float | None = None) -> int:
        """Reserve room for a body of `size` bytes and return what was reserved, for
        `release` (0 for a small body: nothing). Waits up to `wait_s` (ADMIT_WAIT_S) for
        room; one body alone always goes, even one larger than the limit. NoRoom past it."""
        if size < LARGE_BODY:
            return 0
        size *= EXPANSION
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (ADMIT_WAIT_S if wait_s is None else wait_s)
        while self.used and self.used + size > self.limit:
            self._freed.clear()
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self._freed.wait(), left)
            except asyncio.TimeoutError:
                self.refused += 1
                raise NoRoom(self) from None
        self.used += size
        return size

    def release(self, reserved: int) -> None:
        if reserved:
            self.used -= reserved
            self._freed.set()


class NoRoom(Exception):
    """A large body found no room in the budget within its wait."""

    def __init__(self, budget: BodyBudget) -> None:
        super().__init__(
            f"the server is reading large request bodies ({budget.used / 2**20:.0f} of"
            f" BODY_MEMORY's {budget.limit / 2**20:.0f} MiB in use): retry in {RETRY_AFTER_S} s"
        )
