"""Command line: `ai-agent-proxy` (= `serve`), `history`, `replay`.

Every failure the user can cause (bad config, unusable DB, port taken) ends as one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import Settings, check_seconds, load_settings
from .errors import (
    ConfigError,
    HistoryError,
    ProxyError,
    ReplayError,
    ReplyRefused,
    SchemaError,
)
from .logs import setup_logging
from .migrations import migrate

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Durable OpenAI-compatible inbox proxy for OpenClaw.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click errors: a usage line and the error, no boxes
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
    cutoff_notice: Annotated[
        str | None,
        _opt("Shown after a relayed answer cut off mid-stream (CUTOFF_NOTICE).", "--cutoff-notice"),
    ] = None,
    max_body: Annotated[str | None, _opt("Largest body in bytes (MAX_BODY).", "--max-body")] = None,
    max_connections: Annotated[
        str | None, _opt("Open connections per worker (MAX_CONNECTIONS).", "--max-connections")
    ] = None,
    header_timeout: Annotated[
        str | None,
        _opt("Seconds a request's headers may take (HEADER_TIMEOUT).", "--header-timeout"),
    ] = None,
    body_timeout: Annotated[
        str | None, _opt("Seconds a request's body may take (BODY_TIMEOUT).", "--body-timeout")
    ] = None,
    body_min_rate: Annotated[
        str | None,
        _opt("Bytes/s a body must keep up after BODY_TIMEOUT (BODY_MIN_RATE).", "--body-min-rate"),
    ] = None,
    backend_timeout: Annotated[
        str | None, _opt("Backend timeout in seconds.", "--backend-timeout")
    ] = None,
    dedup_window: Annotated[
        str | None, _opt("Seconds an identical body counts as a retry.", "--dedup-window")
    ] = None,
    retention_days: Annotated[
        str | None, _opt("Prune written rows older than this (0 = keep).", "--retention-days")
    ] = None,
    openclaw_bin: Annotated[
        str | None, _opt("The openclaw CLI `reply` runs (OPENCLAW_BIN).", "--openclaw-bin")
    ] = None,
    media_dir: Annotated[
        str | None,
        _opt("OpenClaw's folder holding media/inbound (MEDIA_DIR).", "--media-dir"),
    ] = None,
    debug: Annotated[bool | None, typer.Option("--debug/--no-debug", show_default=False)] = None,
) -> None:
    """Run the server (the default command)."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    settings = settings_or_exit(config, flags)
    setup_logging(settings.debug)
    check_port_free(settings)  # before any DB or inbox is created for a server that can't run
    prepare_storage(settings)
    from .process import raise_open_files_limit

    raise_open_files_limit()  # inherited by the workers
    announce(settings)
    run_server(settings)


def check_port_free(settings: Settings) -> None:
    import socket

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as exc:
        raise fail(f"cannot serve on {settings.host}:{settings.port}: {exc}", 1) from None


