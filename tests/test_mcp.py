"""`ai-agent-proxy mcp` as an agent uses it, driven with the official SDK's client, over the
DB of a real server that took captured OpenClaw bodies; `openclaw` is a stand-in on PATH.
The agent's whole loop runs against the command as a subprocess over stdio (the process
and its protocol are the point); the other tests connect the SDK's client to the same
server in-process."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ai_agent_proxy.config import load_settings

from . import openclaw as oc
from .conftest import Server

if TYPE_CHECKING:
    from mcp import ClientSession

# The MCP SDK takes a second of CPU to import: imported by the tests that use it, all on
# one worker (pyproject's --dist loadgroup), not by every worker as it collects.
pytestmark = pytest.mark.xdist_group("mcp")

TOOLS = {
    "next_message", "new_messages", "reply", "mark_done", "show_request", "search_history",
}  # fmt: skip


@pytest.fixture
def world(
    make_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Server, Path, dict[str, str]]:
    """A server holding dm-turn2's conversation (turn 1, turn 2) and a group turn; an
    openclaw stand-in on PATH; the environment to run `ai-agent-proxy mcp` in."""
    server = make_server("--reply", "on it")
    for name in (oc.TURN1, oc.TURN2, oc.GROUP):
        assert server.post_chat(oc.load(name)).status_code == 200
    server.wait_files(3)
    log, env = oc.stand_in_openclaw(tmp_path)
    for name in ("PATH", "FAKE_OPENCLAW_LOG"):  # (for the in-process server's `openclaw`)
        monkeypatch.setenv(name, env[name])
    return server, log, env


@asynccontextmanager
async def mcp_session(server: Server, env: dict[str, str]) -> AsyncIterator[Any]:
    """The SDK's client on the MCP server built in this process, as the command builds it."""
    from mcp import Client

    from ai_agent_proxy.agent.mcp_server import build

    flags = {"db": server.db, "inbox": server.inbox}
    async with Client(build(load_settings(None, flags, environ={})), read_timeout_seconds=30) as c:
        yield c


@asynccontextmanager
async def mcp_process(server: Server, env: dict[str, str]) -> AsyncIterator[ClientSession]:
    """`ai-agent-proxy mcp` as a subprocess, over stdio."""
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "ai_agent_proxy", "mcp", "--db", str(server.db), "--inbox", str(server.inbox)],
        env=env, cwd=server.workdir,
    )  # fmt: skip
    with open(server.workdir / "mcp-stderr.log", "w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write, read_timeout_seconds=30) as session,
        ):
            await session.initialize()
            yield session


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.process
def test_the_agent_loop_through_mcp(world) -> None:
    """As an agent runs it, over stdio: next_message gives the conversation (both DM
    messages); a message posted mid-session is seen by new_messages; a reply to an older
    message is refused naming the newer one; the reply to the newest covers them all."""
    server, log, env = world
    first, second, third = (r["id"] for r in server.rows())

    async def scenario() -> None:
        async with mcp_process(server, env) as s:
            listed = {t.name: t for t in (await s.list_tools()).tools}
            assert set(listed) == TOOLS
            assert listed["next_message"].input_schema["properties"]["wait_seconds"]
            assert set(listed["reply"].input_schema["required"]) == {"request_id", "text"}
            assert "anyway" in listed["reply"].input_schema["properties"]
            assert listed["new_messages"].annotations.read_only_hint is True
            assert listed["reply"].annotations.read_only_hint is not True

            shown = await s.call_tool("next_message", {})
            assert not shown.is_error and len(text(shown)) < 4000
            chat = shown.structured_content
            assert chat["context_id"] == "telegram:123456789" and chat["taken_by"]
            assert [m["request_id"] for m in chat["messages"]] == [first, second]
            assert chat["messages"][0]["inbox_file"] == str(server.inbox / server.inbox_names()[0])
            assert "hello from telegram DM" in text(shown) and "second message" in text(shown)
            # taken: another session's next_message gets the group, not this chat
            async with mcp_session(server, env) as other:
                theirs = (await other.call_tool("next_message", {})).structured_content
                assert [m["request_id"] for m in theirs["messages"]] == [third]

            nothing = await s.call_tool("new_messages", {"context_id": "telegram:123456789",
                                                         "after_request_id": second})  # fmt: skip
            assert not nothing.is_error and nothing.structured_content["messages"] == []
            late = oc.with_info(oc.typed(oc.load(oc.TURN2), "actually, cancel it"), message_id="13")
            await asyncio.to_thread(server.post_chat, late)
            news = await s.call_tool("new_messages", {"context_id": "telegram:123456789",
                                                      "after_request_id": second})  # fmt: skip
            (fresh,) = news.structured_content["messages"]
            assert fresh["words"] == "actually, cancel it"
            stale = await s.call_tool("reply", {"request_id": second, "text": "Done!"})
            assert stale.is_error and fresh["request_id"] in text(stale)
            assert "actually, cancel it" in text(stale)
            await asyncio.to_thread(server.wait_files, 4)
            sent = await s.call_tool("reply", {"request_id": fresh["request_id"],
                                               "text": "Cancelled."})  # fmt: skip
            assert not sent.is_error, text(sent)
            assert sent.structured_content["covered"] == [first, second]
            assert sent.structured_content["sent_to"] == "telegram:123456789"
            again = await s.call_tool("reply", {"request_id": first, "text": "twice?"})
            assert again.is_error and "answered already" in text(again)
            unknown = await s.call_tool("reply", {"request_id": "ffffffffffff", "text": "x"})
            assert unknown.is_error and "no request with id" in text(unknown)

            # nothing waits here any more, and the group is the other session's
            nxt = await s.call_tool("next_message", {})
            assert nxt.structured_content["waiting"] is False
            done = await s.call_tool("mark_done", {"request_id": third})
            assert not done.is_error
            assert (await s.call_tool("mark_done", {"request_id": third})).is_error
            full = await s.call_tool("show_request", {"request_id": third, "full": True})
            path = server.inbox / server.inbox_names()[2]
            assert text(full).encode() == path.read_bytes()  # the file, byte for byte
            found = await s.call_tool("search_history", {"query": "telegram DM"})
            assert [r["id"] for r in found.structured_content["requests"]] == [first]
            assert found.structured_content["requests"][0]["answered"] is True

    asyncio.run(scenario())
    assert calls(log) == [["message", "send", "--channel", "telegram", "--target", "123456789",
                           "--message", "Cancelled."]]  # fmt: skip


