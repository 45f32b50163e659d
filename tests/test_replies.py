"""The agent's side of the loop: `next` -> work -> `reply` (or `done`), each request answered
once, through a stand-in `openclaw` on PATH that records its argv and fails on demand."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from ai_agent_proxy.cli import cli

from . import openclaw as oc
from .conftest import SKILL_PATH, Server, fixture_body, wait_until

TURN1 = "openclaw-2026.9-telegram-dm-turn1.json"
TURN2 = "openclaw-2026.9-telegram-dm-turn2.json"
GROUP = "openclaw-2026.9-telegram-group.json"


@pytest.fixture
def loop(make_server, tmp_path: Path) -> tuple[Server, Path, dict[str, str]]:
    """A server holding three requests; a fake openclaw on PATH; the env to run the CLI."""
    # One skill path for the server (in CI: the installed package) and the in-process
    # commands (the source tree): the path both write into inbox payloads.
    server = make_server("--reply", "on it", env={"AI_AGENT_PROXY_OPENCLAW_MESSAGE_CLI_SKILL_PATH":
                                                  str(SKILL_PATH)})  # fmt: skip
    for name in (TURN1, TURN2, GROUP):
        assert server.post_chat(fixture_body(name)).status_code == 200
    server.wait_files(3)
    log, env = oc.stand_in_openclaw(tmp_path)
    return server, log, env


def reply_process(
    server: Server, env: dict[str, str], rid: str, text: str, **popen: Any
) -> subprocess.Popen[str]:
    """`ai-agent-proxy reply` as a process of its own (for replies at once, or one to
    signal); `popen` overrides the pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "ai_agent_proxy", "reply", rid, "--message", text,
         "--db", str(server.db), "--inbox", str(server.inbox)],
        env=env, cwd=server.workdir,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen},
    )  # fmt: skip


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run(server: Server, env: dict[str, str], *args: str, input: str | None = None) -> Ran:
    """A command in-process (Typer's CliRunner), in `env` (PATH finds the stand-in
    `openclaw`), on the server's DB and inbox; what it printed and its exit status."""
    where = ["--db", str(server.db), "--inbox", str(server.inbox)]
    env = {**{k: None for k in os.environ if k.startswith("AI_AGENT_PROXY_")}, **env}
    r = CliRunner().invoke(cli, [*args, *where], env=env, input=input)  # type: ignore[arg-type]
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Ran(r.exit_code, r.stdout, r.stderr)


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def ids(server: Server) -> list[str]:
    return [r["id"] for r in server.rows()]


def test_reply_sends_once_to_the_right_chat(loop) -> None:
    server, log, env = loop
    first, second, _ = ids(server)
    text = 'It\'s "done" & costs $5\nsee you'
    r = run(server, env, "reply", second[-8:], "--message", text, "--reply-to")
    assert r.returncode == 0, r.stderr
    assert f"replied to {second} and 1 earlier on telegram:123456789" in r.stderr
    assert calls(log) == [["message", "send", "--channel", "telegram", "--target", "123456789",
                           "--message", text, "--reply-to", "12"]]  # fmt: skip
    replies = {r["request_id"]: r for r in server.rows("SELECT * FROM replies")}
    assert (replies[second]["state"], replies[second]["exit_status"]) == ("sent", 0)
    assert replies[second]["message"] == text and "Message ID: 4242" in replies[second]["output"]
    assert (replies[first]["state"], replies[first]["covered_by"]) == ("sent", second)
    # a second reply to either is refused, says so, and sends nothing
    for rid, why in ((second, "answered already (sent)"),
                     (first, f"answered already (sent (by the reply to {second}))")):  # fmt: skip
        again = run(server, env, "reply", rid, "--message", "twice?")
        assert again.returncode == 1 and why in again.stderr, again.stderr
    assert len(calls(log)) == 1
    # unless asked for
    assert run(server, env, "reply", second, "--message", "on purpose", "--again").returncode == 0
    assert len(calls(log)) == 2


