"""Log set-up shared by the CLI and by each Sanic worker process (spawned workers start
with a fresh interpreter and no handlers)."""

from __future__ import annotations

import logging
import sys


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO; keep it quiet unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)
