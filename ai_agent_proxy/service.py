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
from pathlib import Path
from xml.sax.saxutils import escape

from .config import Settings

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