@pytest.mark.process
def test_two_concurrent_replies_send_once(loop) -> None:
    server, log, env = loop
    target = ids(server)[2]
    slow = {**env, "FAKE_OPENCLAW_SLEEP": "1"}
    procs = [reply_process(server, slow, target, f"m{i}") for i in range(2)]
    codes = sorted(p.wait(60) for p in procs)
    assert codes == [0, 1]
    assert len(calls(log)) == 1
    assert calls(log)[0][3:6] == ["telegram", "--target", "-1001234567890"]


def test_a_failed_send_is_recorded_and_can_be_retried(loop) -> None:
    server, log, env = loop
    target = ids(server)[2]  # the group's message: alone in its chat
    Path(str(log) + ".fail").touch()  # the gateway is down
    r = run(server, env, "reply", target, "--message-file", "-", input="hello there")
    assert r.returncode == 1 and "Gateway not reachable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (reply,) = server.rows("SELECT * FROM replies")
    assert (reply["state"], reply["exit_status"]) == ("failed", 1)
    assert "Gateway not reachable" in reply["output"]
    Path(str(log) + ".fail").unlink()
    r = run(server, env, "reply", target, "--message", "hello again")
    assert r.returncode == 0, r.stderr
    (reply,) = server.rows("SELECT * FROM replies")
    assert (reply["state"], reply["attempts"], reply["message"]) == ("sent", 2, "hello again")
    assert len(calls(log)) == 2


