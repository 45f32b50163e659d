"""`ai-agent-proxy service ...`: the proxy (and the agent runner) as a user service beside
OpenClaw's gateway (systemd on Linux, launchd on macOS). Thin commands over service.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from . import cli_parts as parts
from .config import load_settings

service_cli = parts.ProxyTyper(
    help="Run the proxy as a user service (systemd on Linux, launchd on macOS).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _manager(name: str | None) -> str:
    from .service import manager

    chosen = name or manager()
    if chosen not in ("systemd", "launchd"):
        raise parts.fail(f"unknown --manager {chosen!r}: use systemd or launchd")
    return chosen


AgentOpt = Annotated[
    bool,
    typer.Option(
        "--agent",
        help="The agent runner's service (ai-agent-proxy agent), not the proxy's.",
    ),
]


@service_cli.command("install")
def service_install(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="With --agent: the agent's command, after `--` (or --preset).", show_default=False
        ),
    ] = None,
    agent: AgentOpt = False,
    preset: Annotated[
        str | None, parts.opt("With --agent: an agent CLI preset (claude, codex, ...).", "--preset")
    ] = None,
    agent_options: Annotated[
        str | None,
        parts.opt(
            "With --agent: more `ai-agent-proxy agent` options, as one string"
            " ('--parallel 3 --timeout 1h').",
            "--agent-options",
        ),
    ] = None,
    config: parts.ConfigOpt = None,
    manager_name: parts.ManagerOpt = None,
) -> None:
    """Install and start the service with the settings in force now (config file,
    AI_AGENT_PROXY_* environment), written to a config file only you can read. With
    --agent, the agent runner beside it: `service install --agent --preset claude`, or
    `service install --agent -- CMD ARGS...`; it runs from the current folder, with the
    current PATH."""
    from . import service

    settings = load_settings(config, {})
    runner = None
    if agent:
        runner = _runner(preset, agent_options, list(command or ()))
    elif preset or agent_options or command:
        raise parts.fail("--preset, --agent-options and a command go with --agent")
    parts.echo_lines(service.install(settings, _manager(manager_name), runner))


def _runner(preset: str | None, options: str | None, command: list[str]) -> Any:
    """The runner's service, its arguments checked by the `agent` command's own parser
    (an unknown option or a missing agent is said now, not by a service that fails)."""
    import shlex

    from .cli_agent import agent_cli
    from .service import Runner

    args = [*shlex.split(options or ""), *(["--preset", preset] if preset else [])]
    args += ["--", *command] if command else []
    group = typer.main.get_command(agent_cli)
    try:
        ctx = group.make_context("agent", list(args))
    except parts.UsageError as exc:
        raise parts.fail(f"--agent: {exc.format_message()}", 2) from None
    if (ctx.params["preset"] is None) == (not ctx.meta.get("agent_command")):
        raise parts.fail("--agent: say which agent: --preset NAME, or -- CMD ARGS...", 2)
    grace = parts.duration("--grace", ctx.params["grace"], 3600) or 0.0
    return Runner(tuple(args), Path.cwd(), os.environ.get("PATH", ""), grace)


@service_cli.command("uninstall")
def service_uninstall(agent: AgentOpt = False, manager_name: parts.ManagerOpt = None) -> None:
    """Stop the service and remove its unit (the settings file stays)."""
    from . import service

    parts.echo_lines(service.uninstall(_manager(manager_name), agent))


def _control(action: str, doc: str) -> None:
    """`service start|stop|restart`: one command each, all alike."""

    def command(agent: AgentOpt = False, manager_name: parts.ManagerOpt = None) -> None:
        from . import service

        parts.echo_lines(service.control(action, _manager(manager_name), agent))

    command.__doc__ = doc
    service_cli.command(action)(command)


_control("start", "Start the installed service.")
_control("stop", "Stop the service.")
_control("restart", "Restart the service.")


@service_cli.command("status")
def service_status(
    agent: AgentOpt = False, config: parts.ConfigOpt = None, manager_name: parts.ManagerOpt = None
) -> None:
    """The service manager's view and the running server's /readyz (with --agent: the
    runner's runs of the last day); exit 0 when all is well."""
    from . import service

    conf = service.service_config_path()
    settings = load_settings(config or (str(conf) if conf.is_file() else None), {})
    lines, well = service.status(settings, _manager(manager_name), agent)
    parts.echo_lines(lines)
    if not well:
        raise typer.Exit(1)