def prepare_storage(settings: Settings) -> None:
    """Migrations, crash recovery and clean-up: once, before any worker starts."""
    import sqlite3

    from .inbox import remove_stale_temps
    from .outbox.maintenance import collect_segment_garbage, recover_on_start

    try:
        applied = migrate(settings.db_path)
        interrupted, pending = recover_on_start(settings.db_path)
        # Pruned rows leave body segments behind; reclaim them while no worker caches ids.
        garbage = collect_segment_garbage(settings.db_path) if settings.retention_days else 0
    except SchemaError as exc:
        raise fail(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise fail(f"cannot prepare database {settings.db_path}: {exc}") from None
    removed = remove_stale_temps(settings.inbox)
    log.info(
        "outbox_ready db=%s migrations_applied=%d pending=%d interrupted=%d stale_temps=%d"
        " unused_segments_removed=%d",
        *(settings.db_path, applied, pending, interrupted, removed, garbage),
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
            raise fail(f"cannot serve on {settings.host}:{settings.port}: {exc}", 1) from None
        raise fail(f"server on {settings.host}:{settings.port} stopped: {exc}", 1) from None


# -- history and replay ---------------------------------------------------------------------

history_cli = typer.Typer(
    help="History queries over the outbox DB (safe while the server runs).",
    invoke_without_command=True,
    rich_markup_mode=None,
)
cli.add_typer(history_cli, name="history")

DbOpt = Annotated[str | None, _opt("Outbox DB (default: the one for INBOX).", "--db")]
InboxOpt = Annotated[
    str | None, _opt("Inbox directory (INBOX): its DB, unless --db says.", "--inbox")
]
ReplayToOpt = Annotated[
    str | None,
    _opt("Write the files here (default: INBOX). The DB is still --db/INBOX's.", "--inbox"),
]
ContextOpt = Annotated[str | None, _opt("Only this context_id.", "--context-id")]
SinceOpt = Annotated[str | None, _opt("Received at or after: 90s, 2h, 3d or ISO time.", "--since")]
UntilOpt = Annotated[str | None, _opt("Received at or before: 90s, 2h, 3d or ISO time.", "--until")]
StateOpt = Annotated[
    str | None,
    _opt("pending, written, failed, duplicate, awaiting-backend or undeliverable.", "--state"),
]
SearchOpt = Annotated[str | None, _opt("Text in the person's prompt.", "--search")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="table, json, jsonl or csv. Table and text show control characters escaped; "
        "json/jsonl are exact; csv cells starting with = + - @ tab or CR get a leading ' "
        "so spreadsheets do not run them as formulas (as OWASP recommends).",
    ),
]
DocFormatOpt = Annotated[str, typer.Option("--format", help="text or json.")]
DOC_FORMATS = ("text", "json")


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """`history | head -1`: a reader that stops reading is not an error; exit 0 quietly.
    (stdout is pointed at /dev/null so the interpreter's flush at exit does not fail.)"""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


@contextmanager
def history_session(
    config: str | None, db: str | None, inbox: str | None = None
) -> Iterator[tuple[Settings, Any]]:
    """Settings and a read-only History of the DB; any HistoryError becomes one line, exit 2."""
    from .history import History

    settings = settings_or_exit(config, {"db": db, "inbox": inbox})
    try:
        audit = History(settings.db_path)
    except HistoryError as exc:
        raise fail(str(exc)) from None
    try:
        yield settings, audit
    except HistoryError as exc:
        raise fail(str(exc)) from None
    finally:
        audit.close()


MAX_LIMIT = 1_000_000_000
NEXT_WAIT_MAX_S = 7 * 86400


def make_selection(
    context_id: str | None,
    since: str | None,
    until: str | None,
    state: str | None,
    search: str | None,
    limit: int | None,
    ids: list[str] | None = None,
) -> Any:
    from .history import STATES, Selection, parse_when

    if limit is not None and not 0 <= limit <= MAX_LIMIT:
        raise fail(f"--limit must be 0 (no limit) to {MAX_LIMIT:,}, got {limit}")
    if state and state not in STATES:
        raise fail(f"unknown --state {state!r}: use one of {', '.join(STATES)}")
    try:
        return Selection(
            context_id=context_id,
            since_ms=parse_when(since) if since else None,
            until_ms=parse_when(until) if until else None,
            state=state,
            search=search,
            ids=list(ids or []),
            limit=limit or None,
        )
    except HistoryError as exc:
        raise fail(str(exc)) from None


def inherited(
    ctx: typer.Context, config: str | None, db: str | None, inbox: str | None
) -> tuple[str | None, str | None, str | None]:
    """`history --db X show ID` and `history show ID --db X` both work."""
    parent = ctx.obj or {}
    return (
        config or parent.get("config"),
        db or parent.get("db"),
        inbox or parent.get("inbox"),
    )


def check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise fail(f"unknown --format {fmt!r}: use one of {', '.join(allowed)}")


@history_cli.callback()
def history(
    ctx: typer.Context,
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: InboxOpt = None,
    context_id: ContextOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    state: StateOpt = None,
    search: SearchOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Newest N rows (0 = all).")] = 50,
    unanswered: Annotated[
        bool, typer.Option("--unanswered", help="Only those not yet replied to or done.")
    ] = False,
    fmt: FormatOpt = "table",
) -> None:
    """List recorded requests, newest first."""
    if ctx.invoked_subcommand is not None:
        # `show` and `stats` take no filters: refused, rather than silently not applied
        given = {
            "--context-id": context_id, "--since": since, "--until": until, "--state": state,
            "--search": search, "--unanswered": unanswered or None,
            "--limit": None if limit == 50 else limit, "--format": None if fmt == "table" else fmt,
        }  # fmt: skip
        if named := [flag for flag, value in given.items() if value is not None]:
            raise fail(
                f"history {ctx.invoked_subcommand} takes no {', '.join(named)}: give it after"
                f" the sub-command where it applies (history {ctx.invoked_subcommand} --help)"
            )
        ctx.obj = {"config": config, "db": db, "inbox": inbox}
        return
    from .history_render import FORMATS, write_records

    check_format(fmt, FORMATS)
    selection = make_selection(context_id, since, until, state, search, limit)
    selection.unanswered = unanswered
    with history_session(config, db, inbox) as (_, audit), reader_may_leave():
        write_records(audit.records(selection), fmt)


@history_cli.command("show")
def history_show(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="Request id, 8+ of its hex digits, or file.")],
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: InboxOpt = None,
    fmt: DocFormatOpt = "text",
) -> None:
    """Everything about one request: body, backend reply or error, inbox file, attempts."""
    from .history_render import write_document

    check_format(fmt, DOC_FORMATS)
    with history_session(*inherited(ctx, config, db, inbox)) as (settings, audit):
        doc = audit.show(request_id)
    if doc["inbox_file"]:
        doc["inbox_path"] = str(settings.inbox / doc["inbox_file"])
    raw = doc.pop("body")  # last: it is by far the longest part
    if fmt == "json":
        doc["body"] = body_for_json(raw)
    else:
        doc["body"] = f"{len(raw):,} bytes (--format json shows it)"
    with reader_may_leave():
        write_document(doc, fmt)