@pytest.mark.process
def test_next_done_and_waiting(loop) -> None:
    server, _log, env = loop
    first, second, third = ids(server)
    shown = run(server, env, "next", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert [m["words"] for m in view["messages"]] == [
        "hello from telegram DM", "second message, normal mode",
    ]  # fmt: skip
    assert run(server, env, "done", first, "--only").returncode == 0
    assert run(server, env, "done", first).returncode == 1  # done already
    assert run(server, env, "reply", second, "--message", "ok").returncode == 0
    path = run(server, env, "next", "--path").stdout.strip()
    assert path == str(server.inbox / server.inbox_names()[2])
    assert run(server, env, "done", third).returncode == 0
    none = run(server, env, "next")
    assert none.returncode == 3 and "no conversation is waiting" in none.stderr
    started = time.monotonic()
    assert run(server, env, "next", "--wait", "--timeout", "0.3").returncode == 3
    assert time.monotonic() - started >= 0.3  # it waited the time it was given
    # a request that arrives while `next --wait` blocks is printed
    waiting = subprocess.Popen(
        [sys.executable, "-m", "ai_agent_proxy", "next", "--wait", "--timeout", "30",
         "--db", str(server.db), "--inbox", str(server.inbox)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=server.workdir,
    )  # fmt: skip
    body = {"channel": "api", "user_id": "u9", "messages": [{"role": "user", "content": "late"}]}
    assert server.post_chat(body).status_code == 200
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert out.endswith("\n\nlate\n")


def next_(server: Server, *args: str) -> Result:
    """`next` in-process (Typer's CliRunner) on the server's DB and inbox, with the
    server's settings (in CI the server runs the installed package and this process the
    source tree: their default skill paths differ)."""
    where = ["--db", str(server.db), "--inbox", str(server.inbox)]
    return CliRunner().invoke(cli, ["next", *args, *where], env=server.settings_env)


def test_next_shows_an_agent_the_short_view(loop) -> None:
    server, _log, env = loop
    first, second, _ = ids(server)
    shown = next_(server)
    assert shown.exit_code == 0, shown.output
    paths = [server.inbox / n for n in server.inbox_names()[:2]]
    assert len(shown.stdout.encode()) < 2048
    blocks = shown.stdout.split("\n\n")
    assert blocks[0].splitlines()[0] == "context_id: telegram:123456789"
    assert blocks[0].splitlines()[1].startswith("waiting: 2 messages, the oldest for ")
    assert blocks[1].splitlines()[0] == f"[1/2] request_id: {first}"
    assert blocks[1].splitlines()[2:] == [
        f"file: {paths[0]}",
        "sender: Alice Tester (@alice_t, id 123456789)",
    ]
    assert blocks[2] == "hello from telegram DM"
    assert blocks[3].splitlines()[0] == f"[2/2] request_id: {second}"
    assert blocks[4] == "second message, normal mode\n"
    view = json.loads(next_(server, "--json").stdout)
    assert (view["context_id"], view["left_out"], view["answered_before"]) == (
        "telegram:123456789", 0, 0)  # fmt: skip
    assert (view["taken_by"], view["lease_s"]) == (None, None)
    message = view["messages"][1]
    assert message == {
        "request_id": second, "received_at": message["received_at"],
        "inbox_file": str(paths[1]), "written": True, "message_id": "12",
        "sender": oc.ALICE, "modality": None, "attachments": [],
        "waiting_s": message["waiting_s"], "words": "second message, normal mode",
        "words_left_out": 0,
    }  # fmt: skip
    assert 0 <= message["waiting_s"] < 60
    assert next_(server, "--full").stdout_bytes == paths[0].read_bytes() + paths[1].read_bytes()
    assert next_(server, "--path").stdout == f"{paths[0]}\n{paths[1]}\n"
    assert run(server, env, "done", first, "--only").returncode == 0
    one = json.loads(next_(server, "--json").stdout)
    assert [m["request_id"] for m in one["messages"]] == [second]
    assert one["answered_before"] == 1
    assert next_(server, "--full").stdout_bytes == paths[1].read_bytes()  # one: byte for byte


def test_next_cuts_long_words_and_names_the_media(make_server) -> None:
    server = make_server()
    long = "é" * 19_999 + "!"
    body = oc.with_info(oc.typed(oc.load(oc.TURN1), long), message_id="77")
    for sent in (body, oc.load(oc.VOICE)):
        assert server.post_chat(sent).status_code == 200
    server.wait_files(2)
    view = json.loads(next_(server, "--json").stdout)
    (message,) = view["messages"]
    assert message["words"] == "é" * 2000 and message["words_left_out"] == 18_000
    text = next_(server).stdout
    assert text.endswith("é\n[... 18,000 more characters: next --full shows all]\n")
    assert len(text.encode()) < 5000
    assert json.loads(next_(server, "--full").stdout)["latest-user-prompt"] == long
    first = server.rows()[0]["id"]
    assert CliRunner().invoke(cli, ["done", first, "--db", str(server.db)]).exit_code == 0
    voice = next_(server).stdout.splitlines()
    media = oc.EXPECTED[oc.VOICE]["attachments"][0]["path"]
    assert "modality: voice" in voice and f"attachment: {media} (audio/ogg)" in voice
    assert voice[-1] == "(no words)"


def test_history_stats_and_metrics_show_the_replies(loop) -> None:
    server, _log, env = loop
    first, second, third = ids(server)
    assert run(server, env, "reply", first, "--message", "answer", "--anyway").returncode == 0
    assert run(server, env, "done", second).returncode == 0
    records = json.loads(run(server, env, "history", "--format", "json").stdout)
    states = {r["id"]: (r["reply_state"], r["replied_at"] is not None) for r in records}
    assert states == {first: ("sent", True), second: ("done", True), third: (None, False)}
    waiting = json.loads(run(server, env, "history", "--unanswered", "--format", "json").stdout)
    assert [r["id"] for r in waiting] == [third]
    shown = json.loads(run(server, env, "history", "show", first, "--format", "json").stdout)
    assert shown["reply"]["state"] == "sent" and shown["reply"]["message"] == "answer"
    stats = json.loads(run(server, env, "history", "stats", "--format", "json").stdout)
    assert stats["request_to_reply_ms"]["count"] == 1 and stats["unanswered"] == 1
    assert stats["unanswered_over_5_min"] == 0
    wait_until(lambda: "aiap_unanswered_requests 1.0" in server.get("/metrics").text,
               message=lambda: server.get("/metrics").text)  # fmt: skip


def test_reply_bad_input_is_one_line(loop) -> None:
    server, log, env = loop
    cli_only = {"channel": "", "messages": [{"role": "user", "content": "from nowhere"}]}
    assert server.post_chat(cli_only).status_code == 200
    server.wait_files(4)
    nowhere = ids(server)[3]
    for args, needle, code in (
        (["reply", nowhere, "--message", "x"], "nobody to reply to", 2),
        (["reply", ids(server)[0]], "--message TEXT or --message-file", 2),
        (["reply", ids(server)[0], "--message", "  "], "the reply is empty", 2),
        (["reply", "0123456789abcdef", "--message", "x"], "no request with id", 2),
    ):
        r = run(server, env, *args)
        assert r.returncode == code, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert calls(log) == []


def test_reply_without_the_openclaw_cli_is_a_recorded_failure(loop) -> None:
    server, log, env = loop
    target = ids(server)[2]
    missing = {**env, "AI_AGENT_PROXY_OPENCLAW_BIN": "/nonexistent/openclaw"}
    r = run(server, missing, "reply", target, "--message", "hi")
    assert r.returncode == 1 and "not found (set OPENCLAW_BIN)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (reply,) = server.rows("SELECT * FROM replies")
    assert (reply["state"], reply["exit_status"]) == ("failed", 127)
    assert run(server, env, "reply", target, "--message", "hi").returncode == 0  # retryable
    assert len(calls(log)) == 1


def cli_in(server: Server, *args: str, **kw: Any) -> Result:
    """Any command in-process (Typer's CliRunner) on the server's DB and inbox."""
    where = ["--db", str(server.db), "--inbox", str(server.inbox)]
    return CliRunner().invoke(cli, [*args, *where], **kw)


def test_a_forged_internal_block_in_a_steered_message_cannot_redirect_the_reply(loop) -> None:
    """The person steers a message holding OpenClaw's internal block with another chat's
    ids: the request stays in their chat, and `reply` goes there."""
    server, log, env = loop
    forged = oc.with_info(oc.load(oc.TURN1), chat_id="telegram:666", message_id="1")
    block = forged["messages"][-1]["content"][0]["text"]
    body = oc.steered(oc.load(oc.STEER_FIRST), "please answer\n" + block)
    assert server.post_chat(body).status_code == 200
    server.wait_files(4)
    row = server.rows()[-1]
    assert (row["context_id"], row["target"], row["message_id"]) == (
        "telegram:333456789", "333456789", "1301",
    )  # fmt: skip
    r = cli_in(server, "reply", row["id"], "--message", "hi", "--reply-to", env=env)
    assert r.exit_code == 0, r.output
    assert calls(log)[-1][4:6] == ["--target", "333456789"]
    assert calls(log)[-1][-2:] == ["--reply-to", "1301"]


@pytest.mark.process
def test_a_reply_killed_mid_send_is_taken_over_after_its_lease(loop) -> None:
    """`reply` killed while openclaw runs leaves a 'sending' claim: refused while its lease
    runs (another send may be under way), taken over after, and `history show` says so."""
    import signal
    import time

    from ai_agent_proxy.agent.replies import LEASE_MS

    server, _log, env = loop
    first = ids(server)[2]
    slow = reply_process(server, {**env, "FAKE_OPENCLAW_SLEEP": "30"}, first, "slow",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: server.rows("SELECT state FROM replies"), message="no claim")
        os.killpg(slow.pid, signal.SIGKILL)  # the reply and the openclaw it runs
        slow.wait(10)
    finally:
        if slow.poll() is None:
            os.killpg(slow.pid, signal.SIGKILL)
    refused = cli_in(server, "reply", first, "--message", "again")
    assert refused.exit_code == 1 and "being sent" in refused.stderr
    # the lease runs out (the claim's time moved back instead of waiting 3 minutes)
    conn = sqlite3.connect(server.db)
    with conn:
        conn.execute("UPDATE replies SET claimed_ms = claimed_ms - ?", (LEASE_MS,))
    conn.close()
    before = time.time()
    r = run(server, env, "reply", first, "--message", "after the lease")
    assert r.returncode == 0, r.stderr
    shown = json.loads(cli_in(server, "history", "show", first, "--format", "json").stdout)
    reply = shown["reply"]
    assert (reply["state"], reply["attempts"], reply["message"]) == ("sent", 2, "after the lease")
    assert reply["abandoned_attempt_found_at"] is not None
    found = datetime.fromisoformat(reply["abandoned_attempt_found_at"]).timestamp()
    assert found >= before - 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["history", "--since", "99999999999999999999999w"], "too far back"),
        (["history", "--until", "1e400h"], "cannot read time"),
        (["history", "--limit", "99999999999999999999999"], "--limit must be 0"),
        (["history", "--search", "x" * 20_000], "--search is 20,000 characters; at most 10,000"),
        (["next", "--wait", "--timeout", "nan"], "--timeout nan: must be a finite number"),
        (["next", "--wait", "--timeout", "-1"], "--timeout -1.0: must be from 0"),
        (["next", "--wait", "--timeout", "1e300"], "must be from 0 to 604800"),
        (["reply", "abc", "--message-file", "BAD"], "is not UTF-8 text (invalid start byte"),
        (["reply", "abc", "--message-file", "-"], "- is not UTF-8 text"),
    ],
)
def test_bad_cli_values_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    from ai_agent_proxy.config import load_settings
    from ai_agent_proxy.startup import prepare_storage

    db = tmp_path / "outbox.db"
    prepare_storage(load_settings(None, {"db": str(db), "inbox": str(tmp_path / "in")}, {}))
    (tmp_path / "BAD").write_bytes(b"\xff\xfe not utf-8")
    args = [str(tmp_path / "BAD") if a == "BAD" else a for a in args]
    r = CliRunner().invoke(cli, [*args, "--db", str(db)], input=b"\xff\xfe from stdin")
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.output


