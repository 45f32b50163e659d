"""Starting the server: the port checked before anything is made, the DB migrated and
recovered once before any worker, the settings announced, then Sanic run (one process, or
workers sharing the DB). Errors are ProxyErrors the CLI prints as one line."""

from __future__ import annotations

import errno
import logging
import sqlite3
from functools import partial
from pathlib import Path

from .config import Settings, exposed_secrets, settings_file
from .errors import SchemaError, StartError
from .migrations import migrate

log = logging.getLogger("ai_agent_proxy")


def serve(settings: Settings, config_path: str | None = None) -> None:
    """Everything `ai-agent-proxy serve` does once its settings are read (from
    `config_path`, -f, or the default file)."""
    from .process import raise_open_files_limit

    check_port_free(settings)  # before any DB or inbox is created for a server that can't run
    prepare_storage(settings)
    raise_open_files_limit()  # inherited by the workers
    announce(settings, settings_file(config_path))
    run_server(settings)


def check_port_free(settings: Settings) -> None:
    import socket

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as exc:
        raise StartError(f"cannot serve on {settings.host}:{settings.port}: {exc}") from None


def prepare_storage(settings: Settings) -> None:
    """Migrations, crash recovery and clean-up: once, before any worker starts."""
    from .inbox import remove_stale_temps
    from .outbox.maintenance import collect_segment_garbage, recover_on_start

    try:
        applied = migrate(settings.db_path)
        interrupted, pending = recover_on_start(settings.db_path)
        # Pruned rows leave body segments behind; reclaim them while no worker caches ids.
        garbage = collect_segment_garbage(settings.db_path) if settings.retention_days else 0
    except (OSError, sqlite3.Error) as exc:
        raise SchemaError(f"cannot prepare database {settings.db_path}: {exc}") from None
    removed = remove_stale_temps(settings.inbox)
    log.info(
        "outbox_ready db=%s migrations_applied=%d pending=%d interrupted=%d stale_temps=%d"
        " unused_segments_removed=%d",
        *(settings.db_path, applied, pending, interrupted, removed, garbage),
    )


def announce(settings: Settings, config_file: Path | None = None) -> None:
    summary = " ".join(f"{k}={v!r}" for k, v in settings.summary().items() if v != "")
    log.info("config %s", summary)
    if warning := exposed_secrets(config_file):
        log.warning("settings_readable_by_others: %s", warning)
    if not settings.is_loopback and not settings.key:
        log.warning(
            "!!! SERVING ON %s WITHOUT A KEY: anyone who can reach this port can write into "
            "your agent's inbox. Set KEY (and give OpenClaw the same apiKey) or bind 127.0.0.1.",
            settings.host,
        )
    if not settings.reply and not settings.url:
        log.info(
            "REPLY is empty: OpenClaw treats an empty answer as a failure and retries once; "
            "set REPLY (e.g. 'working on it') when OpenClaw is the client"
        )


def run_server(settings: Settings) -> None:
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from .app import create_app
    from .connections import GuardedHttpProtocol

    try:
        if settings.worker == 1:
            app = create_app(settings)
            app.run(
                host=settings.host,
                port=settings.port,
                single_process=True,
                access_log=settings.debug,
                motd=False,
                protocol=GuardedHttpProtocol,
            )
            return
        loader = AppLoader(factory=partial(create_app, settings))
        app = loader.load()
        app.prepare(
            host=settings.host,
            port=settings.port,
            workers=settings.worker,
            access_log=settings.debug,
            motd=False,
            protocol=GuardedHttpProtocol,
        )
        Sanic.serve(primary=app, app_loader=loader)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise StartError(f"cannot serve on {settings.host}:{settings.port}: {exc}") from None
        raise StartError(f"server on {settings.host}:{settings.port} stopped: {exc}") from None
