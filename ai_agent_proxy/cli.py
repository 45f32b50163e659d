"""Command line: `ai-agent-proxy` (= `serve`), `history`, `replay`.

Every failure the user can cause (bad config, unusable DB, port taken) ends as one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Annotated, Any

import typer

from .config import ConfigError, Settings, load_settings
from .migrations import SchemaError, migrate

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Durable OpenAI-compatible inbox proxy for OpenClaw.",
    pretty_exceptions_enable=False,
)

log = logging.getLogger("ai_agent_proxy")


@cli.callback()
def root() -> None:
    """Durable OpenAI-compatible inbox proxy for OpenClaw. Without a command: serve."""


ConfigOpt = Annotated[
    str | None,
    typer.Option("-f", "--config", help="Config file (default ./.ai-agent-proxy.conf)."),
]


def _opt(help_: str, *names: str) -> Any:
    return typer.Option(*names, help=help_, show_default=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"ai-agent-proxy: {message}", err=True)
    return typer.Exit(code)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs full URLs per request at INFO; keep it quiet unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)


def settings_or_exit(config: str | None, flags: dict[str, Any]) -> Settings:
    try:
        return load_settings(config, flags)
    except ConfigError as exc:
        raise fail(str(exc)) from None


@cli.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[
        str | None, _opt("Address to bind (HOST, default 127.0.0.1).", "--host")
    ] = None,
    port: Annotated[str | None, _opt("Port (PORT, default 7011).", "--port")] = None,
    key: Annotated[str | None, _opt("Bearer key clients must send (KEY).", "--key")] = None,
    worker: Annotated[str | None, _opt("Worker processes (WORKER, default 1).", "--worker")] = None,
    inbox: Annotated[str | None, _opt("Inbox directory (INBOX).", "--inbox")] = None,
    db: Annotated[str | None, _opt("SQLite outbox file (DB).", "--db")] = None,
    url: Annotated[str | None, _opt("Backend LLM base URL (URL).", "--url")] = None,
    api_key: Annotated[
        str | None, _opt("Backend LLM API key (API_KEY).", "--api-key", "--api_key")
    ] = None,
    backend_model: Annotated[
        str | None, _opt("Model name sent to the backend (BACKEND_MODEL).", "--backend-model")
    ] = None,
    backend_instruction: Annotated[
        str | None,
        _opt("System instruction prepended for the backend.", "--backend-instruction"),
    ] = None,
    instruction: Annotated[
        str | None, _opt("`instruction` written into inbox files.", "--instruction")
    ] = None,
    openclaw_message_cli_skill_path: Annotated[
        str | None,
        _opt("Skill path written into inbox files.", "--openclaw-message-cli-skill-path"),
    ] = None,
    model_id: Annotated[str | None, _opt("Local model id (MODEL_ID).", "--model-id")] = None,
    reply: Annotated[str | None, _opt("Assistant text answered (REPLY).", "--reply")] = None,
    max_body: Annotated[str | None, _opt("Largest body in bytes (MAX_BODY).", "--max-body")] = None,
    backend_timeout: Annotated[
        str | None, _opt("Backend timeout in seconds.", "--backend-timeout")
    ] = None,
    dedup_window: Annotated[
        str | None, _opt("Seconds an identical body counts as a retry.", "--dedup-window")
    ] = None,
    retention_days: Annotated[
        str | None, _opt("Prune written rows older than this (0 = keep).", "--retention-days")
    ] = None,
    debug: Annotated[bool | None, typer.Option("--debug/--no-debug", show_default=False)] = None,
) -> None:
    """Run the server (the default command)."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    settings = settings_or_exit(config, flags)
    setup_logging(settings.debug)
    prepare_storage(settings)
    announce(settings)
    run_server(settings)


def prepare_storage(settings: Settings) -> None:
    """Migrations, crash recovery and temp clean-up: once, before any worker starts."""
    from .inbox import remove_stale_temps
    from .store import recover_on_start

    try:
        applied = migrate(settings.db_path)
        interrupted, pending = recover_on_start(settings.db_path)
    except (SchemaError, OSError) as exc:
        raise fail(str(exc)) from None
    removed = remove_stale_temps(settings.inbox)
    log.info(
        "outbox_ready db=%s migrations_applied=%d pending=%d interrupted=%d stale_temps=%d",
        settings.db_path,
        applied,
        pending,
        interrupted,
        removed,
    )


def announce(settings: Settings) -> None:
    summary = " ".join(f"{k}={v!r}" for k, v in settings.summary().items() if v != "")
    log.info("config %s", summary)
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

    try:
        if settings.worker == 1:
            app = create_app(settings)
            app.run(
                host=settings.host,
                port=settings.port,
                single_process=True,
                access_log=settings.debug,
                motd=False,
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
        )
        Sanic.serve(primary=app, app_loader=loader)
    except OSError as exc:
        raise fail(f"cannot serve on {settings.host}:{settings.port}: {exc}", 1) from None


SUBCOMMANDS = {"serve", "history", "replay"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # Plain `ai-agent-proxy [flags]` means `ai-agent-proxy serve [flags]`.
    if not args or (args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h")):
        args.insert(0, "serve")
    cli(args, prog_name="ai-agent-proxy")
