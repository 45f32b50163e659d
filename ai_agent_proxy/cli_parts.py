"""What cli.py's commands share: their options, named once (`serve` takes one flag per
setting, made from config.Settings' fields: a new setting is a new flag without an edit
here), and the few helpers every command uses (errors as one line, a reader that leaves)."""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import Settings
from .errors import ProxyError


def opt(help_: str, *names: str) -> Any:
    return typer.Option(*names, help=help_, show_default=False)


def switch(name: str, help_: str) -> Any:
    return typer.Option(name, help=help_)


ConfigOpt = Annotated[
    str | None,
    typer.Option("-f", "--config", help="Config file (default ./.ai-agent-proxy.conf)."),
]
DbOpt = Annotated[str | None, opt("Outbox DB (default: the one for INBOX).", "--db")]
InboxOpt = Annotated[
    str | None, opt("Inbox directory (INBOX): its DB, unless --db says.", "--inbox")
]
ReplayToOpt = Annotated[
    str | None,
    opt("Write the files here (default: INBOX). The DB is still --db/INBOX's.", "--inbox"),
]
ContextOpt = Annotated[str | None, opt("Only this context_id.", "--context-id")]
SinceOpt = Annotated[str | None, opt("Received at or after: 90s, 2h, 3d or ISO time.", "--since")]
UntilOpt = Annotated[str | None, opt("Received at or before: 90s, 2h, 3d or ISO time.", "--until")]
StateOpt = Annotated[
    str | None,
    opt("pending, written, failed, duplicate, awaiting-backend or undeliverable.", "--state"),
]
SearchOpt = Annotated[str | None, opt("Text in the person's prompt.", "--search")]
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
HistoryLimitOpt = Annotated[int, typer.Option("--limit", help="Newest N rows (0 = all).")]
UnansweredOpt = Annotated[bool, switch("--unanswered", "Only those not yet replied to or done.")]
RequestIdArg = Annotated[
    str, typer.Argument(help="Request id (any unique part, 8+ hex digits) or file name.")
]
# replay
IdsArg = Annotated[list[str] | None, typer.Argument(help="Request ids to rewrite.")]
ReplayLimitOpt = Annotated[int, typer.Option("--limit", help="Only the newest N (0 = all).")]
AllOpt = Annotated[bool, switch("--all", "Every row in the DB.")]
FullPayloadOpt = Annotated[bool, switch("--full", "Write compact payloads in full.")]
DryRunOpt = Annotated[bool, switch("--dry-run", "List, write nothing.")]
# reply, done, next
MessageOpt = Annotated[str | None, opt("The reply text.", "--message", "-m")]
MessageFileOpt = Annotated[
    str | None, opt("Read the reply from this file ('-': standard input).", "--message-file")
]
ReplyToOpt = Annotated[bool, switch("--reply-to", "Thread it under the person's message.")]
AgainOpt = Annotated[bool, switch("--again", "Even if the request was answered.")]
WaitOpt = Annotated[bool, switch("--wait", "Block until a conversation is waiting.")]
AsOpt = Annotated[
    str | None,
    opt("Take the conversation as NAME (a lease others' next skips; renewed by your next,"
        " reply and done --as NAME).", "--as"),
]  # fmt: skip
LeaseOpt = Annotated[
    str, typer.Option("--lease", help="With --as: how long the lease lasts (30s, 15m, 1h).")
]
AnywayOpt = Annotated[
    bool, switch("--anyway", "Even if newer messages of the conversation wait: answer up to"
                 " this one only (the newer ones stay waiting).")
]  # fmt: skip
OnlyOpt = Annotated[bool, switch("--only", "This request only, not the earlier waiting ones.")]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", help="With --wait: give up after SECONDS.")
]
JsonOpt = Annotated[bool, switch("--json", "The short view as JSON.")]
FullFileOpt = Annotated[
    bool, switch("--full", "The waiting messages' inbox files, byte for byte, one after another.")
]
PathOpt = Annotated[bool, switch("--path", "Print the files' paths only, one a line.")]
# service
ManagerOpt = Annotated[
    str | None, typer.Option("--manager", help="systemd or launchd (default: this OS's).")
]

FLAG_ALIASES = {"api_key": ("--api_key",)}  # (the spelling of the original package)


def flag_help(name: str, field: Any) -> str:
    """A setting's help: its description, its config key, and a short default."""
    default = field.default
    text = f"{default:g}" if isinstance(default, float) else str(default)
    shown = f", default {text}" if default and len(text) <= 30 else ""
    return f"{field.description} ({name.upper()}{shown})"


def serve_signature() -> inspect.Signature:
    """`serve`'s parameters: --config, then one flag per setting, named after it
    (`--max-body` for MAX_BODY), every value a string the settings validate."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("config", keyword, default=None, annotation=ConfigOpt)]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            option = typer.Option(f"{flag}/--no-{flag[2:]}", help=flag_help(name, field))
            annotation: Any = Annotated[bool | None, option]
        else:
            option = opt(flag_help(name, field), flag, *FLAG_ALIASES.get(name, ()))
            annotation = Annotated[str | None, option]
        params.append(inspect.Parameter(name, keyword, default=None, annotation=annotation))
    return inspect.Signature(params)


# -- helpers ------------------------------------------------------------------------------


class ProxyTyper(typer.Typer):
    """Typer whose commands end with any ProxyError as its one line on stderr and its exit
    code, so that no command needs to catch them."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapping(super().command(*args, **kwargs))

    def callback(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapping(super().callback(*args, **kwargs))

    @staticmethod
    def _wrapping(register: Any) -> Any:
        def decorator(func: Any) -> Any:
            @functools.wraps(func)
            def run(*a: Any, **kw: Any) -> Any:
                try:
                    return func(*a, **kw)
                except ProxyError as exc:
                    raise fail(str(exc), exc.exit_code) from None

            register(run)
            return func

        return decorator


# The error a command line's parse raises: click's UsageError, or since typer 0.2x that of
# typer's own copy of click (not exported by name, and not click's: `except
# click.UsageError` misses it). BadParameter's base either way.
UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"ai-agent-proxy: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """`history | head -1`: a reader that stops reading is not an error; exit 0 quietly.
    (stdout is pointed at /dev/null so the interpreter's flush at exit does not fail.)"""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


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


def duration(flag: str, text: str | float | None, high: float = 7 * 86400) -> float | None:
    """A duration option in seconds (None when not given); one line and exit 2 if bad."""
    if text is None:
        return None
    from .config import parse_duration

    try:
        return parse_duration(text, 0, high)
    except ValueError as exc:
        raise fail(f"{flag} {text}: {exc}") from None


def read_text_file(name: str) -> str:
    """A UTF-8 text file, or standard input for '-'; one line and exit 2 if it cannot be."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        return raw.decode("utf-8")
    except OSError as exc:
        raise fail(f"cannot read {name}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise fail(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block ends, then end the command (exit 128 + the
    signal): a reply stopped mid-send waits for the send it started and records its
    outcome, instead of leaving it 'sending' while the send goes on without it."""
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    kept = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler)
    if received:
        raise fail(f"stopped by {signal.Signals(received[0]).name} (what was begun is done)",
                   128 + received[0])  # fmt: skip


def echo_lines(lines: Iterable[str]) -> None:
    """Print what a library function yields, as it comes."""
    for line in lines:
        typer.echo(line)
