"""The first five minutes (SPEC section 9): `setup` hooks the proxy into OpenClaw through
OpenClaw's own CLI (a stand-in on PATH keeping a real config file, tests/openclaw_cli.py),
and `doctor` says what is wrong: each check made to FAIL or WARN on purpose, then PASS."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ai_agent_proxy.cli import cli

from . import openclaw_cli as fake
from .conftest import Server
from .gateway import TOKEN, StandInGateway


def ran(env: dict[str, str], *args: str, input: str | None = None) -> Any:
    unset = {k: None for k in os.environ if k.startswith(("AI_AGENT_PROXY_", "OPENCLAW_"))}
    r = CliRunner().invoke(cli, list(args), env={**unset, **env}, input=input)  # type: ignore[arg-type]
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


@pytest.fixture
def openclaw(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """A stand-in openclaw on PATH and its state folder; (env, state, call log)."""
    state, log = tmp_path / "openclaw-state", tmp_path / "openclaw-calls.jsonl"
    fake.install(tmp_path / "bin")
    return fake.environment(tmp_path / "bin", state, log), state, log


def key_of(settings_file: Path) -> str:
    line = next(ln for ln in settings_file.read_text().splitlines() if ln.startswith("KEY="))
    return line.split("=", 1)[1].strip('"')


# -- setup -----------------------------------------------------------------------------------


def test_setup_writes_both_sides_once_and_twice_changes_nothing(openclaw, tmp_path) -> None:
    env, state, log = openclaw
    conf = tmp_path / "proxy.conf"
    r = ran(env, "setup", "-f", str(conf), "--default-model", "--dm-scope")
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    key = key_of(conf)
    assert len(key) >= 32 and 'REPLY="On it - I\'ll reply in a moment."' in conf.read_text()
    config = fake.config(state)
    provider = config["models"]["providers"]["ai-agent-proxy"]
    model = {"id": "local-agent", "name": "your agent, via ai-agent-proxy"}
    assert provider == {"api": "openai-completions", "baseUrl": "http://127.0.0.1:7011/v1",
                        "apiKey": key, "models": [model]}  # fmt: skip
    assert config["agents"]["defaults"]["model"]["primary"] == "ai-agent-proxy/local-agent"
    assert config["session"]["dmScope"] == "per-channel-peer"
    assert "openclaw config validate: Config valid" in r.output
    assert "next: restart the gateway" not in r.output  # OpenClaw applies the change itself
    assert [c[:3] for c in fake.calls(log)] == [
        ["config", "file"], ["config", "patch", "--stdin"], ["config", "validate"],
    ]  # fmt: skip
    first = (conf.read_bytes(), (state / "openclaw.json").read_bytes())
    again = ran(env, "setup", "-f", str(conf), "--default-model", "--dm-scope")
    assert again.exit_code == 0 and f"kept {conf} as it is" in again.output
    assert (conf.read_bytes(), (state / "openclaw.json").read_bytes()) == first
    assert "No gateway restart needed" in again.output
    assert "next: restart the gateway" not in again.output
    said = r.output + again.output + log.read_text()
    assert key not in said  # never on a command line, never printed


def test_an_existing_settings_file_keeps_its_values(openclaw, tmp_path) -> None:
    env, state, _ = openclaw
    conf = tmp_path / "proxy.conf"
    conf.write_text('PORT=7099\nKEY="mine-own-key-0123456789"\n')
    conf.chmod(0o644)
    r = ran(env, "setup", "-f", str(conf))
    assert r.exit_code == 0, r.output
    assert conf.read_text().startswith('PORT=7099\nKEY="mine-own-key-0123456789"\nREPLY=')
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and "readable by you only" in r.output
    provider = fake.config(state)["models"]["providers"]["ai-agent-proxy"]
    assert (provider["baseUrl"], provider["apiKey"]) == (
        "http://127.0.0.1:7099/v1", "mine-own-key-0123456789",
    )  # fmt: skip
    assert "agents" not in fake.config(state)  # no --default-model: the model is left alone
    # a change OpenClaw cannot take without a restart: the next step says how
    later = ran({**env, "FAKE_OPENCLAW_RESTART": "1"}, "setup", "-f", str(conf), "--dm-scope")
    assert later.exit_code == 0 and "Restart the gateway to apply." in later.output
    assert "next: restart the gateway so it takes the change: openclaw gateway restart" in (
        later.output)  # fmt: skip


def test_a_dry_run_changes_nothing_and_shows_the_patch_masked(openclaw, tmp_path) -> None:
    env, state, log = openclaw
    conf = tmp_path / "proxy.conf"
    r = ran(env, "setup", "-f", str(conf), "--dry-run", "--default-model")
    assert r.exit_code == 0, r.output
    assert not conf.exists() and not (state / "openclaw.json").exists() and fake.calls(log) == []
    assert f"would write {conf} with KEY, REPLY" in r.output
    assert '"apiKey": "****"' in r.output and '"primary": "ai-agent-proxy/local-agent"' in r.output
    assert "nothing was changed (--dry-run)" in r.output


def test_a_refused_change_or_a_failed_validation_leaves_openclaws_file_as_it_was(
    openclaw, tmp_path
) -> None:
    env, state, _ = openclaw
    conf = tmp_path / "proxy.conf"
    state.mkdir()
    original = b'{\n  "gateway": {"port": 18789},\n  "session": {"dmScope": "main"}\n}\n'
    (state / "openclaw.json").write_bytes(original)
    (state / "openclaw.json.invalid").write_text("agents.defaults.model: unknown provider")
    r = ran(env, "setup", "-f", str(conf), "--default-model")
    assert r.exit_code == 1
    assert "OpenClaw refused the change, its config is unchanged: Config validation failed:" in (
        r.output
    )
    assert (state / "openclaw.json").read_bytes() == original
    # a patch OpenClaw takes, then `config validate` fails: put back byte for byte
    (state / "openclaw.json.invalid").unlink()
    validate = tmp_path / "bin" / "openclaw"
    source = validate.read_text()
    validate.write_text(source.replace(
        'elif args[:2] == ["config", "validate"]:\n    found = problems(load())',
        'elif args[:2] == ["config", "validate"]:\n    found = ["a plugin needs a restart"]',
    ))  # fmt: skip
    r = ran(env, "setup", "-f", str(conf), "--default-model")
    assert r.exit_code == 1 and "its config was put back as it was" in r.output
    assert (state / "openclaw.json").read_bytes() == original


def test_setup_without_openclaw_says_so(tmp_path) -> None:
    env = {"PATH": str(tmp_path / "empty"), "OPENCLAW_STATE_DIR": str(tmp_path / "s")}
    r = ran(env, "setup", "-f", str(tmp_path / "p.conf"))
    assert r.exit_code == 1 and "the openclaw CLI (openclaw) is not on PATH" in r.output


# -- doctor ----------------------------------------------------------------------------------


def doctor(env: dict[str, str], conf: Path, server: Server | None = None) -> dict[str, Any]:
    args = ["doctor", "--json", "-f", str(conf)]
    if server is not None:
        args += ["--db", str(server.db), "--inbox", str(server.inbox)]
    r = ran(env, *args)
    found = json.loads(r.stdout)
    assert r.exit_code == (0 if found["ok"] else 1)
    return {c["name"]: c for c in found["checks"]}


@pytest.fixture
def healthy(make_server, openclaw, tmp_path) -> Any:
    """A set-up world: settings file, server on it, OpenClaw configured by setup, a
    stand-in gateway whose token OpenClaw's config holds."""
    env, state, _ = openclaw
    conf = tmp_path / "proxy.conf"
    assert ran(env, "setup", "-f", str(conf), "--default-model", "--dm-scope").exit_code == 0
    key = key_of(conf)
    server = make_server("--reply", "On it", key=key)
    server.inbox.mkdir(parents=True, exist_ok=True)  # (made with the first file)
    text = conf.read_text() + f"PORT={server.port}\n"
    conf.write_text(text)
    assert ran(env, "setup", "-f", str(conf)).exit_code == 0  # the port, in OpenClaw too
    gateway = StandInGateway()
    with (state / "openclaw.json").open() as f:
        config = json.load(f)
    config["gateway"] = {"port": gateway.port, "auth": {"mode": "token", "token": TOKEN}}
    (state / "openclaw.json").write_text(json.dumps(config))
    yield env, state, conf, server, gateway
    gateway.stop()


