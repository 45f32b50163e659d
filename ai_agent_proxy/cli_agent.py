"""`ai-agent-proxy agent ...`: the agent runner (agent/runner/) and its records. Thin
commands: options in, one library call, output out.

    ai-agent-proxy agent --preset claude           # run Claude Code on each waiting chat
    ai-agent-proxy agent [OPTIONS] -- CMD ARGS...  # any command (the prompt on stdin)
    ai-agent-proxy agent runs [filters]            # the runs, newest first
    ai-agent-proxy agent stop RUN|CONTEXT          # stop a run (its whole process group)
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from . import cli_parts as parts
from .config import load_settings
from .logs import setup_logging


class AgentGroup(TyperGroup):
    """`agent` takes its own command after `--` (`agent --parallel 3 -- claude -p`): that
    part is set apart (in ctx.meta) before the group parses the rest, so that its first
    word is never taken for a sub-command's name."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["agent_command"] = args[cut + 1 :]
            args = args[:cut]
        return super().parse_args(ctx, args)


agent_cli = parts.ProxyTyper(
    cls=AgentGroup,
    help="Run your agent CLI on each waiting conversation (ai-agent-proxy agent --preset"
    " claude, or -- CMD ARGS...); `agent runs` lists the runs, `agent stop` stops one.",
    invoke_without_command=True,
    rich_markup_mode=None,
)

Duration = Annotated[str, typer.Option(help="30s, 15m, 1h or seconds.")]
PRESETS = ("claude", "codex", "opencode", "gemini")


