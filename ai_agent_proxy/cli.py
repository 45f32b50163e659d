"""Command line: `ai-agent-proxy` (= `serve`), `history`, `replay`.

Every failure the user can cause (bad config, unusable DB, port taken) ends as one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
)
from .logs import setup_logging

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
    flags = {k: v for k, v in locals().items() if k != "config"}  # (before any other name)
    settings = settings_or_exit(config, flags)
    setup_logging(settings.debug)
    from .startup import serve as start

    try:
        start(settings)
    except ProxyError as exc:
        raise fail(str(exc), exc.exit_code) from None


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
    """Settings, the History (to resolve ids) and a read-write connection for replies;
    their errors one line."""
    from . import replies

    settings = settings_or_exit(config, {"db": db, "inbox": inbox})
    try:
        with replies.session(settings.db_path) as (history, conn):
            yield settings, history, conn
    except HistoryError as exc:
        raise fail(str(exc)) from None
    except sqlite3.Error as exc:
        raise fail(f"database {settings.db_path}: {exc}", 1) from None


def read_text_file(name: str) -> str:
    """A UTF-8 text file, or standard input for '-'; one line and exit 2 if it cannot be."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        return raw.decode("utf-8")
    except OSError as exc:
        raise fail(f"cannot read {name}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise fail(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


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
    text = message if message_file is None else read_text_file(message_file)
    if not (text or "").strip():
        raise fail("the reply is empty")
    with replies_session(config, db, inbox) as (settings, history, conn):
        rid = history.resolve_id(request_id)
        try:
            to = replies.reply(conn, settings, rid, text or "", reply_to, again)
        except ReplyRefused as exc:
            raise fail(f"{exc}; not sent again (--again to send anyway)", 1) from None
        except ProxyError as exc:
            raise fail(str(exc), exc.exit_code) from None
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


@cli.command("mcp")
def mcp_server(config: ConfigOpt = None, db: DbOpt = None, inbox: InboxOpt = None) -> None:
    """The agent's loop as MCP tools over stdio (next_message, reply, mark_done,
    show_request, search_history), for any agent that speaks MCP."""
    from .mcp_server import build

    settings = settings_or_exit(config, {"db": db, "inbox": inbox})
    setup_logging(settings.debug)  # to stderr: stdout is the protocol
    with history_session(config, db, inbox):  # the DB must exist and be ours
        pass
    build(settings).run("stdio")


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


def echo_lines(lines: Iterable[str]) -> None:
    """Print what a library function yields; its ProxyError is one line and its exit code."""
    try:
        for line in lines:
            typer.echo(line)
    except ProxyError as exc:
        raise fail(str(exc), exc.exit_code) from None


@service_cli.command("install")
def service_install(config: ConfigOpt = None, manager_name: ManagerOpt = None) -> None:
    """Install and start the service with the settings in force now (config file,
    AI_AGENT_PROXY_* environment), written to a config file only you can read."""
    from . import service

    settings = settings_or_exit(config, {})
    echo_lines(service.install(settings, _manager(manager_name)))


@service_cli.command("uninstall")
def service_uninstall(manager_name: ManagerOpt = None) -> None:
    """Stop the service and remove its unit (the settings file stays)."""
    from . import service

    echo_lines(service.uninstall(_manager(manager_name)))


@service_cli.command("start")
def service_start(manager_name: ManagerOpt = None) -> None:
    """Start the installed service."""
    from . import service

    echo_lines(service.control("start", _manager(manager_name)))


@service_cli.command("stop")
def service_stop(manager_name: ManagerOpt = None) -> None:
    """Stop the service."""
    from . import service

    echo_lines(service.control("stop", _manager(manager_name)))


@service_cli.command("restart")
def service_restart(manager_name: ManagerOpt = None) -> None:
    """Restart the service."""
    from . import service

    echo_lines(service.control("restart", _manager(manager_name)))


@service_cli.command("status")
def service_status(config: ConfigOpt = None, manager_name: ManagerOpt = None) -> None:
    """The service manager's view and the running server's /readyz; exit 0 when both are
    well."""
    from . import service

    conf = service.service_config_path()
    settings = settings_or_exit(config or (str(conf) if conf.is_file() else None), {})
    lines, well = service.status(settings, _manager(manager_name))
    echo_lines(lines)
    if not well:
        raise typer.Exit(1)


def subcommands() -> set[str]:
    """The commands Typer knows (`serve` is the one run when none is named)."""
    named = {c.name or (c.callback.__name__ if c.callback else "") for c in cli.registered_commands}
    return named | {g.name for g in cli.registered_groups if g.name}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # Plain `ai-agent-proxy [flags]` means `ai-agent-proxy serve [flags]`.
    if not args or (args[0] not in subcommands() and args[0] not in ("--help", "-h")):
        args.insert(0, "serve")
    try:
        cli(args, prog_name="ai-agent-proxy")
    except ProxyError as exc:  # one not turned into a message where it happened
        typer.echo(f"ai-agent-proxy: {exc}", err=True)
        sys.exit(exc.exit_code)
