"""Running the proxy as a user service, the way OpenClaw runs its gateway: a systemd user
unit on Linux (`ai-agent-proxy.service`, ordered before `openclaw-gateway.service`), a
launchd agent on macOS; and the agent runner (`ai-agent-proxy agent ...`) as a second one
beside it (`ai-agent-proxy-agent.service`). The unit and plist texts are pure functions;
the rest calls the service manager's own command (`systemctl --user`, `launchctl`).

Secrets never go into a unit or on a command line: the settings in force when installing
are written to a config file created 0600, and the units run `serve -f <that file>` and
`agent -f <that file> ...`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from .config import Settings
from .errors import ServiceError

UNIT = "ai-agent-proxy.service"
LABEL = "ai.openclaw.ai-agent-proxy"
AGENT_UNIT = "ai-agent-proxy-agent.service"
AGENT_LABEL = "ai.openclaw.ai-agent-proxy.agent"
AGENT_STOP_MARGIN_S = 30  # the runner's --grace, then this, before the manager kills it


@dataclass(frozen=True)
class Runner:
    """The agent runner as a service: its `agent` arguments (`--preset claude ...` or
    `... -- CMD ARGS`), the folder its runs start in, the PATH they find their CLIs on
    (a service's own PATH is short), and how long it may take to stop."""

    args: tuple[str, ...]
    workdir: Path
    path: str
    grace_s: float = 30.0


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def unit_path(agent: bool = False) -> Path:
    return config_home() / "systemd" / "user" / (AGENT_UNIT if agent else UNIT)


def plist_path(agent: bool = False) -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{AGENT_LABEL if agent else LABEL}.plist"


def service_config_path() -> Path:
    return config_home() / "ai-agent-proxy" / "service.conf"


def command(config: Path, runner: Runner | None = None) -> list[str]:
    """How the service runs the server (or the runner): the installed executable, or
    this interpreter."""
    script = Path(sys.executable).parent / "ai-agent-proxy"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "ai_agent_proxy"]
    if runner is None:
        return [*base, "serve", "-f", str(config)]
    return [*base, "agent", "-f", str(config), "--workdir", str(runner.workdir), *runner.args]


def _quoted(arg: str) -> str:
    """One ExecStart word, quoted as systemd reads it."""
    arg = arg.replace("%", "%%")  # not a specifier
    if arg and all(c.isalnum() or c in "/._-+:@=,%" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(argv: list[str], runner: Runner | None = None) -> str:
    if runner is not None:
        return agent_unit_text(argv, runner)
    return f"""[Unit]
Description=ai-agent-proxy: OpenClaw's OpenAI-compatible inbox proxy
Documentation=https://pypi.org/project/ai-agent-proxy/
# OpenClaw sends every message here: be up before the gateway starts.
Before=openclaw-gateway.service

[Service]
Type=notify
NotifyAccess=all
ExecStart={" ".join(_quoted(a) for a in argv)}
Restart=on-failure
RestartSec=2
TimeoutStopSec=20

[Install]
WantedBy=default.target
"""


def agent_unit_text(argv: list[str], runner: Runner) -> str:
    """The runner's unit: after the proxy when both start (it also runs without it), its
    runs in the folder and with the PATH it was installed from; on stop, SIGTERM to the
    runner alone (KillMode=mixed), which gives its runs the grace and stops them itself,
    and the manager kills what is left only well after that."""
    stop_s = int(runner.grace_s + AGENT_STOP_MARGIN_S)
    return f"""[Unit]
Description=ai-agent-proxy agent runner: your agent CLI answers each waiting conversation
Documentation=https://pypi.org/project/ai-agent-proxy/
After={UNIT}

[Service]
Type=exec
ExecStart={" ".join(_quoted(a) for a in argv)}
WorkingDirectory={str(runner.workdir).replace("%", "%%")}
Environment={_quoted("PATH=" + runner.path)}
Restart=on-failure
RestartSec=5
KillMode=mixed
TimeoutStopSec={stop_s}

[Install]
WantedBy=default.target
"""


def plist_text(argv: list[str], log_path: Path, runner: Runner | None = None) -> str:
    args = "\n".join(f"    <string>{escape(a)}</string>" for a in argv)
    extra = ""
    if runner is not None:
        extra = f"""
  <key>WorkingDirectory</key>
  <string>{escape(str(runner.workdir))}</string>
  <key>EnvironmentVariables</key>
  <dict>
    <key>PATH</key>
    <string>{escape(runner.path)}</string>
  </dict>
  <key>ExitTimeOut</key>
  <integer>{int(runner.grace_s + AGENT_STOP_MARGIN_S)}</integer>"""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{AGENT_LABEL if runner is not None else LABEL}</string>{extra}
  <key>ProgramArguments</key>
  <array>
{args}
  </array>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <true/>
  <key>StandardOutPath</key>
  <string>{escape(str(log_path))}</string>
  <key>StandardErrorPath</key>
  <string>{escape(str(log_path))}</string>
</dict>
</plist>
"""


def config_text(settings: Settings) -> str:
    """The settings in force, as a config file (every key that differs from its default)."""
    defaults = Settings()
    lines = ["# Written by `ai-agent-proxy service install`: the settings of the service.\n"]
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value == getattr(defaults, name) and name != "inbox":
            continue
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f'{name.upper()}="{text}"\n')
    return "".join(lines)


def write_private(path: Path, text: str) -> None:
    """Create or replace `path` owner-only (0600), its folder 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temp, path)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not found")


def manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def systemd_missing() -> str | None:
    """Why there is no systemd user manager to talk to, or None if there is one."""
    if shutil.which("systemctl") is None:
        return "systemctl is not installed (no systemd here)"
    probe = run(["systemctl", "--user", "show-environment"])
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        why = detail[-1] if detail else f"exit status {probe.returncode}"
        return f"no systemd user session ({why})"
    return None


def linger_hint() -> str | None:
    """How to keep the service running after logout, if it would not."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    probe = run(["loginctl", "show-user", user, "--property=Linger", "--value"])
    if probe.returncode == 0 and probe.stdout.strip() == "yes":
        return None
    return f"to keep it running after you log out: loginctl enable-linger {user}".rstrip()


# -- what the `service` commands do ---------------------------------------------------------


def _call(argv: list[str]) -> tuple[bool, str]:
    done = run(argv)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def install(settings: Settings, chosen: str, runner: Runner | None = None) -> Iterator[str]:
    """Write the settings file and the unit (or plist) of the proxy (or of the agent
    runner), then have the manager start it; yields what to tell the user. ServiceError
    when a manager call fails (after the unit is shown, when there is no systemd user
    session to install it in)."""
    conf = service_config_path()
    write_private(conf, config_text(settings))
    argv = command(conf, runner)
    agent = runner is not None
    name, label = (AGENT_UNIT, AGENT_LABEL) if agent else (UNIT, LABEL)
    yield f"settings written to {conf} (mode 0600; the service reads them from there)"
    if chosen == "launchd":
        plist = plist_path(agent)
        plist.parent.mkdir(parents=True, exist_ok=True)
        logs = Path.home() / "Library" / "Logs"
        log = logs / ("ai-agent-proxy-agent.log" if agent else "ai-agent-proxy.log")
        plist.write_text(plist_text(argv, log, runner))
        ok, out = _call(["launchctl", "load", "-w", str(plist)])
        if not ok:
            raise ServiceError(f"launchctl load {plist} failed: {out}")
        yield f"launchd agent {label} installed ({plist}) and started"
        return
    unit = unit_text(argv, runner)
    missing = systemd_missing()
    if missing:
        yield unit
        raise ServiceError(
            f"cannot install the service: {missing}. The unit is printed above: place it in "
            f"{unit_path()} on a machine with a systemd user session, or run "
            "`ai-agent-proxy` under your own supervisor"
        )
    path = unit_path(agent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit)
    for argv_ in (["systemctl", "--user", "daemon-reload"],
                  ["systemctl", "--user", "enable", "--now", name]):  # fmt: skip
        ok, out = _call(argv_)
        if not ok:
            raise ServiceError(f"{' '.join(argv_)} failed: {out}")
    yield f"systemd user unit {name} installed ({path}), enabled and started"
    hint = linger_hint()
    if hint:
        yield hint


def uninstall(chosen: str, agent: bool = False) -> Iterator[str]:
    """Stop the service and remove its unit or plist (the settings file stays)."""
    name, label = (AGENT_UNIT, AGENT_LABEL) if agent else (UNIT, LABEL)
    if chosen == "launchd":
        plist = plist_path(agent)
        _call(["launchctl", "unload", "-w", str(plist)])
        plist.unlink(missing_ok=True)
        yield f"launchd agent {label} removed"
        return
    _call(["systemctl", "--user", "disable", "--now", name])
    unit_path(agent).unlink(missing_ok=True)
    _call(["systemctl", "--user", "daemon-reload"])
    yield f"systemd user unit {name} removed"


def control(verb: str, chosen: str, agent: bool = False) -> Iterator[str]:
    """start, stop or restart the installed service."""
    name, label = (AGENT_UNIT, AGENT_LABEL) if agent else (UNIT, LABEL)
    if chosen == "launchd":
        verbs = {"start": ["start"], "stop": ["stop"], "restart": ["kickstart", "-k"]}[verb]
        target = label if verb != "restart" else f"gui/{os.getuid()}/{label}"
        ok, out = _call(["launchctl", *verbs, target])
    else:
        ok, out = _call(["systemctl", "--user", verb, name])
    if not ok:
        raise ServiceError(f"{verb} failed: {out}")
    yield f"{verb}: done"


def status(settings: Settings, chosen: str, agent: bool = False) -> tuple[list[str], bool]:
    """(lines: the manager's view and the server's /readyz, or the runner's last day;
    whether all is well)."""
    import httpx

    from .printable import printable

    name, label = (AGENT_UNIT, AGENT_LABEL) if agent else (UNIT, LABEL)
    if chosen == "launchd":
        active, out = _call(["launchctl", "list", label])
    else:
        active, out = _call(["systemctl", "--user", "is-active", name])
        _, detail = _call(["systemctl", "--user", "status", name, "--no-pager", "--lines=0"])
        out = detail or out
    lines = ["service: " + ("active" if active else "not active")]
    lines += ["  " + printable(line, one_line=True) for line in out.splitlines()[:8]]
    if agent:
        return lines + _runner_report(settings), active
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}/readyz"
    headers = {"authorization": f"Bearer {settings.key}"} if settings.key else {}
    try:
        answer = httpx.get(url, headers=headers, timeout=3)
        report = answer.json()
        ready = answer.status_code == 200
    except (httpx.HTTPError, ValueError) as exc:
        report, ready = {"error": f"{type(exc).__name__}: {exc}"}, False
    lines.append(f"server {url}: " + ("ready" if ready else "not ready"))
    lines += [f"  {key}: {printable(value, one_line=True)}" for key, value in report.items()]
    return lines, active and ready


def _runner_report(settings: Settings) -> list[str]:
    """The agent runner's last day, from the DB it shares with the proxy."""
    from .errors import ProxyError
    from .history import History

    try:
        audit = History(settings.db_path)
        try:
            report = audit.agent_stats()
        finally:
            audit.close()
    except ProxyError as exc:
        return [f"runs: cannot read {settings.db_path}: {exc}"]
    runs = report["runs_last_day"]
    told = ", ".join(f"{outcome} {n}" for outcome, n in sorted(runs.items())) or "none"
    lines = [f"runs in the last day: {told}"]
    for chat in report["set_aside"]:
        lines.append(
            f"  set aside since {chat['since']}: {chat['conversation']} after"
            f" {chat['failed_runs']} failed run(s), last {chat['last_outcome']}"
            " (tried again when a new message arrives)"
        )
    return lines
