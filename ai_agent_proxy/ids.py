"""Time-ordered request ids (UUIDv7 layout) and the inbox file names derived from them."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timezone

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_request_id() -> tuple[str, int]:
    """Return (32 hex chars, unix milliseconds). Ids sort by creation time, and within one
    process they are strictly increasing even inside the same millisecond."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms += 1
                _counter = 0
        else:
            _counter = random.getrandbits(8)  # leave room to count up
        _last_ms = ms
        counter = _counter
    # `random`, not os.urandom: ids need to be unique, not secret, and a system call here
    # would hand the GIL to the DB thread in the middle of every request. (The module's
    # generator is seeded from the OS and re-seeded in a forked child.)
    rand_b = random.getrandbits(62)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    return f"{value:032x}", ms


def inbox_file_name(request_id: str, received_ms: int) -> str:
    """`<UTC YYYYmmddHHMMSS>-<request id>.json`: sorting names sorts by arrival."""
    stamp = datetime.fromtimestamp(received_ms / 1000, tz=timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"{stamp}-{request_id}.json"
