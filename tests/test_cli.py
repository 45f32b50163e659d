"""`history` and `replay` run as real commands against a DB written by the real server."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ai_agent_proxy.cli import cli as app

from . import openclaw as oc
from .conftest import SKILL_PATH, Server, cli, fixture_body, new_server, wait_until
from .embedded import EmbeddedServer

TURN1 = "openclaw-2026.9-telegram-dm-turn1.json"
TURN2 = "openclaw-2026.9-telegram-dm-turn2.json"
GROUP = "openclaw-2026.9-telegram-group.json"


def ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose DB holds every kind of row, shared by the module's tests: they only
    read it (and the one that needs no server stops it). Its skill path is the one the
    in-process commands use (in CI the server runs the installed package)."""
    server = new_server(
        tmp_path_factory.mktemp("populated") / "server",
        env={"AI_AGENT_PROXY_OPENCLAW_MESSAGE_CLI_SKILL_PATH": str(SKILL_PATH)},
        kind=EmbeddedServer,
    ).start()
    server.post_chat(fixture_body(TURN1))
    server.post_chat(fixture_body(TURN2))
    server.post_chat(oc.retry_of(fixture_body(TURN2)))  # duplicate
    server.post_chat(fixture_body(GROUP))
    for i in range(6):
        note = {"role": "user", "content": f"note {i} 100%_done"}
        server.post_chat({"channel": "api", "user_id": f"u{i % 2}", "messages": [note]})
    server.wait_files(9)
    try:
        yield server
    finally:
        server.stop()


def db_args(server: Server) -> list[str]:
    return ["--db", str(server.db)]


def test_history_formats_parse_back(populated: Server) -> None:
    records = json.loads(ok("history", *db_args(populated), "--format", "json"))
    assert len(records) == 10
    assert records[0]["latest_user_prompt"] == "note 5 100%_done"  # newest first
    for key in ("id", "received_at", "context_id", "state", "inbox_file",
                "latest_user_prompt", "backend_status"):  # fmt: skip
        assert key in records[0]
    assert sorted(populated.inbox_names()) == sorted(
        r["inbox_file"] for r in records if r["state"] == "written"
    )
    lines = ok("history", *db_args(populated), "--format", "jsonl").splitlines()
    assert [json.loads(line) for line in lines] == records
    rows = list(csv.DictReader(io.StringIO(ok("history", *db_args(populated), "--format", "csv"))))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert rows[0]["latest_user_prompt"] == "note 5 100%_done"
    table = ok("history", *db_args(populated))
    for r in records:
        assert r["id"][-8:] in table  # the random tail: unique, and `show` takes it
    assert "hello from telegram DM" in table