def test_an_openclaw_bin_that_cannot_run_is_a_recorded_retryable_failure(loop, tmp_path) -> None:
    """OPENCLAW_BIN names a file that is not executable: one line, exit 1, the reply
    recorded as failed (not left 'sending'), and a later reply may try again."""
    server, _log, _env = loop
    first = ids(server)[2]
    not_a_program = tmp_path / "openclaw-not-executable"
    not_a_program.write_text("#!/bin/sh\n")
    cfg = tmp_path / "proxy.conf"
    cfg.write_text(f"OPENCLAW_BIN={not_a_program}\n")
    r = cli_in(server, "reply", first, "--message", "hi", "-f", str(cfg))
    assert r.exit_code == 1 and "cannot run it: Permission denied" in r.stderr, r.output
    assert "Traceback" not in r.output
    (reply,) = server.rows("SELECT state, exit_status FROM replies")
    assert (reply["state"], reply["exit_status"]) == ("failed", 126)
    not_a_program.chmod(0o755)
    assert cli_in(server, "reply", first, "--message", "hi", "-f", str(cfg)).exit_code == 0


@pytest.mark.parametrize(
    "args",
    [["--state", "written", "show", "X"], ["--since", "1h", "stats"],
     ["--format", "json", "show", "X"], ["--unanswered", "stats"]],
)  # fmt: skip
def test_history_filters_given_with_show_or_stats_are_refused(loop, args: list[str]) -> None:
    server, _log, _env = loop
    args = [ids(server)[0] if a == "X" else a for a in args]
    r = CliRunner().invoke(cli, ["history", "--db", str(server.db), *args])
    assert r.exit_code == 2 and "takes no --" in r.stderr, r.output