def test_doctor_without_a_settings_file_says_so(openclaw, tmp_path, monkeypatch) -> None:
    env, _, _ = openclaw
    monkeypatch.chdir(tmp_path)  # no ./.ai-agent-proxy.conf here
    r = ran(env, "doctor", "--json")
    found = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert found["settings file"]["status"] == "WARN" and r.exit_code == 1  # (no server)
    assert "ai-agent-proxy setup writes one" in found["settings file"]["fix"]


def test_doctor_passes_a_healthy_setup_and_prints_no_secret(healthy) -> None:
    env, _, conf, server, _ = healthy
    checks = doctor(env, conf, server)
    assert checks["inbox"]["status"] == "PASS", checks["inbox"]
    assert {n: c["status"] for n, c in checks.items()} == {
        "settings file": "PASS", "server": "PASS", "openclaw CLI": "PASS",
        "OpenClaw provider": "PASS", "agents' model": "PASS", "DM scope": "PASS",
        "REPLY": "PASS", "gateway": "PASS", "inbox": "PASS", "backlog": "PASS",
        "replies": "PASS", "agent runner": "SKIP",
    }  # fmt: skip
    text = ran(env, "doctor", "-f", str(conf), "--db", str(server.db), "--inbox", str(server.inbox))
    assert text.exit_code == 0 and text.output.splitlines()[0].startswith("PASS settings file:")
    assert key_of(conf) not in text.output + json.dumps(checks) and TOKEN not in text.output