def test_history_filters(populated: Server) -> None:
    def ids(*args: str) -> list[str]:
        found = json.loads(ok("history", *db_args(populated), "--format", "json", *args))
        return [r["latest_user_prompt"] for r in found]

    assert ids("--context-id", "telegram:123456789") == [
        "second message, normal mode", "second message, normal mode", "hello from telegram DM",
    ]  # fmt: skip
    assert ids("--state", "duplicate") == ["second message, normal mode"]
    assert len(ids("--state", "written")) == 9
    assert ids("--state", "pending") == [] and ids("--state", "failed") == []
    assert ids("--search", "100%_") == [f"note {i} 100%_done" for i in range(5, -1, -1)]
    assert ids("--search", "%") == ids("--search", "100%")  # LIKE wildcards are literal
    assert ids("--limit", "2") == ["note 5 100%_done", "note 4 100%_done"]
    assert len(ids("--since", "10m")) == 10
    assert ids("--until", "1h") == []
    now = datetime.now(timezone.utc)
    assert len(ids("--until", now.isoformat())) == 10
    later = (now + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")  # (whole seconds)
    assert ids("--since", later + "Z", "--limit", "0") == []


def test_history_show_and_stats(populated: Server) -> None:
    records = json.loads(ok("history", *db_args(populated), "--format", "json", "--limit", "0"))
    first = records[-1]
    doc = json.loads(ok("history", "show", first["id"], *db_args(populated), "--format", "json"))
    assert doc["body"] == fixture_body(TURN1)
    assert doc["state"] == "written" and doc["failed_attempts"] == []
    assert doc["inbox_path"].endswith(first["inbox_file"])
    # by prefix, by file name, and as text
    assert json.loads(ok("history", "show", first["id"][:20], *db_args(populated),
                         "--format", "json"))["id"] == first["id"]  # fmt: skip
    text = ok("history", "show", first["inbox_file"], *db_args(populated))
    assert "hello from telegram DM" in text and first["id"] in text

    stats = json.loads(ok("history", "stats", *db_args(populated), "--format", "json"))
    assert stats["total"] == 10
    assert stats["by_state"] == {"written": 9, "duplicate": 1, "failed": 0}
    assert stats["backlog"] == 0
    assert stats["request_to_file_ms"]["count"] == 9
    assert stats["request_to_file_ms"]["p99"] is not None
    assert stats["top_contexts"][0] == {
        "context_id": "api:u0",
        "requests": 3,
        "last_at": stats["top_contexts"][0]["last_at"],
    }
    assert "by_state" in ok("history", "stats", *db_args(populated))


def test_show_lists_failed_attempts(make_server) -> None:
    server = make_server(start=False)
    server.inbox.parent.mkdir(parents=True, exist_ok=True)
    server.inbox.write_text("in the way")
    server.start()
    server.post_chat({"messages": [{"role": "user", "content": "stuck"}]})
    wait_until(lambda: server.rows()[0]["last_error"], message="no failed write recorded")
    (rec,) = json.loads(ok("history", *db_args(server), "--format", "json"))
    assert rec["state"] == "failed"
    assert json.loads(ok("history", *db_args(server), "--state", "failed", "--format", "json"))
    doc = json.loads(ok("history", "show", rec["id"], *db_args(server), "--format", "json"))
    assert doc["failed_attempts"] and "Error" in doc["failed_attempts"][0]["error"]
    stats = json.loads(ok("history", "stats", *db_args(server), "--format", "json"))
    assert stats["backlog"] == 1 and stats["by_state"]["failed"] == 1


def test_replay_rewrites_the_same_files(populated: Server, tmp_path: Path) -> None:
    originals = {n: (populated.inbox / n).read_bytes() for n in populated.inbox_names()}
    populated.stop()  # replay must not need the server (the other tests only read the DB)
    again = tmp_path / "inbox"
    r = cli("replay", "--all", "--inbox", str(again), "--db", str(populated.db))
    assert r.returncode == 0, r.stderr
    assert "wrote 9 file(s)" in r.stderr and "skipped 1 duplicate" in r.stderr
    assert {n: (again / n).read_bytes() for n in sorted(os.listdir(again))} == originals
    # idempotent: a second run adds nothing and changes nothing
    ok("replay", "--all", "--inbox", str(again), "--db", str(populated.db))
    assert {n: (again / n).read_bytes() for n in sorted(os.listdir(again))} == originals


def test_replay_selection_full_and_dry_run(populated: Server, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    compact = [json.loads(b) for b in
               ((populated.inbox / n).read_bytes() for n in populated.inbox_names())
               if "request_id" in json.loads(b)]  # fmt: skip
    target = compact[0]["request_id"]
    r = cli("replay", target, "--full", "--inbox", str(out), "--db", str(populated.db))
    assert r.returncode == 0, r.stderr
    (name,) = os.listdir(out)
    assert name.endswith(f"-{target}.json")
    payload = json.loads((out / name).read_text())
    assert payload["messages"] and payload["tools"]  # expanded
    assert payload["latest-user-prompt"] == compact[0]["latest-user-prompt"]

    listing = ok("replay", "--context-id", "api:u1", "--dry-run", "--inbox", str(tmp_path / "d"),
                 "--db", str(populated.db))  # fmt: skip
    assert len(listing.splitlines()) == 3
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["history", "show", "0123456789abcdef"], "no request with id"),
        (["history", "show", "xyz"], "is not a request id"),
        (["history", "--since", "last tuesday"], "cannot read time"),
        (["history", "--state", "lost"], "unknown --state"),
        (["history", "--format", "xml"], "unknown --format"),
        (["replay", "0123456789abcdef"], "no request with id"),
        (["replay"], "say what to replay"),
    ],
)
def test_bad_input_is_one_line_exit_2(populated: Server, args: list[str], needle: str) -> None:
    r = CliRunner().invoke(app, [*args, "--db", str(populated.db)])  # in-process
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_missing_and_newer_db(tmp_path: Path) -> None:
    r = cli("history", "--db", str(tmp_path / "none.db"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    db = tmp_path / "future.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER, name TEXT, applied_at)")
        conn.execute("INSERT INTO schema_migrations VALUES (42, 'x', 'y')")
    for args in (["history"], ["history", "stats"], ["replay", "--all"]):
        r = cli(*args, "--db", str(db))
        assert r.returncode == 2 and "newer than this ai-agent-proxy" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    (tmp_path / "text.db").write_text("not a database at all")
    r = cli("history", "--db", str(tmp_path / "text.db"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_replay_into_an_unwritable_inbox(populated: Server, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    r = cli("replay", "--all", "--db", str(populated.db), "--inbox", str(blocked))
    assert r.returncode == 1, r.stderr
    assert "cannot write to" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_history_names_only_files_that_were_written(populated: Server) -> None:
    records = json.loads(ok("history", *db_args(populated), "--format", "json"))
    (dup,) = [r for r in records if r["state"] == "duplicate"]
    assert dup["inbox_file"] is None and dup["duplicate_of"]
    named = [r["inbox_file"] for r in records if r["inbox_file"]]
    assert sorted(named) == populated.inbox_names()
    doc = json.loads(ok("history", "show", dup["id"], *db_args(populated), "--format", "json"))
    assert doc["inbox_file"] is None and "inbox_path" not in doc
    assert doc["duplicate_of"] == dup["duplicate_of"]
    rows = list(csv.DictReader(io.StringIO(ok("history", *db_args(populated), "--format", "csv"))))
    assert [r["inbox_file"] for r in rows if r["state"] == "duplicate"] == [""]


def test_any_unique_part_of_an_id_is_accepted(populated: Server) -> None:
    records = json.loads(ok("history", *db_args(populated), "--format", "json"))
    rec = records[3]
    for part in (rec["id"][-12:], rec["id"][-8:], rec["id"][10:26], rec["inbox_file"]):
        doc = json.loads(ok("history", "show", part, *db_args(populated), "--format", "json"))
        assert doc["id"] == rec["id"]
    # the time-ordered start is shared by requests of the same minute: ambiguous, said so
    r = cli("history", "show", rec["id"][:8], *db_args(populated))
    assert r.returncode == 2 and "matches several requests" in r.stderr


@pytest.mark.process
def test_closed_stdout_is_not_an_error(populated: Server) -> None:
    """`history | head -1`, `replay --dry-run | head`: the reader left early; exit 0 quietly."""
    for args in (["history", "--limit", "0"], ["history", "--format", "jsonl"],
                 ["replay", "--all", "--dry-run"], ["history", "stats"]):  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "ai_agent_proxy", *args, *db_args(populated)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # as `head` does once it has its line
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 0, (args, err)
        assert "Broken pipe" not in err and "Traceback" not in err and "cannot write" not in err


def test_db_path_with_hash_and_question_mark(make_server, tmp_path: Path) -> None:
    server = make_server()
    server.post_chat({"messages": [{"role": "user", "content": "odd path"}]})
    server.wait_files(1)
    server.stop()
    odd = tmp_path / "a#b?c"
    odd.mkdir()
    shutil.copy(server.db, odd / "outbox.db")
    before = set(os.listdir(tmp_path))
    records = json.loads(ok("history", "--db", str(odd / "outbox.db"), "--format", "json"))
    assert [r["latest_user_prompt"] for r in records] == ["odd path"]
    assert set(os.listdir(tmp_path)) == before  # no stray file "a" beside the folder
    assert all(n.startswith("outbox.db") for n in os.listdir(odd))


def test_text_views_are_plain_lines(populated: Server) -> None:
    first = json.loads(ok("history", *db_args(populated), "--format", "json"))[-1]
    text = ok("history", "show", first["id"], *db_args(populated), "--inbox", str(populated.inbox))
    assert "None" not in text and "{" not in text  # no Python None, no JSON blocks
    assert f"inbox_path: {populated.inbox / first['inbox_file']}\n" in text
    assert "latest_user_prompt: hello from telegram DM\n" in text
    assert "body: " in text and "--format json" in text
    stats = ok("history", "stats", *db_args(populated))
    assert "by_state.written: 9\n" in stats and "top_contexts[1].context_id: api:u0\n" in stats
    assert "None" not in stats


def skill_commands() -> list[str]:
    """Every command line the shipped skills give an agent: inline `ai-agent-proxy ...` and
    the lines of their bash blocks (front matter aside: it only names commands)."""
    import re

    skills = Path(__file__).parents[1] / "ai_agent_proxy" / "skills"
    text = "".join(p.read_text().split("---", 2)[2] for p in sorted(skills.glob("*/SKILL.md")))
    found = re.findall(r"`(ai-agent-proxy [^`]+)`", text)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        found += [line.split("  #")[0].strip() for line in block.splitlines()
                  if line.startswith(("ai-agent-proxy", "openclaw"))]  # fmt: skip
    return list(dict.fromkeys(found))


@pytest.mark.process
def test_skills_commands_run_as_written(make_server, tmp_path: Path) -> None:
    """Every command the shipped skills tell an agent to run works as written (bash, with the
    placeholders filled in), against a server on its defaults but for the inbox (the DB
    found from it), with a stand-in `openclaw` on PATH that records its argv: the text
    reaches it unharmed, and replies and `done` go to requests not answered yet."""
    from ai_agent_proxy.config import load_settings

    server = make_server(start=False)
    server.explicit_db = False  # the agent's commands find the DB from the inbox
    server.db = load_settings(None, {"inbox": str(server.inbox)}).db_path
    server.start()
    for n in range(6):  # each in a chat of its own: each reply answers a waiting chat
        body = oc.with_info(oc.typed(oc.load(oc.TURN2), f"message {n}"),
                            chat_id=f"telegram:{1000 + n}", message_id=str(50 + n))  # fmt: skip
        assert server.post_chat(body).status_code == 200
    names = server.wait_files(6)
    payloads = [
        json.loads((server.inbox / n).read_text()) | {"request_id": n[15:47]} for n in names
    ]  # (each the first of its chat: a full payload, named by id)
    targets = {p["request_id"]: p["target"] for p in payloads}
    fresh = iter(p["request_id"] for p in payloads[1:])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_log = tmp_path / "argv.jsonl"
    (bin_dir / "openclaw").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(argv_log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (bin_dir / "openclaw").chmod(0o755)
    message = 'It\'s "done" & costs $5\nsee you'
    commands = skill_commands()
    assert any(c.startswith("ai-agent-proxy reply") for c in commands), commands
    assert any(c.startswith("openclaw message send") for c in commands), commands
    full_dir = tmp_path / "full"
    for command in commands:
        request_id = next(fresh) if command.split()[1] in ("reply", "done") else payloads[1][
            "request_id"]  # fmt: skip
        line = (command.replace("<request_id>", request_id)
                .replace("<id>", payloads[1]["context_id"]).replace("/tmp/full", str(full_dir))
                .replace('"..."', '"$TEXT"'))  # fmt: skip
        assert "<" not in line, line
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "AI_AGENT_PROXY_INBOX": str(server.inbox),
            "REQUEST_ID": request_id, "TEXT": message, "AGENT_NAME": "skills-test",
            "CHANNEL": payloads[1]["channel"], "TARGET": payloads[1]["target"],
        }  # fmt: skip
        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=60)  # fmt: skip
        assert r.returncode == 0, (line, r.stderr)
    (written,) = os.listdir(full_dir)
    assert json.loads((full_dir / written).read_text())["messages"]  # expanded
    sent = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert sent and all(a[:2] == ["message", "send"] and message in a for a in sent)
    assert all(a[a.index("--target") + 1] in targets.values() for a in sent)