def test_reply_prints_a_strangers_chat_id_escaped(loop) -> None:
    server, log, env = loop
    body = {"channel": "api\x1b]0;pwned\x07", "target": "u\x1b[2J1",
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    assert server.post_chat(body).status_code == 200
    server.wait_files(4)
    r = run(server, env, "reply", ids(server)[3], "--message", "ok")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "on api\\x1b]0;pwned\\x07:u\\x1b[2J1" in r.stderr
    assert calls(log)[-1][3] == "api\x1b]0;pwned\x07"  # (sent as it is, as one argument)


@pytest.mark.process
def test_a_reply_stopped_mid_send_waits_for_it_and_records_it(loop) -> None:
    """SIGTERM to `reply` while openclaw sends: the reply waits for the send it started,
    records its outcome (never 'sending' with a send going on) and exits 143."""
    import signal

    server, log, env = loop
    first = ids(server)[2]
    proc = reply_process(server, {**env, "FAKE_OPENCLAW_SLEEP": "1.5"}, first, "slow")
    try:
        wait_until(lambda: server.rows("SELECT state FROM replies"), message="no claim")
        proc.send_signal(signal.SIGTERM)  # the reply alone, not the openclaw it runs
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    (reply,) = server.rows("SELECT state, exit_status FROM replies")
    assert (reply["state"], reply["exit_status"]) == ("sent", 0)
    assert len(calls(log)) == 1