def test_doctor_fails_each_broken_part_then_passes_it_fixed(healthy) -> None:
    env, state, conf, server, _ = healthy
    config_file = state / "openclaw.json"
    good = config_file.read_text()

    def status(name: str) -> tuple[str, str | None]:
        c = doctor(env, conf, server)[name]
        return c["status"], c["fix"]

    def edit(change: Any) -> None:
        config = json.loads(good)
        change(config)
        config_file.write_text(json.dumps(config))

    # a key that differs between the two sides
    edit(lambda c: c["models"]["providers"]["ai-agent-proxy"].update(apiKey="other"))
    assert status("OpenClaw provider") == ("FAIL", "ai-agent-proxy setup")
    # the provider not made the agents' model
    edit(lambda c: c["agents"]["defaults"]["model"].update(primary="anthropic/claude"))
    assert status("agents' model")[0] == "FAIL"
    # the default DM scope
    edit(lambda c: c["session"].pop("dmScope"))
    assert status("DM scope") == ("WARN", "ai-agent-proxy setup --dm-scope")
    # a provider that reaches another port
    edit(
        lambda c: c["models"]["providers"]["ai-agent-proxy"].update(baseUrl="http://127.0.0.1:1/v1")
    )
    assert status("OpenClaw provider")[0] == "FAIL"
    # the gateway's token wrong
    edit(lambda c: c["gateway"]["auth"].update(token="wrong"))
    assert status("gateway")[0] == "FAIL"
    config_file.write_text(good)
    assert {n: c["status"] for n, c in doctor(env, conf, server).items()}["gateway"] == "PASS"
    # the settings file readable by others
    conf.chmod(0o644)
    assert status("settings file") == ("WARN", f"chmod 600 {conf}")
    conf.chmod(0o600)
    # REPLY empty
    conf.write_text(
        conf.read_text().replace('REPLY="On it - I\'ll reply in a moment."', 'REPLY=""')
    )
    assert status("REPLY")[0] == "WARN"
    # the server runs with another key than the settings file's
    text = conf.read_text()
    conf.write_text(re.sub(r'(?m)^KEY=".*"$', 'KEY="a-different-key-0123456789"', text))
    assert status("server")[0] == "FAIL" and "refused this KEY (401)" in doctor(env, conf, server)[
        "server"]["detail"]  # fmt: skip
    conf.write_text(text)
    # the server down
    server.stop()
    assert status("server")[0] == "FAIL"
    server.start()
    assert status("server")[0] == "PASS"
    # the openclaw CLI missing: the OpenClaw checks are skipped, not guessed
    bare = {**env, "PATH": "/usr/bin:/bin"}
    checks = doctor(bare, conf, server)
    assert (
        checks["openclaw CLI"]["status"] == "FAIL" and checks["agents' model"]["status"] == "SKIP"
    )