def body_for_json(raw: bytes) -> Any:
    """The stored body as JSON; one no parser here can read comes back as its text."""
    from .bodies import loads

    try:
        return loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")


@history_cli.command("stats")
def history_stats(
    ctx: typer.Context,
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: InboxOpt = None,
    fmt: DocFormatOpt = "text",
) -> None:
    """Counts by state, backlog, request->file latency percentiles, top contexts."""
    from .history_render import write_document

    check_format(fmt, DOC_FORMATS)
    with history_session(*inherited(ctx, config, db, inbox)) as (_, audit), reader_may_leave():
        write_document(audit.stats(), fmt)


@cli.command()
def replay(
    ids: Annotated[list[str] | None, typer.Argument(help="Request ids to rewrite.")] = None,
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: ReplayToOpt = None,
    context_id: ContextOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    state: StateOpt = None,
    search: SearchOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Only the newest N (0 = all).")] = 0,
    all_rows: Annotated[bool, typer.Option("--all", help="Every row in the DB.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Write compact payloads in full.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, write nothing.")] = False,
) -> None:
    """Rewrite inbox files from the DB: same names and content as the flusher writes."""
    from .replay import replay_rows

    # --inbox names where the files go, not which server's DB to read (that is --db, or the
    # DB of the configured INBOX): `replay --full ID --inbox /tmp/full` must not look for
    # a DB belonging to /tmp/full.
    with history_session(config, db) as (settings, audit), reader_may_leave():
        if inbox is not None:
            settings = settings.model_copy(update={"inbox": Settings.expand_path(inbox)})
        resolved = [audit.resolve_id(i) for i in ids or []]
        selection = make_selection(context_id, since, until, state, search, limit, resolved)
        if selection.is_empty() and not all_rows:
            raise fail("say what to replay: request ids, a filter (--since, --limit, ...) "
                       "or --all")  # fmt: skip
        try:
            report = replay_rows(audit, selection, settings, full=full, dry_run=dry_run)
        except BrokenPipeError:
            raise  # the listing's reader left (`| head`): not the target's fault
        except ReplayError as exc:
            raise fail(str(exc), 1) from None
        except OSError as exc:
            raise fail(f"cannot write to {settings.inbox}: {exc}", 1) from None
    typer.echo(report, err=True)


