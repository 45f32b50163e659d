"""Running the proxy as a user service, the way OpenClaw runs its gateway: a systemd user
unit on Linux (`ai-agent-proxy.service`, ordered before `openclaw-gateway.service`), a
launchd agent on macOS. The unit and plist texts are pure functions; the rest calls the
service manager's own command (`systemctl --user`, `launchctl`).

Secrets never go into a unit or on a command line: the settings in force when installing
are written to a config file created 0600, and the unit runs `serve -f <that file>`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from .config import Settings
from .errors import ServiceError

UNIT = "ai-agent-proxy.service"
LABEL = "ai.openclaw.ai-agent-proxy"


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def unit_path() -> Path:
    return config_home() / "systemd" / "user" / UNIT


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def service_config_path() -> Path:
    return config_home() / "ai-agent-proxy" / "service.conf"


def command(config: Path) -> list[str]:
    """How the service runs the server: the installed executable, or this interpreter."""
    script = Path(sys.executable).parent / "ai-agent-proxy"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "ai_agent_proxy"]
    return [*base, "serve", "-f", str(config)]


def _quoted(arg: str) -> str:
    """One ExecStart word, quoted as systemd reads it."""
    if arg and all(c.isalnum() or c in "/._-+:@=," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(argv: list[str]) -> str:
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


def plist_text(argv: list[str], log_path: Path) -> str:
    args = "\n".join(f"    <string>{escape(a)}</string>" for a in argv)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{LABEL}</string>
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


def install(settings: Settings, chosen: str) -> Iterator[str]:
    """Write the settings file and the unit (or plist), then have the manager start it;
    yields what to tell the user. ServiceError when a manager call fails (after the unit
    is shown, when there is no systemd user session to install it in)."""
    conf = service_config_path()
    write_private(conf, config_text(settings))
    argv = command(conf)
    yield f"settings written to {conf} (mode 0600; the service reads them from there)"
    if chosen == "launchd":
        plist = plist_path()
        plist.parent.mkdir(parents=True, exist_ok=True)
        plist.write_text(plist_text(argv, Path.home() / "Library" / "Logs" / "ai-agent-proxy.log"))
        ok, out = _call(["launchctl", "load", "-w", str(plist)])
        if not ok:
            raise ServiceError(f"launchctl load {plist} failed: {out}")
        yield f"launchd agent {LABEL} installed ({plist}) and started"
        return
    unit = unit_text(argv)
    missing = systemd_missing()
    if missing:
        yield unit
        raise ServiceError(
            f"cannot install the service: {missing}. The unit is printed above: place it in "
            f"{unit_path()} on a machine with a systemd user session, or run "
            "`ai-agent-proxy` under your own supervisor"
        )
    path = unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit)
    for argv_ in (["systemctl", "--user", "daemon-reload"],
                  ["systemctl", "--user", "enable", "--now", UNIT]):  # fmt: skip
        ok, out = _call(argv_)
        if not ok:
            raise ServiceError(f"{' '.join(argv_)} failed: {out}")
    yield f"systemd user unit {UNIT} installed ({path}), enabled and started"
    hint = linger_hint()
    if hint:
        yield hint


def uninstall(chosen: str) -> Iterator[str]:
    """Stop the service and remove its unit or plist (the settings file stays)."""
    if chosen == "launchd":
        plist = plist_path()
        _call(["launchctl", "unload", "-w", str(plist)])
        plist.unlink(missing_ok=True)
        yield f"launchd agent {LABEL} removed"
        return
    _call(["systemctl", "--user", "disable", "--now", UNIT])
    unit_path().unlink(missing_ok=True)
    _call(["systemctl", "--user", "daemon-reload"])
    yield f"systemd user unit {UNIT} removed"


def control(verb: str, chosen: str) -> Iterator[str]:
    """start, stop or restart the installed service."""
    if chosen == "launchd":
        verbs = {"start": ["start"], "stop": ["stop"], "restart": ["kickstart", "-k"]}[verb]
        target = LABEL if verb != "restart" else f"gui/{os.getuid()}/{LABEL}"
        ok, out = _call(["launchctl", *verbs, target])
    else:
        ok, out = _call(["systemctl", "--user", verb, UNIT])
    if not ok:
        raise ServiceError(f"{verb} failed: {out}")
    yield f"{verb}: done"


def status(settings: Settings, chosen: str) -> tuple[list[str], bool]:
    """(lines: the manager's view and the server's /readyz; whether both are well)."""
    import httpx

    from .printable import printable

    if chosen == "launchd":
        active, out = _call(["launchctl", "list", LABEL])
    else:
        active, out = _call(["systemctl", "--user", "is-active", UNIT])
        _, detail = _call(["systemctl", "--user", "status", UNIT, "--no-pager", "--lines=0"])
        out = detail or out
    lines = ["service: " + ("active" if active else "not active")]
    lines += ["  " + printable(line, one_line=True) for line in out.splitlines()[:8]]
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