def test_doctor_on_the_inbox_the_backlog_and_failed_replies(healthy, tmp_path) -> None:
    from .test_replies import run as reply_run

    env, _, conf, server, gateway = healthy

    # a file where the inbox folder should be (root may write anywhere else)
    def inbox_check(inbox: Path) -> dict[str, Any]:
        r = ran(env, "doctor", "--json", "-f", str(conf), "--db", str(server.db), "--inbox",
                str(inbox))  # fmt: skip
        return {c["name"]: c for c in json.loads(r.stdout)["checks"]}["inbox"]

    blocked = tmp_path / "blocked"
    blocked.write_text("")
    assert inbox_check(blocked)["status"] == "FAIL"
    assert inbox_check(tmp_path / "not-yet")["status"] == "WARN"  # the server makes it
    blocked.unlink()
    blocked.mkdir()
    assert inbox_check(blocked)["status"] == "PASS"
    # the server's inbox a file: the server check says what /readyz says, the backlog
    # check how old the oldest request not yet written is
    server.inbox.rename(tmp_path / "moved")
    server.inbox.write_text("in the way")
    assert server.post_chat(server_body()).status_code == 200
    unwritten = int((time.time() - 600) * 1000)
    with sqlite3.connect(server.db) as db:
        db.execute("UPDATE requests SET received_ms = ?", (unwritten,))
    checks = doctor(env, conf, server)
    assert checks["server"]["status"] == "FAIL"
    said = checks["server"]["detail"]
    assert (
        f"not ready (inbox error: FileExistsError: [Errno 17] File exists: '{server.inbox}')"
        in said
    )
    assert checks["backlog"]["status"] == "WARN"
    assert "1 not yet in the inbox" in checks["backlog"]["detail"]
    assert re.search(r"the oldest unwritten is (59\d|60\d) s old", checks["backlog"]["detail"])
    server.inbox.unlink()
    (tmp_path / "moved").rename(server.inbox)
    (written,) = server.wait_files(1)
    (server.inbox / written).unlink()  # (the rest of this test starts from none)
    with sqlite3.connect(server.db) as db:
        db.execute("DELETE FROM requests")
    # a message waiting for long: backlog WARN; a failed reply: replies WARN
    assert server.post_chat(server_body()).status_code == 200
    server.wait_files(1)
    old = int((time.time() - 7200) * 1000)
    with sqlite3.connect(server.db) as db:
        db.execute("UPDATE requests SET received_ms = ?", (old,))
    assert doctor(env, conf, server)["backlog"]["status"] == "WARN"
    (rid,) = [r["id"] for r in server.rows("SELECT id FROM requests")]
    gateway.mode = "unsupported-channel"
    gw = {**env, "AI_AGENT_PROXY_OPENCLAW_GATEWAY_URL": gateway.url,
          "AI_AGENT_PROXY_OPENCLAW_GATEWAY_TOKEN": TOKEN}  # fmt: skip
    assert reply_run(server, gw, "reply", rid, "--message", "hi").returncode == 1
    replies = doctor(env, conf, server)["replies"]
    assert replies["status"] == "WARN" and "unsupported channel" in replies["detail"]
    gateway.mode = "ok"
    assert reply_run(server, gw, "reply", rid, "--message", "hi").returncode == 0
    checks = doctor(env, conf, server)
    assert (checks["replies"]["status"], checks["backlog"]["status"]) == ("PASS", "PASS")


def test_doctor_on_odd_openclaw_configs(tmp_path: Path) -> None:
    """The OpenClaw checks on configs as people leave them (read as `config get` gives
    them): loopback names for one another, a model as text or {primary}, agents listed,
    nothing set."""
    from ai_agent_proxy.config import load_settings
    from ai_agent_proxy.doctor import Context, check_agents_model, check_dm_scope, check_provider

    def provider(base: str, host: str = "127.0.0.1") -> tuple[str, str]:
        settings = load_settings(None, {"host": host, "port": "7011", "key": "k" * 20})
        config = {"models": {"providers": {"p": {"baseUrl": base, "apiKey": "k" * 20,
                                                 "api": "openai-completions"}}}}  # fmt: skip
        ctx = Context(settings, None, "openclaw", config, tmp_path / "openclaw.json")
        c = check_provider(ctx)
        return c.status.value, c.detail

    assert provider("http://localhost:7011/v1/")[0] == "PASS"  # another name for loopback
    assert provider("http://[::1]:7011/v1", host="0.0.0.0")[0] == "PASS"
    assert provider("http://192.168.1.5:7011/v1", host="192.168.1.5")[0] == "PASS"
    assert provider("http://192.168.1.6:7011/v1", host="192.168.1.5")[0] == "FAIL"
    assert provider("http://10.0.0.1:7011/v1")[0] == "FAIL"
    assert provider("http://127.0.0.1:7011/v2")[0] == "FAIL"
    unread = Context(load_settings(None, {}), None, "openclaw", None, tmp_path / "o.json")
    assert f"OpenClaw's config ({tmp_path / 'o.json'}) cannot be read" in check_provider(
        unread).detail  # fmt: skip

    def model(agents: Any, name: str | None = "p") -> tuple[str, str]:
        ctx = Context(load_settings(None, {}), None, "openclaw", {"agents": agents}, None, name)
        c = check_agents_model(ctx)
        return c.status.value, c.detail

    assert model({"defaults": {"model": "p/m"}}) == ("PASS", "p/m: the agents' default model")
    assert model({"defaults": {"model": {"primary": "p/m"}}})[0] == "PASS"
    listed = {"list": [{"id": "main", "model": "x/y"}, "odd", {"id": "helper",
              "model": {"primary": "p/m"}}, {"id": "bare", "model": None}]}  # fmt: skip
    assert model(listed) == ("PASS", "agents helper use p")
    assert model({})[0] == "FAIL" and "(default model: unset)" in model({})[1]
    assert "(default model: x/y)" in model({"defaults": {"model": "x/y"}})[1]
    assert model({"defaults": {"model": "p/m"}}, name=None)[0] == "SKIP"

    def scope(session: Any) -> tuple[str, str]:
        ctx = Context(load_settings(None, {}), None, "openclaw", {"session": session})
        c = check_dm_scope(ctx)
        return c.status.value, c.detail

    assert scope({})[0] == "WARN" and "session.dmScope unset (main)" in scope({})[1]
    assert scope({"dmScope": "main"})[1].startswith("session.dmScope main:")
    assert scope({"dmScope": "per-account-channel-peer"})[0] == "PASS"


