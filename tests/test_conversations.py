"""Conversations: the agent answers a chat, not a message (SPEC section 7). People write in
bursts; `next` shows a chat's waiting messages together, a reply to the newest covers the
earlier ones, a reply to an older one while newer ones wait sends nothing (exit 4), and
takers never get the same chat. On captured bodies (the gateway's own bursts) and bursts
built from dm-turn2 with the named helpers; `openclaw` is a stand-in on PATH that logs its
calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from . import openclaw as oc
from .conftest import Server, wait_until
from .test_replies import Ran, calls, run

WORDS = ["hi, are you there", "one more thing: the invoice is wrong", "it is invoice 4711"]


def burst(words: list[str], chat: str = "telegram:123456789", first_id: int = 700) -> list[Any]:
    """A person's burst in one chat, each message its own turn (as OpenClaw sends them when
    each waits for the last: burst-empty), made from the captured dm-turn2."""
    return [
        oc.with_info(oc.typed(oc.load(oc.TURN2), w), chat_id=chat, message_id=str(first_id + i))
        for i, w in enumerate(words)
    ]


@pytest.fixture
def chats(make_server, tmp_path: Path) -> tuple[Server, Path, dict[str, str]]:
    """A burst of 3 in one chat and 1 message in another; a stand-in openclaw on PATH."""
    server = make_server("--reply", "on it")
    for body in [*burst(WORDS), *burst(["other chat"], "telegram:42", 900)]:
        assert server.post_chat(body).status_code == 200
    server.wait_files(4)
    log, env = oc.stand_in_openclaw(tmp_path)
    return server, log, env


def ids(server: Server) -> list[str]:
    return [r["id"] for r in server.rows("SELECT id FROM requests WHERE state = 'written'"
                                         " ORDER BY seq")]  # fmt: skip


def next_json(server: Server, env: dict[str, str], *args: str) -> dict[str, Any]:
    r = run(server, env, "next", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def unanswered(server: Server, env: dict[str, str]) -> list[str]:
    r = run(server, env, "history", "--unanswered", "--format", "json")
    return [rec["id"] for rec in reversed(json.loads(r.stdout))]


def test_a_burst_is_one_conversation_answered_once(chats) -> None:
    server, log, env = chats
    a, b, c, other = ids(server)
    chat = next_json(server, env)
    assert chat["context_id"] == "telegram:123456789"
    assert [(m["request_id"], m["words"]) for m in chat["messages"]] == list(
        zip((a, b, c), WORDS, strict=True)
    )
    assert (chat["left_out"], chat["answered_before"]) == (0, 0)
    # the oldest: refused, nothing sent, the two newer shown in the next format
    stale = run(server, env, "reply", a, "--message", "Hello!")
    assert stale.returncode == 4
    assert "2 newer message(s) of this conversation wait: nothing sent" in stale.stderr
    assert f"reply to the newest ({c}) to answer them all" in stale.stdout
    assert f"[1/2] request_id: {b}" in stale.stdout and f"[2/2] request_id: {c}" in stale.stdout
    assert WORDS[1] in stale.stdout and WORDS[2] in stale.stdout and WORDS[0] not in stale.stdout
    assert calls(log) == [] and server.rows("SELECT * FROM replies") == []
    # the newest: one send, all three answered
    sent = run(server, env, "reply", c, "--message", "Invoice 4711 is fixed.")
    assert sent.returncode == 0, sent.stderr
    assert f"replied to {c} and 2 earlier on telegram:123456789" in sent.stderr
    assert len(calls(log)) == 1 and calls(log)[0][-1] == "Invoice 4711 is fixed."
    assert unanswered(server, env) == [other]
    for rid in (a, b, c):  # a second reply to any of them is refused
        assert run(server, env, "reply", rid, "--message", "again?").returncode == 1
    assert len(calls(log)) == 1
    shown = json.loads(run(server, env, "history", "show", a, "--format", "json").stdout)
    assert (shown["reply"]["state"], shown["reply"]["covered_by"]) == ("sent", c)
    assert shown["answered_at"] is not None
    assert next_json(server, env)["context_id"] == "telegram:42"


def test_anyway_answers_up_to_the_message_and_the_newer_ones_wait(chats) -> None:
    server, log, env = chats
    _a, b, c, _ = ids(server)
    r = run(server, env, "reply", b, "--message", "About the invoice:", "--anyway")
    assert r.returncode == 0, r.stderr
    assert f"replied to {b} and 1 earlier" in r.stderr
    chat = next_json(server, env)
    assert [m["request_id"] for m in chat["messages"]] == [c]
    assert chat["answered_before"] == 2
    assert len(calls(log)) == 1


def test_done_covers_the_earlier_messages_and_only_does_not(chats) -> None:
    server, log, env = chats
    a, b, c, other = ids(server)
    assert run(server, env, "done", b, "--only").returncode == 0
    assert unanswered(server, env) == [a, c, other]
    r = run(server, env, "done", c)
    assert r.returncode == 0 and f"done: {c} and 1 earlier" in r.stderr
    assert unanswered(server, env) == [other]
    assert calls(log) == []
    done = {x["request_id"]: x for x in server.rows("SELECT * FROM replies")}
    assert (done[a]["state"], done[a]["covered_by"], done[b]["covered_by"]) == ("done", c, None)


def test_history_stats_and_metrics_count_the_covered_messages(chats) -> None:
    server, _log, env = chats
    a, b, c, other = ids(server)
    assert run(server, env, "reply", c, "--message", "all three").returncode == 0
    records = {r["id"]: r for r in
               json.loads(run(server, env, "history", "--format", "json").stdout)}  # fmt: skip
    assert [records[i]["reply_state"] for i in (a, b, c, other)] == ["sent"] * 3 + [None]
    assert all(records[i]["replied_at"] for i in (a, b, c))
    stats = json.loads(run(server, env, "history", "stats", "--format", "json").stdout)
    assert stats["request_to_reply_ms"]["count"] == 3 and stats["unanswered"] == 1
    wait_until(lambda: "aiap_unanswered_requests 1.0" in server.get("/metrics").text,
               message=lambda: server.get("/metrics").text)  # fmt: skip
    assert "aiap_waiting_conversations 1.0" in server.get("/metrics").text


def test_a_failed_send_leaves_the_whole_conversation_waiting(chats) -> None:
    server, log, env = chats
    a, b, c, _ = ids(server)
    Path(str(log) + ".fail").touch()  # the gateway is down
    failed = run(server, env, "reply", c, "--message", "hello")
    assert failed.returncode == 1 and "Gateway not reachable" in failed.stderr
    assert [m["request_id"] for m in next_json(server, env)["messages"]] == [a, b, c]
    Path(str(log) + ".fail").unlink()
    assert run(server, env, "reply", c, "--message", "hello again").returncode == 0
    assert unanswered(server, env) == [ids(server)[3]]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (oc.BURST_EMPTY, [0, 2, 4]),  # each message its own turn, each retried: 3 files
        (oc.BURST_STEERED, [0, 1, 2]),  # steered into a running turn: 3 files, one id
        ([oc.BURST_TIGHT], [0]),  # merged: one message of three lines
    ],
    ids=["burst-empty", "burst-steered", "burst-tight"],
)
def test_the_gateways_own_bursts_are_one_conversation(
    make_server, tmp_path: Path, names: list[str], expected: list[int]
) -> None:
    server = make_server("--reply", "on it")
    for name in names:
        assert server.post_chat(oc.raw(name)).status_code == 200
    server.wait_files(len(expected))
    r = run(server, {**os.environ, "PATH": os.environ["PATH"]}, "next", "--json")
    chat = json.loads(r.stdout)
    words = [oc.EXPECTED[names[i]]["prompt"] for i in expected]
    assert [m["words"] for m in chat["messages"]] == words
    assert chat["context_id"] == oc.EXPECTED[names[0]]["context_id"]


def test_a_steered_message_is_not_threaded_under_words_it_does_not_answer(
    make_server, tmp_path: Path
) -> None:
    """OpenClaw steers the later messages of a burst under the first one's id (5401):
    `--reply-to` would thread the answer under "hi, are you there"."""
    server = make_server("--reply", "on it")
    for name in oc.BURST_STEERED:
        assert server.post_chat(oc.raw(name)).status_code == 200
    server.wait_files(3)
    env = stand_in(tmp_path)
    first, _, newest = ids(server)
    r = run(server, env, "reply", newest, "--message", "Fixed.", "--reply-to")
    assert r.returncode == 0, r.stderr
    assert "not threaded: message id 5401 is also an earlier message's of this chat" in r.stderr
    assert "--reply-to" not in calls(Path(env["FAKE_OPENCLAW_LOG"]))[0]
    # the first message of the turn is threaded under its own words
    body = oc.with_info(oc.typed(oc.load(oc.TURN1), "new question"), message_id="777")
    assert server.post_chat(body).status_code == 200
    server.wait_files(4)
    assert (
        run(server, env, "reply", ids(server)[3], "--message", "A.", "--reply-to").returncode == 0
    )
    assert calls(Path(env["FAKE_OPENCLAW_LOG"]))[1][-2:] == ["--reply-to", "777"]
    assert first


def stand_in(tmp_path: Path) -> dict[str, str]:
    return oc.stand_in_openclaw(tmp_path)[1]


def post_chats(server: Server, count: int, first_chat: int, first_id: int) -> None:
    """One message in each of `count` chats, all in the inbox."""
    for i in range(count):
        for body in burst([f"chat {i} says hi"], f"telegram:{first_chat + i}", first_id + i):
            assert server.post_chat(body).status_code == 200
    server.wait_files(count)


def test_more_than_twenty_waiting_shows_the_newest_twenty(make_server, tmp_path: Path) -> None:
    server = make_server("--reply", "on it")
    for body in burst([f"message {i}" for i in range(-1, 23)]):
        assert server.post_chat(body).status_code == 200
    server.wait_files(24)
    env = stand_in(tmp_path)
    assert run(server, env, "done", ids(server)[0], "--only").returncode == 0
    chat = next_json(server, env)
    assert [m["words"] for m in chat["messages"]] == [f"message {i}" for i in range(3, 23)]
    assert (chat["left_out"], chat["answered_before"]) == (3, 1)  # counted from the oldest
    text = run(server, env, "next").stdout
    assert "waiting: 23 messages" in text and "left_out: 3 older waiting" in text
    # the reply to the newest covers all 23, those left out of the view too
    assert run(server, env, "reply", ids(server)[-1], "--message", "all").returncode == 0
    assert unanswered(server, env) == []


def test_a_request_without_a_chat_is_a_conversation_of_its_own(make_server, tmp_path) -> None:
    server = make_server("--reply", "on it")
    for name in (oc.CLI_LOCAL, oc.CLI_LOCAL):  # (a local session: no chat, no message id)
        body = oc.load(name)
        body["messages"][-1]["content"] += f" {len(server.rows())}"
        assert server.post_chat(body).status_code == 200
    server.wait_files(2)
    env = stand_in(tmp_path)
    first, second = ids(server)
    assert [m["request_id"] for m in next_json(server, env)["messages"]] == [first]
    assert next_json(server, env)["context_id"] is None
    assert run(server, env, "done", first).returncode == 0
    assert [m["request_id"] for m in next_json(server, env)["messages"]] == [second]


def test_takers_get_different_conversations_and_a_lease_runs_out(make_server, tmp_path) -> None:
    server = make_server("--reply", "on it")
    post_chats(server, 3, 500, 800)
    env = stand_in(tmp_path)
    mine = next_json(server, env, "--as", "alice", "--lease", "30s")
    assert (mine["context_id"], mine["taken_by"]) == ("telegram:500", "alice")
    assert 29 < mine["lease_s"] <= 30
    # others skip it; a look without --as skips it too; the same taker gets it again
    assert next_json(server, env, "--as", "bob")["context_id"] == "telegram:501"
    assert next_json(server, env)["context_id"] == "telegram:502"
    assert next_json(server, env, "--as", "alice")["context_id"] == "telegram:500"
    # a short lease runs out: the conversation comes back to whoever asks
    assert next_json(server, env, "--as", "carol", "--lease", "0.3")["context_id"] == "telegram:502"
    nothing = run(server, env, "next", "--json", "--as", "dave")
    assert nothing.returncode == 3  # all three held

    def dave_gets_it() -> bool:
        r = run(server, env, "next", "--json", "--as", "dave")
        return r.returncode == 0 and json.loads(r.stdout)["context_id"] == "telegram:502"

    wait_until(dave_gets_it, timeout=5)
    bad = run(server, env, "next", "--as", "x", "--lease", "soon")
    assert bad.returncode == 2 and "--lease soon: 'soon' is not a duration" in bad.stderr


@pytest.mark.process
def test_five_takers_at_once_get_five_different_conversations(make_server, tmp_path) -> None:
    server = make_server("--reply", "on it")
    post_chats(server, 5, 600, 850)
    env = stand_in(tmp_path)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ai_agent_proxy",
                "next",
                "--json",
                "--as",
                f"taker-{i}",
                "--db",
                str(server.db),
                "--inbox",
                str(server.inbox),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(5)
    ]
    got = [json.loads(p.communicate(timeout=60)[0])["context_id"] for p in procs]
    assert sorted(got) == [f"telegram:{600 + i}" for i in range(5)]
    held = server.rows("SELECT conversation, taker FROM conversation_leases")
    assert len({h["taker"] for h in held}) == 5 and len(held) == 5


def test_reply_as_a_taker_renews_its_hold(chats) -> None:
    server, _log, env = chats
    a, _b, _c, _ = ids(server)
    next_json(server, env, "--as", "alice", "--lease", "5s")
    assert run(server, env, "done", a, "--only", "--as", "alice").returncode == 0
    (lease,) = server.rows("SELECT taker, until_ms - taken_ms AS held FROM conversation_leases")
    assert lease["taker"] == "alice" and lease["held"] > 60_000  # renewed for LEASE_S
    ran: Ran = run(server, env, "next", "--json", "--as", "bob")
    assert json.loads(ran.stdout)["context_id"] == "telegram:42"


def test_a_hold_is_renewed_by_its_taker_only_and_given_back_one_or_all(chats) -> None:
    from ai_agent_proxy.agent import conversations as cv
    from ai_agent_proxy.agent.replies import connect

    server, _log, _env = chats
    conn = connect(server.db)
    try:
        assert cv.renew(conn, "telegram:123456789", "alice", 60)  # nobody held it: taken
        assert cv.renew(conn, "telegram:42", "alice", 60)
        assert not cv.renew(conn, "telegram:42", "bob", 60)  # alice holds it
        assert cv.holder(conn, "telegram:42", cv.now_ms())[0] == "alice"
        assert cv.release(conn, "alice", "telegram:42") == 1  # that one only
        assert cv.holder(conn, "telegram:42", cv.now_ms()) == (None, None)
        assert cv.holder(conn, "telegram:123456789", cv.now_ms())[0] == "alice"
        assert cv.renew(conn, "telegram:42", "bob", 60)
        assert cv.release(conn, "alice") == 1 and cv.release(conn, "bob") == 1  # all of each
        assert server.rows("SELECT * FROM conversation_leases") == []
        assert cv.seq_of(conn, "0" * 32) is None
    finally:
        conn.close()