@agent_cli.callback()
def agent(
    ctx: typer.Context,
    preset: Annotated[
        str | None,
        parts.opt(f"An agent CLI you use, ready to go: {', '.join(PRESETS)}.", "--preset"),
    ] = None,
    preset_args: Annotated[
        str | None,
        parts.opt(
            "More flags for the preset's CLI, as one string (its tool permissions are yours to"
            " give: e.g. '--allowedTools Bash').",
            "--preset-args",
        ),
    ] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Conversations at once.")] = 2,
    debounce: Annotated[
        str,
        typer.Option(
            "--debounce",
            help="Quiet time after a conversation's newest message before its run"
            " (a burst is one run): 30s, 15m, 1h or seconds.",
        ),
    ] = "1s",
    timeout: Annotated[str, typer.Option("--timeout", help="A run's time limit.")] = "30m",
    idle_timeout: Annotated[
        str | None,
        parts.opt("Stop a run after this long without output (off by default).", "--idle-timeout"),
    ] = None,
    grace: Annotated[
        str,
        typer.Option(
            "--grace",
            help="Between SIGTERM and SIGKILL for a run; how long running runs get"
            " when the runner stops.",
        ),
    ] = "30s",
    attempts: Annotated[
        int,
        typer.Option(
            "--attempts",
            help="Runs for the same messages before the conversation is set aside"
            " (until a new message).",
        ),
    ] = 2,
    retry_after: Annotated[
        str,
        typer.Option(
            "--retry-after",
            help="Wait before trying a failed conversation again (doubled each time).",
        ),
    ] = "15s",
    send_output: Annotated[
        bool | None,
        typer.Option(
            "--send-output/--no-send-output",
            help="Send the CLI's final answer as the reply when"
            " the run did not reply itself (default: on for presets, off for a command).",
        ),
    ] = None,
    workdir: Annotated[str | None, parts.opt("Run there (default: here).", "--workdir")] = None,
    prompt_template: Annotated[
        str | None,
        parts.opt(
            "A prompt template file ($messages, $newest_request_id, $how_to_answer, ...).",
            "--prompt-template",
        ),
    ] = None,
    name: Annotated[
        str | None,
        parts.opt("This runner's name in leases and records (default runner@HOST).", "--name"),
    ] = None,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """Run an agent CLI on each waiting conversation, one run per chat at a time."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "db": db, "inbox": inbox}
        return
    from .agent.runner.command import parse_preset_args
    from .agent.runner.options import Options
    from .agent.runner.scheduler import Runner

    command = tuple(ctx.meta.get("agent_command") or ())
    if (preset is None) == (not command):
        raise parts.fail("say which agent: --preset " + "|".join(PRESETS) + ", or -- CMD ARGS...")
    if preset is not None and preset not in PRESETS:
        raise parts.fail(f"unknown --preset {preset!r}: use one of {', '.join(PRESETS)}")
    for flag, value, low in (("--parallel", parallel, 1), ("--attempts", attempts, 1)):
        if not low <= value <= 64:
            raise parts.fail(f"{flag} must be from {low} to 64, got {value}")
    settings = load_settings(config, {"db": db, "inbox": inbox})
    setup_logging(settings.debug)
    template = None if prompt_template is None else parts.read_text_file(prompt_template)
    options = Options(
        command=command, preset=preset, preset_args=parse_preset_args(preset_args),
        parallel=parallel, debounce_s=parts.duration("--debounce", debounce, 3600) or 0.0,
        timeout_s=parts.duration("--timeout", timeout, 7 * 86400) or 1.0,
        idle_timeout_s=parts.duration("--idle-timeout", idle_timeout, 86400),
        grace_s=parts.duration("--grace", grace, 3600) or 0.0, attempts=attempts,
        retry_after_s=parts.duration("--retry-after", retry_after, 86400) or 0.0,
        send_output=preset is not None if send_output is None else send_output,
        workdir=Path(workdir).absolute() if workdir else Path.cwd(),
        prompt_template=template, **({"name": name} if name else {}),
    )  # fmt: skip
    if not options.workdir.is_dir():
        raise parts.fail(f"--workdir {options.workdir} is not a directory")
    from .history import History

    History(settings.db_path).close()  # the DB must exist and be ours: one line if not
    import asyncio  # (here: the other commands start faster without it)

    asyncio.run(_serve(Runner(settings, options)))


async def _serve(runner: Any) -> None:
    """Run until SIGTERM or SIGINT (then: no new runs, the running ones get the grace)."""
    import asyncio

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runner.stop)
    await runner.run()


@agent_cli.command("runs")
def agent_runs(
    ctx: typer.Context,
    context_id: parts.ContextOpt = None,
    since: parts.SinceOpt = None,
    until: parts.UntilOpt = None,
    outcome: Annotated[
        str | None,
        parts.opt(
            "answered, partly, held, unanswered, failed, timed_out, idle, stopped,"
            " interrupted or running.",
            "--outcome",
        ),
    ] = None,
    limit: parts.HistoryLimitOpt = 50,
    fmt: parts.FormatOpt = "table",
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """The runs, newest first: when, on which conversation, how they ended and why."""
    from .agent.replies import session
    from .agent.runner import runs
    from .history import parse_when
    from .history_render import FORMATS, RUN_COLUMNS, write_records, write_runs_table

    parts.check_format(fmt, FORMATS)
    known = {o.value for o in runs.Outcome} | {"running"}
    if outcome is not None and outcome not in known:
        raise parts.fail(f"unknown --outcome {outcome!r}: use one of {', '.join(sorted(known))}")
    settings = load_settings(*_inherited(ctx, config, db, inbox))
    with session(settings.db_path) as (_, conn), parts.reader_may_leave():
        found = runs.listed(
            conn, conversation=context_id, outcome=outcome, limit=limit or None,
            since_ms=parse_when(since) if since else None,
            until_ms=parse_when(until) if until else None,
        )  # fmt: skip
        write_records(found, fmt, columns=RUN_COLUMNS, table=write_runs_table)


@agent_cli.command("stop")
def agent_stop(
    ctx: typer.Context,
    which: Annotated[str, typer.Argument(help="A run id (8+ hex digits of it) or a context_id.")],
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """Stop a run now (its whole process group): it is recorded as stopped, and its
    conversation is tried again only once a new message arrives or its backoff ends."""
    from .agent.replies import session
    from .agent.runner import launch, runs

    settings = load_settings(*_inherited(ctx, config, db, inbox))
    with session(settings.db_path) as (_, conn):
        found = runs.request_stop(conn, which)
    if not found:
        raise parts.fail(f"no running run is {which!r} (agent runs --outcome running)", 1)
    for row in found:
        if row["pid"] is not None and launch.started_at(row["pid"]) == row["pid_started"]:
            launch.signal_group(row["pid"], signal.SIGTERM)
        typer.echo(f"stopping run {row['id']} ({row['conversation']})", err=True)


def _inherited(
    ctx: typer.Context, config: str | None, db: str | None, inbox: str | None
) -> tuple[str | None, dict[str, str | None]]:
    config, db, inbox = parts.inherited(ctx, config, db, inbox)
    return config, {"db": db, "inbox": inbox}
