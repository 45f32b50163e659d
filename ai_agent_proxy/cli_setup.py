"""`ai-agent-proxy setup` and `ai-agent-proxy doctor`: the first five minutes (SPEC section
9). Thin commands over openclaw_setup.py and doctor.py."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from . import cli_parts as parts
from .config import load_settings


def register(cli: typer.Typer) -> None:
    cli.command()(setup)
    cli.command()(doctor)


def setup(
    provider: Annotated[
        str, typer.Option("--provider", help="The provider's name in OpenClaw's config.")
    ] = "ai-agent-proxy",
    default_model: Annotated[
        bool,
        typer.Option("--default-model", help="Make it the agents' model (agents.defaults)."),
    ] = False,
    dm_scope: Annotated[
        bool,
        typer.Option("--dm-scope", help="A session per person's chat (session.dmScope)."),
    ] = False,
    install_service: Annotated[
        bool, typer.Option("--service", help="Also install the proxy as a user service.")
    ] = False,
    agent_preset: Annotated[
        str | None,
        parts.opt("With --service: the agent runner's service too, with this preset.", "--agent"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would change; change nothing.")
    ] = False,
    config: parts.ConfigOpt = None,
    manager_name: parts.ManagerOpt = None,
) -> None:
    """Hook the proxy into OpenClaw: a settings file with a random KEY (if missing), the
    provider in OpenClaw's config through its own CLI (validated), and optionally the
    agents' model, one session per chat, the services. Safe to run twice."""
    from .errors import SetupFailed
    from .openclaw_setup import Plan, default_file
    from .openclaw_setup import setup as run_setup

    if agent_preset and not install_service:
        raise parts.fail("--agent goes with --service")
    plan = Plan(default_file(config), provider, default_model, dm_scope, dry_run)
    try:
        parts.echo_lines(run_setup(plan))
    except SetupFailed as exc:
        raise parts.fail(str(exc), 1) from None
    if install_service and not dry_run:
        from . import service

        settings = load_settings(str(plan.settings_file))
        chosen = manager_name or service.manager()
        parts.echo_lines(service.install(settings, chosen))
        if agent_preset:
            from .cli_service import _runner

            parts.echo_lines(service.install(settings, chosen, _runner(agent_preset, None, [])))
    if not dry_run:
        typer.echo(
            "next: start the proxy (ai-agent-proxy -f " + str(plan.settings_file) + ", or"
            " setup --service), send your bot a message, and check: ai-agent-proxy doctor"
        )


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object for scripts.")] = False,
    config: parts.ConfigOpt = None,
    db: parts.DbOpt = None,
    inbox: parts.InboxOpt = None,
) -> None:
    """Check the settings, the server, OpenClaw's config and gateway, the inbox, the backlog,
    recent replies and the runner: one line each, PASS / WARN / FAIL with the fix. Exit 1
    on any FAIL. Never prints a secret."""
    from .doctor import Status, run

    settings = load_settings(config, {"db": db, "inbox": inbox})
    checks = []
    for check in run(settings, config):
        checks.append(check)
        if not as_json:
            typer.echo(check.line())
    failed = any(c.status is Status.FAIL for c in checks)
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "checks": [c.record() for c in checks]}, indent=2))
    if failed:
        raise typer.Exit(1)
