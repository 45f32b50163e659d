"""Log set-up shared by the CLI and by each Sanic worker process (spawned workers start
with a fresh interpreter and no handlers)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from .printable import printable


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO; keep it quiet unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)


class SafeLogFilter(logging.Filter):
    """What every handler emits, whoever logged it: the configured secrets masked (httpx
    logs each request URL, query and all, when DEBUG is on), and control characters
    escaped (a request line is written by a stranger: an escape sequence in it must not
    recolour, clear or forge the operator's log lines). Idempotent, so any number of
    handlers may each have one."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(self.redact(message), one_line=True)
        if safe != message:
            record.msg, record.args = safe, None
        if record.exc_info and not record.exc_text:  # formatted here, so it is made safe too
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = printable(self.redact(text))
        return True


class ConnectionFailures(logging.Filter):
    """On Sanic's error logger, so it sees each record once, before any handler: a
    connection Sanic gave up on (aborted by the client, cut at a deadline, a request line
    it could not parse) is one short line, not a traceback, and one such line per kind per
    PERIOD_S, as `auth_failed` is."""

    PERIOD_S = 60.0

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "connection" not in str(record.msg):
            return True
        while exc.__context__ is not None:  # the first failure, not Sanic's own after it
            exc = exc.__context__
        kind = type(exc).__name__
        now = time.monotonic()
        if now - self._last.get(kind, -self.PERIOD_S) < self.PERIOD_S:
            return False
        self._last[kind] = now
        if kind == "CancelledError":  # (by name: the writer process never imports asyncio)
            detail = "the connection was closed (by the client, or cut at a deadline)"
        else:
            detail = printable(self.redact(str(exc)), one_line=True)[:200]
        record.msg = "connection_failed error=%s: %s (said once a minute)"
        record.args = (kind, detail or "-")
        record.exc_info, record.exc_text, record.levelno = None, None, logging.WARNING
        record.levelname = "WARNING"
        return True


def safe_logs(redact: Callable[[str], str]) -> None:
    """SafeLogFilter on the root logger's handlers, ConnectionFailures on Sanic's error
    logger (one each, replaced)."""
    targets: list[logging.Filterer] = [*logging.getLogger().handlers]
    targets.append(logging.getLogger("sanic.error"))
    for target in targets:
        kind = ConnectionFailures if isinstance(target, logging.Logger) else SafeLogFilter
        for old in [f for f in target.filters if isinstance(f, kind)]:
            target.removeFilter(old)
        target.addFilter(kind(redact))
