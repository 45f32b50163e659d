"""Running as a service: the unit or plist where the service manager looks, the calls in
order, no secret in the unit; and the systemd readiness protocol from a real server.
Service managers are stand-ins on PATH that record their argv."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Server, wait_until

FAKE = (
    f"#!{sys.executable}\n"
    + """import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "systemctl" and sys.argv[1:3] == ["--user", "show-environment"]:
    sys.exit(int(os.environ.get("FAKE_NO_SESSION", "0")))
if name == "loginctl":
    print("no")
"""
)


@pytest.fixture
def home(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A HOME of its own, stand-in systemctl/loginctl/launchctl on PATH; returns the home,
    the environment to run the CLI with, and the log of the stand-ins' calls."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    for name in ("systemctl", "loginctl", "launchctl"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    env.update(
        HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_LOG=str(log), AI_AGENT_PROXY_INBOX=str(home / "inbox"),
        AI_AGENT_PROXY_KEY="service-secret-key-12345", AI_AGENT_PROXY_API_KEY="sk-backend-999",
        AI_AGENT_PROXY_URL="http://127.0.0.1:9/v1", AI_AGENT_PROXY_REPLY="On it",
    )  # fmt: skip
    return home, env, log


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ai_agent_proxy", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=env["HOME"],
    )  # fmt: skip


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


SECRETS = ("service-secret-key-12345", "sk-backend-999")


@pytest.mark.process
def test_systemd_install_and_uninstall(home) -> None:
    home_dir, env, log = home
    r = cli(env, "service", "install", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    unit = home_dir / ".config" / "systemd" / "user" / "ai-agent-proxy.service"
    text = unit.read_text()
    conf = home_dir / ".config" / "ai-agent-proxy" / "service.conf"
    assert f" serve -f {conf}" in text.split("ExecStart=", 1)[1].splitlines()[0]
    exec_start = text.split("ExecStart=", 1)[1].splitlines()[0]
    assert Path(exec_start.split()[0]).is_absolute()
    for line in ("Type=notify", "Restart=on-failure", "Before=openclaw-gateway.service",
                 "WantedBy=default.target"):  # fmt: skip
        assert line in text.splitlines()
    assert not any(secret in text for secret in SECRETS)
    # the settings, secrets included, only in a file only the user can read
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    conf_text = conf.read_text()
    assert 'KEY="service-secret-key-12345"' in conf_text and 'REPLY="On it"' in conf_text
    unit_name = "ai-agent-proxy.service"
    assert calls(log)[-3:-1] == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", unit_name],
    ]
    assert calls(log)[-1][0] == "loginctl"
    assert "loginctl enable-linger" in r.stdout  # linger is off in the stand-in
    assert not any(secret in r.stdout + r.stderr for secret in SECRETS)
    # the config file is one the server reads as it is
    from ai_agent_proxy.config import load_settings

    settings = load_settings(str(conf), {})
    assert (settings.key, settings.reply, settings.inbox) == (
        "service-secret-key-12345", "On it", home_dir / "inbox",
    )  # fmt: skip
    r = cli(env, "service", "uninstall", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    assert not unit.exists()
    assert calls(log)[-2:] == [
        ["systemctl", "--user", "disable", "--now", unit_name],
        ["systemctl", "--user", "daemon-reload"],
    ]
    for verb in ("start", "stop", "restart"):
        assert cli(env, "service", verb, "--manager", "systemd").returncode == 0
        assert calls(log)[-1] == ["systemctl", "--user", verb, "ai-agent-proxy.service"]


def in_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A command in this process (Typer's CliRunner), in `env`, as `cli` runs it."""
    from typer.testing import CliRunner

    from ai_agent_proxy.cli import cli as app

    unset = {k: None for k in os.environ if k not in env}
    r = CliRunner().invoke(app, list(args), env={**unset, **env})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def test_the_agent_runner_installed_as_a_second_service(home, monkeypatch) -> None:
    home_dir, env, log = home
    monkeypatch.chdir(home_dir)  # (its runs start where it was installed from)
    cli = in_process
    r = cli(env, "service", "install", "--agent", "--preset", "claude", "--agent-options",
            "--parallel 3 --grace 10s", "--manager", "systemd")  # fmt: skip
    assert r.returncode == 0, r.stderr
    unit = home_dir / ".config" / "systemd" / "user" / "ai-agent-proxy-agent.service"
    text = unit.read_text()
    conf = home_dir / ".config" / "ai-agent-proxy" / "service.conf"
    exec_start = text.split("ExecStart=", 1)[1].splitlines()[0].split()
    assert exec_start[1:] == [
        "agent", "-f", str(conf), "--workdir", str(home_dir), "--parallel", "3", "--grace",
        "10s", "--preset", "claude",
    ]  # fmt: skip
    for line in ("After=ai-agent-proxy.service", "KillMode=mixed", "TimeoutStopSec=40",
                 f"WorkingDirectory={home_dir}", "Restart=on-failure", "Type=exec"):  # fmt: skip
        assert line in text.splitlines(), line
    assert f'Environment="PATH={env["PATH"]}"' in text.splitlines() or (
        f"Environment=PATH={env['PATH']}" in text.splitlines()
    )
    assert not any(secret in text + r.stdout + r.stderr for secret in SECRETS)
    assert ["systemctl", "--user", "enable", "--now", "ai-agent-proxy-agent.service"] in calls(log)
    # the proxy's own unit is another file, untouched
    assert not (home_dir / ".config" / "systemd" / "user" / "ai-agent-proxy.service").exists()
    # a command of one's own, after --
    r = cli(env, "service", "install", "--agent", "--manager", "systemd", "--", "my-agent", "-p")
    assert r.returncode == 0, r.stderr
    assert unit.read_text().split("ExecStart=", 1)[1].splitlines()[0].endswith(" -- my-agent -p")
    for verb in ("stop", "start"):
        assert cli(env, "service", verb, "--agent", "--manager", "systemd").returncode == 0
        assert calls(log)[-1] == ["systemctl", "--user", verb, "ai-agent-proxy-agent.service"]
    r = cli(env, "service", "uninstall", "--agent", "--manager", "systemd")
    assert r.returncode == 0 and not unit.exists()
    # what is wrong is said at once, nothing installed
    for args, says in [
        (["--agent"], "say which agent"),
        (
            ["--agent", "--preset", "claude", "--agent-options", "--bogus"],
            "--agent: No such option: --bogus",
        ),
        (["--preset", "claude"], "go with --agent"),
    ]:
        r = cli(env, "service", "install", "--manager", "systemd", *args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
        assert not unit.exists()
    # launchd: a second agent, in the folder and with the PATH it was installed from
    r = cli(env, "service", "install", "--agent", "--preset", "codex", "--manager", "launchd")
    assert r.returncode == 0, r.stderr
    plist = home_dir / "Library" / "LaunchAgents" / "ai.openclaw.ai-agent-proxy.agent.plist"
    text = plist.read_text()
    assert "<string>agent</string>" in text and "<string>codex</string>" in text
    assert f"<key>WorkingDirectory</key>\n  <string>{home_dir}</string>" in text
    assert "<key>ExitTimeOut</key>\n  <integer>60</integer>" in text


@pytest.mark.process
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    from ai_agent_proxy.service import Runner, command, unit_text

    unit = tmp_path / "ai-agent-proxy.service"
    unit.write_text(unit_text(command(tmp_path / "a folder" / "service.conf")))  # quoting
    runner = Runner(("--preset", "claude"), tmp_path / "a folder", "/usr/bin:/bin")
    agent_unit = tmp_path / "ai-agent-proxy-agent.service"
    agent_unit.write_text(unit_text(command(tmp_path / "service.conf", runner), runner))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    (tmp_path / "a folder").mkdir()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    r = subprocess.run([analyze, "verify", "--user", str(unit), str(agent_unit)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    if "Failed to initialize manager" in r.stderr:
        pytest.skip(f"systemd-analyze cannot run a user manager here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert ".service:" not in r.stderr, r.stderr


def test_install_without_a_systemd_session_explains_and_prints_the_unit(home) -> None:
    home_dir, env, _log = home
    r = cli({**env, "FAKE_NO_SESSION": "1"}, "service", "install", "--manager", "systemd")
    assert r.returncode == 1
    assert "no systemd user session" in r.stderr and "[Service]" in r.stdout
    assert not (home_dir / ".config" / "systemd" / "user" / "ai-agent-proxy.service").exists()
    assert not any(secret in r.stdout + r.stderr for secret in SECRETS)


@pytest.mark.process
def test_launchd_install_and_uninstall(home) -> None:
    home_dir, env, log = home
    r = cli(env, "service", "install", "--manager", "launchd")
    assert r.returncode == 0, r.stderr
    plist = home_dir / "Library" / "LaunchAgents" / "ai.openclaw.ai-agent-proxy.plist"
    text = plist.read_text()
    assert "<key>KeepAlive</key>\n  <true/>" in text and "<key>RunAtLoad</key>" in text
    assert "<string>serve</string>" in text and "service.conf</string>" in text
    assert not any(secret in text for secret in SECRETS)
    assert calls(log)[-1] == ["launchctl", "load", "-w", str(plist)]
    assert cli(env, "service", "uninstall", "--manager", "launchd").returncode == 0
    assert not plist.exists() and calls(log)[-1] == ["launchctl", "unload", "-w", str(plist)]


def test_status_is_the_managers_view_and_readyz(home, make_server) -> None:
    _home_dir, env, _log = home
    server = make_server(key="service-secret-key-12345")
    status_env = {**env, "AI_AGENT_PROXY_PORT": str(server.port), "AI_AGENT_PROXY_URL": ""}
    r = cli(status_env, "service", "status", "--manager", "systemd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "service: active" in r.stdout and "ready" in r.stdout and "backlog: 0" in r.stdout
    server.stop()
    r = cli(status_env, "service", "status", "--manager", "systemd")
    assert r.returncode == 1 and "not ready" in r.stdout


@pytest.mark.process
def test_server_tells_systemd_it_is_ready_and_stopping(make_server, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    got: list[str] = []

    def receive() -> list[str]:
        with contextlib.suppress(TimeoutError):
            got.append(sock.recv(4096).decode())
        return got

    try:
        server: Server = make_server(env={"NOTIFY_SOCKET": str(path)})  # answered /healthz
        wait_until(lambda: any("READY=1" in m for m in receive()), message=lambda: str(got))
        assert "STATUS=listening on 127.0.0.1" in got[0]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: any("STOPPING=1" in m for m in receive()), message=lambda: str(got))
        server.proc.wait(10)
    finally:
        sock.close()