def server_body() -> Any:
    from .conftest import fixture_body

    return fixture_body("openclaw-2026.9-telegram-dm-turn2.json")


SYSTEMCTL = """#!/bin/sh
[ "$1 $2" = "--user is-active" ] && exit "${FAKE_ACTIVE:-3}"
exit 0
"""


def test_setup_with_service_installs_the_proxys_and_the_runners_units(openclaw, tmp_path) -> None:
    """`setup --service --agent claude` (systemd and loginctl stand-ins on PATH): both user
    units written, started through systemctl; with --dry-run neither, nor the next step."""
    env, _, _ = openclaw
    for tool in ("systemctl", "loginctl"):
        (tmp_path / "bin" / tool).write_text(SYSTEMCTL)
        (tmp_path / "bin" / tool).chmod(0o755)
    config_home = tmp_path / "config-home"
    env = {**env, "XDG_CONFIG_HOME": str(config_home), "HOME": str(tmp_path / "home")}
    units = config_home / "systemd" / "user"
    conf = tmp_path / "proxy.conf"
    args = ["setup", "-f", str(conf), "--service", "--agent", "claude", "--manager", "systemd"]
    dry = ran(env, *args, "--dry-run")
    assert dry.exit_code == 0 and not units.exists() and "next: start" not in dry.output
    r = ran(env, *args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in units.iterdir()) == [
        "ai-agent-proxy-agent.service", "ai-agent-proxy.service",
    ]  # fmt: skip
    runner = (units / "ai-agent-proxy-agent.service").read_text()
    assert " agent " in runner and "--preset claude" in runner and key_of(conf) not in runner
    assert "next: start the proxy" in r.output
    assert ran(env, "setup", "-f", str(conf), "--agent", "claude").exit_code == 2  # no --service
    # the manager asked for, not this OS's
    (tmp_path / "bin" / "launchctl").write_text(SYSTEMCTL)
    (tmp_path / "bin" / "launchctl").chmod(0o755)
    assert ran(env, "setup", "-f", str(conf), "--service", "--manager", "launchd").exit_code == 0
    agents = tmp_path / "home" / "Library" / "LaunchAgents"
    assert [p.name for p in agents.iterdir()] == ["ai.openclaw.ai-agent-proxy.plist"]


def test_doctor_on_an_installed_runner(healthy, tmp_path) -> None:
    env, _, conf, server, _ = healthy
    assert doctor(env, conf, server)["agent runner"]["status"] == "SKIP"  # none installed
    config_home = tmp_path / "config-home"
    unit = config_home / "systemd" / "user" / "ai-agent-proxy-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    (tmp_path / "bin" / "systemctl").write_text(SYSTEMCTL)
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    env = {**env, "XDG_CONFIG_HOME": str(config_home)}
    runner = doctor(env, conf, server)["agent runner"]
    assert runner["status"] == "FAIL" and "installed but not running" in runner["detail"]
    running = doctor({**env, "FAKE_ACTIVE": "0"}, conf, server)["agent runner"]
    assert running["status"] == "PASS" and "runs in the last day: none" in running["detail"]
