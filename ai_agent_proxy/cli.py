"""Command line, a table of contents: `serve` (the default), `history` (`show`, `stats`),
`replay`, the agent's `next`/`reply`/`done`, `mcp`, `agent`, `service`, `setup`, `doctor`.
Each command parses its arguments, calls into the module that does the work and prints;
options and shared helpers are in cli_parts.py.

Every failure the user can cause (bad config, unusable DB, port taken) ends as one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from . import cli_parts as parts
from .cli_agent import agent_cli
from .cli_service import service_cli
from .cli_setup import register as register_setup
from .config import Settings, check_seconds, load_settings
from .errors import NewerMessagesWait, ProxyError, ReplyRefused
from .logs import setup_logging
from .printable import printable

cli = parts.ProxyTyper(
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


def serve(config: str | None = None, **flags: Any) -> None:
    """Run the server (the default command)."""
    settings = load_settings(config, flags)
    setup_logging(settings.debug)
    from .startup import serve as start

    start(settings, config)


serve.__signature__ = parts.serve_signature()  # type: ignore[attr-defined]
cli.command()(serve)


# -- history and replay ---------------------------------------------------------------------

history_cli = parts.ProxyTyper(
    help="History queries over the outbox DB (safe while the server runs).",
    invoke_without_command=True,
    rich_markup_mode=None,
)
cli.add_typer(history_cli, name="history")


@contextmanager
def history_session(
    config: str | None, db: str | None, inbox: str | None = None
) -> Iterator[tuple[Settings, Any]]:
    """Settings and a read-only History of the DB."""
    from .history import History

    settings = load_settings(config, {"db": db, "inbox": inbox})
    audit = History(settings.db_path)
    try:
        yield settings, audit
    finally:
        audit.close()


@history_cli.callback()
def history(
    ctx: typer.Context,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
    context_id: parts.ContextOpt = None,
    since: parts.SinceOpt = None,
    until: parts.UntilOpt = None,
    state: parts.StateOpt = None,
    search: parts.SearchOpt = None,
    limit: parts.HistoryLimitOpt = 50,
    unanswered: parts.UnansweredOpt = False,
    fmt: parts.FormatOpt = "table",
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
            raise parts.fail(
                f"history {ctx.invoked_subcommand} takes no {', '.join(named)}: give it after"
                f" the sub-command where it applies (history {ctx.invoked_subcommand} --help)"
            )
        ctx.obj = {"config": config, "db": db, "inbox": inbox}
        return
    from .history import Selection
    from .history_render import FORMATS, write_records

    parts.check_format(fmt, FORMATS)
    with history_session(config, db, inbox) as (_, audit), parts.reader_may_leave():
        selection = Selection.of_filters(context_id, since, until, state, search, limit)
        selection.unanswered = unanswered
        write_records(audit.records(selection), fmt)


@history_cli.command("show")
def history_show(
    ctx: typer.Context,
    request_id: parts.RequestIdArg,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
    fmt: parts.DocFormatOpt = "text",
) -> None:
    """Everything about one request: body, backend reply or error, inbox file, attempts."""
    from .history_render import write_document

    parts.check_format(fmt, ("text", "json"))
    with history_session(*parts.inherited(ctx, config, db, inbox)) as (settings, audit):
        doc = audit.document(request_id, settings.inbox, body_as_json=fmt == "json")
    with parts.reader_may_leave():
        write_document(doc, fmt)


@history_cli.command("stats")
def history_stats(
    ctx: typer.Context,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
    fmt: parts.DocFormatOpt = "text",
) -> None:
    """Counts by state, backlog, request->file latency percentiles (the newest 100,000),
    top contexts."""
    from .history_render import write_document

    parts.check_format(fmt, ("text", "json"))
    with (
        history_session(*parts.inherited(ctx, config, db, inbox)) as (_, audit),
        parts.reader_may_leave(),
    ):
        write_document(audit.stats(), fmt)


@cli.command()
def replay(
    ids: parts.IdsArg = None,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.ReplayToOpt = None,
    context_id: parts.ContextOpt = None,
    since: parts.SinceOpt = None,
    until: parts.UntilOpt = None,
    state: parts.StateOpt = None,
    search: parts.SearchOpt = None,
    limit: parts.ReplayLimitOpt = 0,
    all_rows: parts.AllOpt = False,
    full: parts.FullPayloadOpt = False,
    dry_run: parts.DryRunOpt = False,
) -> None:
    """Rewrite inbox files from the DB: same names and content as the flusher writes."""
    from .history import Selection
    from .replay import replay_rows

    # --inbox names where the files go, not which server's DB to read (that is --db, or the
    # DB of the configured INBOX): `replay --full ID --inbox /tmp/full` must not look for
    # a DB belonging to /tmp/full.
    with history_session(config, db) as (settings, audit), parts.reader_may_leave():
        if inbox is not None:
            settings = settings.model_copy(update={"inbox": Settings.expand_path(inbox)})
        resolved = [audit.resolve_id(i) for i in ids or []]
        selection = Selection.of_filters(context_id, since, until, state, search, limit, resolved)
        if selection.is_empty() and not all_rows:
            raise parts.fail("say what to replay: request ids, a filter (--since, --limit, ...) "
                       "or --all")  # fmt: skip
        try:
            report = replay_rows(audit, selection, settings, full=full, dry_run=dry_run)
        except BrokenPipeError:
            raise  # the listing's reader left (`| head`): not the target's fault
        except OSError as exc:
            raise parts.fail(f"cannot write to {settings.inbox}: {exc}", 1) from None
    typer.echo(report, err=True)


# -- the agent's side: next, reply, done ---------------------------------------------------


@contextmanager
def replies_session(
    config: str | None, db: str | None, inbox: str | None
) -> Iterator[tuple[Settings, Any, Any]]:
    """Settings, the History (to resolve ids) and a read-write connection for replies;
    their errors one line."""
    from .agent import replies

    settings = load_settings(config, {"db": db, "inbox": inbox})
    try:
        with replies.session(settings.db_path) as (history, conn):
            yield settings, history, conn
    except sqlite3.Error as exc:
        raise parts.fail(f"database {settings.db_path}: {exc}", 1) from None


@cli.command()
def reply(
    request_id: parts.RequestIdArg,
    message: parts.MessageOpt = None,
    message_file: parts.MessageFileOpt = None,
    reply_to: parts.ReplyToOpt = False,
    anyway: parts.AnywayOpt = False,
    again: parts.AgainOpt = False,
    taker: parts.AsOpt = None,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """Answer a request and the earlier waiting messages of its conversation, once, through
    OpenClaw's gateway (or `openclaw message send` when it cannot be reached). Refused while
    newer messages wait (exit 4: they are printed), and for an answered request (exit 1)
    unless --again."""
    from .agent import replies, views

    if (message is None) == (message_file is None):
        raise parts.fail("give the reply as --message TEXT or --message-file FILE ('-' for stdin)")
    text = message if message_file is None else parts.read_text_file(message_file)
    if not (text or "").strip():
        raise parts.fail("the reply is empty")
    with replies_session(config, db, inbox) as (settings, history, conn):
        rid = history.resolve_id(request_id)
        try:
            with parts.signals_deferred():
                done_ = replies.reply(conn, settings, rid, text or "", reply_to=reply_to,
                                      again=again, anyway=anyway, taker=taker)  # fmt: skip
        except NewerMessagesWait as exc:
            shown = [views.message_view(m, settings.inbox, time.time()) for m in exc.newer]
            sys.stdout.write(views.render_newer(rid, shown))
            raise parts.fail(f"{exc}; reply to the newest, or --anyway", 4) from None
        except ReplyRefused as exc:
            raise parts.fail(f"{exc}; not sent again (--again to send anyway)", 1) from None
    to = done_.to
    assert to is not None
    where = printable(f"{to.channel}:{to.target}", one_line=True)  # (a stranger's chat id)
    also = f" and {len(done_.covered)} earlier" if done_.covered else ""
    typer.echo(f"replied to {rid}{also} on {where} ({replies.how(done_)})", err=True)
    if done_.note:
        typer.echo(done_.note, err=True)


@cli.command()
def done(
    request_id: parts.RequestIdArg,
    only: parts.OnlyOpt = False,
    again: parts.AgainOpt = False,
    taker: parts.AsOpt = None,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """Mark a request, and the earlier waiting messages of its conversation, handled
    without a reply (no answer is needed)."""
    from .agent import replies

    with replies_session(config, db, inbox) as (_, history, conn):
        rid = history.resolve_id(request_id)
        outcome = replies.done(conn, rid, only=only, again=again, taker=taker)
    also = f" and {len(outcome.covered)} earlier" if outcome.covered else ""
    typer.echo(f"done: {rid}{also}", err=True)


@cli.command("next")
def next_request(
    wait: parts.WaitOpt = False,
    timeout: parts.TimeoutOpt = None,
    as_json: parts.JsonOpt = False,
    full: parts.FullFileOpt = False,
    path_only: parts.PathOpt = False,
    taker: parts.AsOpt = None,
    lease: parts.LeaseOpt = "10m",
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """The oldest waiting conversation: every waiting message in arrival order, in short
    (exit 3 if none waits). With --as NAME it is yours for --lease."""
    from .agent import conversations, views
    from .history import Selection
    from .inbox import render
    from .printable import json_safe

    if timeout is not None:
        try:
            check_seconds(timeout, 0, 7 * 86400)  # (a week)
        except ValueError as exc:
            raise parts.fail(f"--timeout {timeout}: {exc}") from None
    lease_s = parts.duration("--lease", lease) or conversations.LEASE_S
    with replies_session(config, db, inbox) as (settings, history, conn):
        chat = conversations.wait_for(conn, taker, lease_s, timeout if wait else 0.0)
        if chat is None:
            raise parts.fail("no conversation is waiting for a reply", 3)
        view = views.conversation_view(chat, settings.inbox, time.time())
        if full:  # the files' bytes, from the DB: the agent may have moved them already
            ids = [m.request_id for m in chat.messages]
            rows = history.pending_rows(Selection(ids=ids))
            out = "".join(render(row, settings).decode() for row, _ in rows)
    if path_only:
        out = "".join(m["inbox_file"] + "\n" for m in view["messages"])
    elif as_json:
        out = json_safe(json.dumps(view, ensure_ascii=False)) + "\n"
    elif not full:
        out = views.render_conversation(view)
    with parts.reader_may_leave():
        sys.stdout.write(out)
        sys.stdout.flush()


@cli.command("mcp")
def mcp_server(
    config: parts.ConfigOpt = None, db: parts.DbOpt = None, inbox: parts.InboxOpt = None
) -> None:
    """The agent's loop as MCP tools over stdio (next_message, reply, mark_done,
    show_request, search_history), for any agent that speaks MCP."""
    import anyio

    from .agent.mcp_server import Tools, build, serve_stdio

    settings = load_settings(config, {"db": db, "inbox": inbox})
    setup_logging(settings.debug)  # to stderr: stdout is the protocol
    with history_session(config, db, inbox):  # the DB must exist and be ours
        pass
    tools = Tools(settings)
    anyio.run(serve_stdio, build(settings, tools), tools)


# -- the command groups of their own modules -----------------------------------------------

cli.add_typer(service_cli, name="service")
cli.add_typer(agent_cli, name="agent")
register_setup(cli)  # `setup`, `doctor`


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
