"""`ai-agent-proxy service ...`: the proxy (and the agent runner) as a user service beside
OpenClaw's gateway (systemd on Linux, launchd on macOS). Thin commands over service.py."""

from __future__ import annotations

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


@service_cli.command("install")
def service_install(config: parts.ConfigOpt = None, manager_name: parts.ManagerOpt = None) -> None:
    """Install and start the service with the settings in force now (config file,
    AI_AGENT_PROXY_* environment), written to a config file only you can read."""
    from . import service

    settings = load_settings(config, {})
    parts.echo_lines(service.install(settings, _manager(manager_name)))


@service_cli.command("uninstall")
def service_uninstall(manager_name: parts.ManagerOpt = None) -> None:
    """Stop the service and remove its unit (the settings file stays)."""
    from . import service

    parts.echo_lines(service.uninstall(_manager(manager_name)))


def _control(action: str, doc: str) -> None:
    """`service start|stop|restart`: one command each, all alike."""

    def command(manager_name: parts.ManagerOpt = None) -> None:
        from . import service

        parts.echo_lines(service.control(action, _manager(manager_name)))

    command.__doc__ = doc
    service_cli.command(action)(command)


_control("start", "Start the installed service.")
_control("stop", "Stop the service.")
_control("restart", "Restart the service.")


@service_cli.command("status")
def service_status(config: parts.ConfigOpt = None, manager_name: parts.ManagerOpt = None) -> None:
    """The service manager's view and the running server's /readyz; exit 0 when both are
    well."""
    from . import service

    conf = service.service_config_path()
    settings = load_settings(config or (str(conf) if conf.is_file() else None), {})
    lines, well = service.status(settings, _manager(manager_name))
    parts.echo_lines(lines)
    if not well:
        raise typer.Exit(1)