def test_next_message_waits_for_a_request_without_blocking_others(world) -> None:
    server, _log, env = world

    async def scenario() -> None:
        async with mcp_session(server, env) as s:
            for r in server.rows():
                assert not (await s.call_tool("mark_done", {"request_id": r["id"]})).is_error
            empty = await s.call_tool("next_message", {"wait_seconds": 0})
            assert not empty.is_error and empty.structured_content == {
                "waiting": False, "note": "no conversation is waiting for a reply",
            }  # fmt: skip
            started = time.monotonic()
            waiting = asyncio.create_task(s.call_tool("next_message", {"wait_seconds": 30}))
            # meanwhile, other calls are answered
            other = await s.call_tool("search_history", {"query": "hello"})
            assert not other.is_error and not waiting.done()
            body = oc.with_info(oc.typed(oc.load(oc.TURN2), "are you there?"), message_id="13")
            await asyncio.to_thread(server.post_chat, body)
            got = await asyncio.wait_for(waiting, 10)
            assert got.structured_content["messages"][0]["words"] == "are you there?"
            assert time.monotonic() - started < 5  # as soon as it came, not after 30 s

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("tool", "arguments", "needle"),
    [
        ("next_message", {"wait_seconds": -1}, "wait_seconds must be from 0 to 300"),
        ("next_message", {"wait_seconds": 1e9}, "wait_seconds must be from 0 to 300"),
        ("next_message", {"wait_seconds": "soon"}, "wait_seconds"),
        ("reply", {"request_id": 5, "text": "x"}, "request_id"),
        ("reply", {"request_id": "X", "text": "y" * 1_000_000}, "at most 32,768"),
        ("reply", {"request_id": "X", "text": "   "}, "the reply is empty"),
        ("search_history", {"query": "x", "limit": 0}, "limit must be from 1 to 200"),
        ("search_history", {"query": "x", "since": "yesterday"}, "cannot read time"),
        ("show_request", {"request_id": "00"}, "is not a request id"),
        ("show_request", {"request_id": "ffffffffffff"}, "no request with id"),
        ("search_history", {"query": "x" * 50_000}, "at most 1,000"),
    ],
)
def test_bad_input_is_a_tool_error_and_the_server_keeps_serving(
    world, tool: str, arguments: dict[str, Any], needle: str
) -> None:
    server, log, env = world
    first = server.rows()[0]["id"]
    arguments = {k: first if v == "X" else v for k, v in arguments.items()}

    async def scenario() -> None:
        async with mcp_session(server, env) as s:
            bad = await s.call_tool(tool, arguments)
            assert bad.is_error and needle in text(bad), text(bad)
            assert str(server.workdir) not in text(bad)  # no file of this machine named
            fine = await s.call_tool("next_message", {})
            assert not fine.is_error
            assert fine.structured_content["messages"][0]["request_id"] == first

    asyncio.run(scenario())
    assert calls(log) == []


@pytest.mark.process
def test_lines_that_are_no_message_are_answered_per_json_rpc(world) -> None:
    """The SDK dropped them without a word (the agent waited for ever): now -32700 for a
    line that is not JSON, -32600 for JSON that is not a message, and serving goes on."""
    import subprocess

    server, _log, env = world
    proc = subprocess.Popen(
        [sys.executable, "-m", "ai_agent_proxy", "mcp", "--db", str(server.db),
         "--inbox", str(server.inbox)],
        env=env, cwd=server.workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        answers = []
        for line in ("not json at all", '{"a": 1}', '{"jsonrpc": "2.0", "id": 7, "method": '):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            answers.append(json.loads(proc.stdout.readline()))
        assert [(a["id"], a["error"]["code"]) for a in answers] == [
            (None, -32700), (None, -32600), (None, -32700),
        ]  # fmt: skip
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
        proc.stdin.write(json.dumps(hello) + "\n")
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline())
        assert answer["id"] == 1 and answer["result"]["serverInfo"]["name"] == "ai-agent-proxy"
    finally:
        proc.stdin.close()
        proc.wait(10)
