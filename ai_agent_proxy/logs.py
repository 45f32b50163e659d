"""Log set-up shared by the CLI and by each Sanic worker process (spawned workers start
with a fresh interpreter and no handlers)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO; keep it quiet unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)


class RedactingFilter(logging.Filter):
    """Masks the configured secrets in every record a handler emits, whoever logged it
    (httpx logs each request URL, query and all, when DEBUG is on)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # formatted here, so it is masked too
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_logs(redact: Callable[[str], str]) -> None:
    """Put the redaction on the root logger's handlers (one filter each, replaced)."""
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(RedactingFilter(redact))
