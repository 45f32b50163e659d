"""Configuration: precedence, validation errors (one line, exit 2), masking, warnings."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ai_agent_proxy.cli import cli as cli_app
from ai_agent_proxy.config import load_settings, parse_config_file
from ai_agent_proxy.errors import ConfigError

from .conftest import Server, cli


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "ai_agent_proxy", *args],
        cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "proxy.conf"
    conf.write_text("# comment\nPORT=8001\nHOST=\"0.0.0.0\"\nREPLY='from file'\nMODEL_ID=f\n")
    env = {"AI_AGENT_PROXY_PORT": "8002", "AI_AGENT_PROXY_REPLY": "from env"}
    s = load_settings(str(conf), {"port": "8003"}, env)
    assert (s.port, s.reply, s.host, s.model_id, s.worker) == (8003, "from env", "0.0.0.0", "f", 1)
    s = load_settings(str(conf), {}, env)
    assert s.port == 8002
    s = load_settings(str(conf), {}, {})
    assert (s.port, s.reply) == (8001, "from file")
    s = load_settings(None, {}, {})  # no ./.ai-agent-proxy.conf in cwd
    assert (s.port, s.host, s.reply) == (7011, "127.0.0.1", "")
    assert s.inbox == Path("~/.openclaw/workspace/inbox").expanduser()
    assert s.db_path.name == "outbox.db" and s.db_path.parent.name.startswith("inbox-")
    assert s.inbox.parent not in s.db_path.parents  # not inside the agent's workspace
    other = load_settings(None, {"inbox": str(tmp_path / "other" / "inbox")}, {})
    assert other.db_path != s.db_path  # one outbox per inbox
    before = s.db_path
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # honoured
    after = load_settings(None, {}, {}).db_path
    assert after.parent.parent == tmp_path / "state" / "ai-agent-proxy" and after != before


def test_default_config_file_is_read_from_cwd(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".ai-agent-proxy.conf").write_text("PORT=9123\nMAX_BODY=2MiB\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, {}, {})
    assert (s.port, s.max_body) == (9123, 2 * 1024 * 1024)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("flag", "PORT='http' (from flag --port)"),
        ("env", "PORT='http' (from environment AI_AGENT_PROXY_PORT)"),
        ("file", "PORT='http' (from config file"),
    ],
)
def test_bad_value_names_key_value_and_source(tmp_path: Path, where: str, expected: str) -> None:
    args, env = [], {}
    if where == "flag":
        args = ["--port", "http"]
    elif where == "env":
        env = {"AI_AGENT_PROXY_PORT": "http"}
    else:
        (tmp_path / ".ai-agent-proxy.conf").write_text("PORT=http\n")
    r = cli("serve", *args, cwd=tmp_path, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expected in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--worker", "0"], "WORKER='0'"),
        (["--url", "ftp://x"], "URL='ftp://x'"),
        (["--max-body", "lots"], "MAX_BODY='lots'"),
        (["--backend-timeout", "-1"], "BACKEND_TIMEOUT='-1'"),
        (["--dedup-window", "soon"], "DEDUP_WINDOW='soon'"),
        (["-f", "missing.conf"], "missing.conf does not exist"),
    ],
)
def test_each_bad_value_is_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    r = cli("serve", *args, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key PROT .*:2"):
        parse_config_file("PORT=1\nPROT=2\n", "x.conf")


def test_secret_is_masked_in_errors_and_summary(tmp_path: Path) -> None:
    s = load_settings(None, {"key": "supersecretvalue99", "api_key": "sk-abcdefghijklmn"}, {})
    summary = s.summary()
    assert "supersecretvalue99" not in str(summary) and "sk-abcdefghijklmn" not in str(summary)
    assert summary["KEY"].startswith("****")


def test_public_bind_without_key_warns(make_server) -> None:
    server: Server = make_server("--host", "0.0.0.0")
    assert "WITHOUT A KEY" in server.log()
    quiet: Server = make_server("--host", "0.0.0.0", key="k-0123456789abcdef")
    assert "WITHOUT A KEY" not in quiet.log()
    assert "k-0123456789abcdef" not in quiet.log()


@pytest.mark.process
def test_db_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name, applied_at)")
    conn.execute("INSERT INTO schema_migrations VALUES (999, '0999_future.sql', 'x')")
    conn.commit()
    conn.close()
    r = run_cli("--db", str(db), "--inbox", str(tmp_path / "inbox"), cwd=tmp_path)
    assert r.returncode == 2
    assert "schema version 999, newer than this ai-agent-proxy" in r.stderr
    assert "Traceback" not in r.stderr


def test_migrations_recorded(server: Server) -> None:
    rows = server.rows("SELECT version, name FROM schema_migrations")
    assert rows[0] == {"version": 1, "name": "0001_init.sql"}
    assert server.db.stat().st_mode & 0o777 == 0o600


@pytest.mark.process
def test_port_in_use_is_one_line(server: Server, tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    r = run_cli("--port", str(server.port), "--inbox", str(tmp_path / "i"), "--db", str(db),
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1
    assert not db.exists() and not (tmp_path / "i").exists()  # nothing made for nothing
    assert f"cannot serve on 127.0.0.1:{server.port}" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--header-timeout", "nan"], "HEADER_TIMEOUT='nan' (from flag --header-timeout): must be a"
                                      " finite number"),
        (["--retention-days", "inf"], "RETENTION_DAYS='inf' (from flag --retention-days): must be"),
        (["--dedup-window", "1e300"], "DEDUP_WINDOW='1e300' (from flag --dedup-window): must be"
                                      " from 0 to 86400"),
        (["--body-timeout", "0"], "BODY_TIMEOUT='0' (from flag --body-timeout): must be from"),
        (["--body-timeout", "-inf"], "BODY_TIMEOUT='-inf'"),
        (["--body-min-rate", "0"], "BODY_MIN_RATE='0'"),
        (["--backend-timeout", "NaN"], "BACKEND_TIMEOUT='NaN'"),
        (["--url", "http://[::1/v1"], "URL='http://[::1/v1' (from flag --url): is not a valid URL"),
        (["--url", "http://h:99999/v1"], "is not a valid URL (Port out of range"),
        (["--url", "http://bob:sk-pw-1234@h/v1"], "URL='http://****@h/v1' (from flag --url): must"
                                                  " not hold"),
        (["--url", "http:///v1"], "must be an http:// or https:// URL with a host"),
    ],
)  # fmt: skip
def test_absurd_values_and_malformed_urls_are_refused(
    tmp_path: Path, monkeypatch, args: list[str], needle: str
) -> None:
    """In-process (Typer's CliRunner): one line naming the setting, exit 2, no traceback."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli_app, ["serve", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sk-pw-1234" not in r.output and "Traceback" not in r.output


def test_keys_must_be_printable_ascii(tmp_path: Path, monkeypatch) -> None:
    """A non-ASCII API_KEY was accepted, then made start-up fail inside httpx and hang."""
    monkeypatch.chdir(tmp_path)
    for flag, value in (("--api-key", "sk-é-0123456789"), ("--key", "k 0123456789")):
        r = CliRunner().invoke(cli_app, ["serve", flag, value, "--url", "http://127.0.0.1:9/v1"])
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.strip().splitlines()
        assert "=**** (from flag" in line and "printable ASCII" in line
        assert value not in r.output


def test_a_bom_before_the_first_key_is_no_part_of_it(tmp_path: Path) -> None:
    conf = tmp_path / "proxy.conf"
    conf.write_bytes("\ufeffPORT=8123\nREPLY=hé\n".encode())
    s = load_settings(str(conf), {}, {})
    assert (s.port, s.reply) == (8123, "hé")


def test_a_settings_file_with_a_key_that_others_may_read_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ai_agent_proxy.config import exposed_secrets, settings_file
    from ai_agent_proxy.startup import announce

    conf = tmp_path / "proxy.conf"
    conf.write_text("KEY=k-0123456789abcdef\nPORT=7011\n")
    conf.chmod(0o644)
    settings = load_settings(str(conf), {}, {})
    with caplog.at_level("WARNING"):
        announce(settings, settings_file(str(conf)))
    (said,) = [r.getMessage() for r in caplog.records if "readable_by_others" in r.getMessage()]
    assert f"holds KEY and others may read it (mode 644): chmod 600 {conf}" in said
    assert "k-0123456789abcdef" not in caplog.text
    conf.chmod(0o600)
    assert exposed_secrets(conf) is None
    conf.chmod(0o640)
    assert exposed_secrets(conf) is not None  # the group counts as others
    conf.write_text("PORT=7011\nKEY=\n")  # no secret in it: nothing to say
    conf.chmod(0o644)
    assert exposed_secrets(conf) is None
    conf.write_text("API_KEY=sk-x-0123456789\n")
    assert "holds API_KEY" in (exposed_secrets(conf) or "")
    assert exposed_secrets(None) is None and settings_file(str(tmp_path / "none")) is None