# -- the agent's side: next, reply, done --------------------------------------------------


@contextmanager
def replies_session(
    config: str | None, db: str | None, inbox: str | None
) -> Iterator[tuple[Settings, Any, Any]]:
    """Settings, the History (to resolve ids) and a read-write connection for replies."""
    from . import replies

    with history_session(config, db, inbox) as (settings, history):
        try:
            conn = replies.connect(settings.db_path)
        except HistoryError as exc:
            raise fail(str(exc)) from None
        try:
            yield settings, history, conn
        except sqlite3.Error as exc:
            raise fail(f"database {settings.db_path}: {exc}", 1) from None
        finally:
            conn.close()


@cli.command()
def reply(
    request_id: Annotated[str, typer.Argument(help="Request id (any unique part) or file name.")],
    message: Annotated[str | None, _opt("The reply text.", "--message", "-m")] = None,
    message_file: Annotated[
        str | None, _opt("Read the reply from this file ('-': standard input).", "--message-file")
    ] = None,
    reply_to: Annotated[
        bool, typer.Option("--reply-to", help="Thread it under the person's message.")
    ] = False,
    again: Annotated[
        bool, typer.Option("--again", help="Send even if the request was answered.")
    ] = False,
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: InboxOpt = None,
) -> None:
    """Send the reply to a request through `openclaw message send`, once: a second reply
    to an answered request is refused (exit 1) unless --again."""
    from . import replies

    if (message is None) == (message_file is None):
        raise fail("give the reply as --message TEXT or --message-file FILE ('-' for stdin)")
    if message_file is not None:
        try:
            raw = (
                sys.stdin.buffer.read() if message_file == "-" else Path(message_file).read_bytes()
            )
            text = raw.decode("utf-8")
        except OSError as exc:
            raise fail(f"cannot read {message_file}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise fail(
                f"{message_file} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    else:
        text = message or ""
    if not text.strip():
        raise fail("the reply is empty")
    with replies_session(config, db, inbox) as (settings, history, conn):
        rid = history.resolve_id(request_id)
        to = replies.target_of(conn, rid)
        try:
            replies.claim(conn, rid, text, again)
        except ReplyRefused as exc:
            raise fail(f"{exc}; not sent again (--again to send anyway)", 1) from None
        status, output = replies.send(settings.openclaw_bin, to, text, reply_to)
        replies.finish(conn, rid, status, settings.redact(output))
    if status != 0:
        from .printable import printable

        last = output.strip().splitlines()[-1] if output.strip() else f"exit status {status}"
        raise fail(f"reply to {rid} failed: {printable(last, one_line=True)} (try again later)", 1)
    typer.echo(f"replied to {rid} on {to.channel}:{to.target}", err=True)


@cli.command()
def done(
    request_id: Annotated[str, typer.Argument(help="Request id (any unique part) or file name.")],
    again: Annotated[bool, typer.Option("--again", help="Even if it was answered.")] = False,
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: InboxOpt = None,
) -> None:
    """Mark a request handled without a reply (no answer is needed)."""
    from . import replies

    with replies_session(config, db, inbox) as (_, history, conn):
        rid = history.resolve_id(request_id)
        try:
            replies.claim(conn, rid, None, again)
        except ReplyRefused as exc:
            raise fail(str(exc), 1) from None
    typer.echo(f"done: {rid}", err=True)


@cli.command("next")
def next_request(
    wait: Annotated[bool, typer.Option("--wait", help="Block until a request is waiting.")] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --wait: give up after SECONDS.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The short view as JSON.")] = False,
    full: Annotated[bool, typer.Option("--full", help="The inbox file, byte for byte.")] = False,
    path_only: Annotated[bool, typer.Option("--path", help="Print the file's path only.")] = False,
    config: ConfigOpt = None,
    db: DbOpt = None,
    inbox: InboxOpt = None,
) -> None:
    """The oldest request not yet replied to or done, in short: id, file, sender, words
    (exit 3 if there is none)."""
    from . import replies
    from .agent_view import agent_view, render_text
    from .inbox import render
    from .printable import json_safe

    if timeout is not None:
        try:
            check_seconds(timeout, 0, NEXT_WAIT_MAX_S)
        except ValueError as exc:
            raise fail(f"--timeout {timeout}: {exc}") from None
    with replies_session(config, db, inbox) as (settings, history, conn):
        found = (
            replies.wait_for_unanswered(conn, timeout) if wait else replies.oldest_unanswered(conn)
        )
        if found is None:
            raise fail("no request is waiting for a reply", 3)
        selection = make_selection(None, None, None, None, None, None, [found])
        ((row, _),) = list(history.pending_rows(selection))
        earlier = replies.earlier_requests(conn, row.context_id, row.seq)
    path = settings.inbox / row.inbox_file
    with reader_may_leave():
        if path_only:
            typer.echo(str(path))
        elif full:  # the file's bytes, from the DB: the agent may have moved the file already
            sys.stdout.write(render(row, settings).decode())
        else:
            view = agent_view(row, path, time.time() - row.received_ms / 1000, earlier)
            sys.stdout.write(
                json_safe(json.dumps(view, ensure_ascii=False)) + "\n"
                if as_json
                else render_text(view)
            )
        sys.stdout.flush()


# -- running as a service -------------------------------------------------------------------

service_cli = typer.Typer(
    help="Run the proxy as a user service (systemd on Linux, launchd on macOS).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
cli.add_typer(service_cli, name="service")
ManagerOpt = Annotated[
    str | None, typer.Option("--manager", help="systemd or launchd (default: this OS's).")
]


def _manager(name: str | None) -> str:
    from .service import manager

    chosen = name or manager()
    if chosen not in ("systemd", "launchd"):
        raise fail(f"unknown --manager {chosen!r}: use systemd or launchd")
    return chosen


def _call(argv: list[str]) -> tuple[bool, str]:
    from .service import run

    done = run(argv)
    text = (done.stdout + done.stderr).strip()
    return done.returncode == 0, text


@service_cli.command("install")
def service_install(config: ConfigOpt = None, manager_name: ManagerOpt = None) -> None:
    """Install and start the service with the settings in force now (config file,
    AI_AGENT_PROXY_* environment), written to a config file only you can read."""
    from . import service

    settings = settings_or_exit(config, {})
    chosen = _manager(manager_name)
    conf = service.service_config_path()
    service.write_private(conf, service.config_text(settings))
    argv = service.command(conf)
    typer.echo(f"settings written to {conf} (mode 0600; the service reads them from there)")
    if chosen == "launchd":
        plist = service.plist_path()
        log_path = Path.home() / "Library" / "Logs" / "ai-agent-proxy.log"
        plist.parent.mkdir(parents=True, exist_ok=True)
        plist.write_text(service.plist_text(argv, log_path))
        ok, out = _call(["launchctl", "load", "-w", str(plist)])
        if not ok:
            raise fail(f"launchctl load {plist} failed: {out}", 1)
        typer.echo(f"launchd agent {service.LABEL} installed ({plist}) and started")
        return
    missing = service.systemd_missing()
    unit = service.unit_text(argv)
    if missing:
        typer.echo(unit)
        raise fail(
            f"cannot install the service: {missing}. The unit is printed above: place it in "
            f"{service.unit_path()} on a machine with a systemd user session, or run "
            "`ai-agent-proxy` under your own supervisor",
            1,
        )
    path = service.unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit)
    for argv_ in (["systemctl", "--user", "daemon-reload"],
                  ["systemctl", "--user", "enable", "--now", service.UNIT]):  # fmt: skip
        ok, out = _call(argv_)
        if not ok:
            raise fail(f"{' '.join(argv_)} failed: {out}", 1)
    typer.echo(f"systemd user unit {service.UNIT} installed ({path}), enabled and started")
    hint = service.linger_hint()
    if hint:
        typer.echo(hint)


@service_cli.command("uninstall")
def service_uninstall(manager_name: ManagerOpt = None) -> None:
    """Stop the service and remove its unit (the settings file stays)."""
    from . import service

    if _manager(manager_name) == "launchd":
        plist = service.plist_path()
        _call(["launchctl", "unload", "-w", str(plist)])
        plist.unlink(missing_ok=True)
        typer.echo(f"launchd agent {service.LABEL} removed")
        return
    _call(["systemctl", "--user", "disable", "--now", service.UNIT])
    service.unit_path().unlink(missing_ok=True)
    _call(["systemctl", "--user", "daemon-reload"])
    typer.echo(f"systemd user unit {service.UNIT} removed")


def _service_verb(verb: str, manager_name: str | None) -> None:
    from . import service

    if _manager(manager_name) == "launchd":
        verbs = {"start": ["start"], "stop": ["stop"], "restart": ["kickstart", "-k"]}[verb]
        target = service.LABEL if verb != "restart" else f"gui/{os.getuid()}/{service.LABEL}"
        ok, out = _call(["launchctl", *verbs, target])
    else:
        ok, out = _call(["systemctl", "--user", verb, service.UNIT])
    if not ok:
        raise fail(f"{verb} failed: {out}", 1)
    typer.echo(f"{verb}: done")


@service_cli.command("start")
def service_start(manager_name: ManagerOpt = None) -> None:
    """Start the installed service."""
    _service_verb("start", manager_name)


@service_cli.command("stop")
def service_stop(manager_name: ManagerOpt = None) -> None:
    """Stop the service."""
    _service_verb("stop", manager_name)


@service_cli.command("restart")
def service_restart(manager_name: ManagerOpt = None) -> None:
    """Restart the service."""
    _service_verb("restart", manager_name)


@service_cli.command("status")
def service_status(config: ConfigOpt = None, manager_name: ManagerOpt = None) -> None:
    """The service manager's view and the running server's /readyz; exit 0 when both are
    well."""
    import httpx

    from . import service
    from .printable import printable

    conf = service.service_config_path()
    settings = settings_or_exit(config or (str(conf) if conf.is_file() else None), {})
    if _manager(manager_name) == "launchd":
        active, out = _call(["launchctl", "list", service.LABEL])
    else:
        active, out = _call(["systemctl", "--user", "is-active", service.UNIT])
        _, detail = _call(["systemctl", "--user", "status", service.UNIT, "--no-pager",
                           "--lines=0"])  # fmt: skip
        out = detail or out
    typer.echo("service: " + ("active" if active else "not active"))
    for line in out.splitlines()[:8]:
        typer.echo("  " + printable(line, one_line=True))
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}/readyz"
    headers = {"authorization": f"Bearer {settings.key}"} if settings.key else {}
    try:
        answer = httpx.get(url, headers=headers, timeout=3)
        report = answer.json()
        ready = answer.status_code == 200
    except (httpx.HTTPError, ValueError) as exc:
        report, ready = {"error": f"{type(exc).__name__}: {exc}"}, False
    typer.echo(f"server {url}: " + ("ready" if ready else "not ready"))
    for key, value in report.items():
        typer.echo(f"  {key}: {printable(value, one_line=True)}")
    if not (active and ready):
        raise typer.Exit(1)


SUBCOMMANDS = {"serve", "history", "replay", "reply", "done", "next", "service"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # Plain `ai-agent-proxy [flags]` means `ai-agent-proxy serve [flags]`.
    if not args or (args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h")):
        args.insert(0, "serve")
    try:
        cli(args, prog_name="ai-agent-proxy")
    except ProxyError as exc:  # one not turned into a message where it happened
        typer.echo(f"ai-agent-proxy: {exc}", err=True)
        sys.exit(2)
