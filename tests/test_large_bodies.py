"""Large bodies: admitted against BODY_MEMORY before they are read (503 with Retry-After
past it, small ones never held back), read off the event loop, their long words stored
out of the row yet whole wherever they are shown; the outbox's bulk work and byte-bounded
claims. (The load itself, 80 and 200 bodies of 15 MiB: tools/big_bodies.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ai_agent_proxy import admission
from ai_agent_proxy.admission import EXPANSION, LARGE_BODY, BodyBudget, NoRoom
from ai_agent_proxy.cli import cli
from ai_agent_proxy.migrations import migrate
from ai_agent_proxy.outbox.queries import PROMPT_PREFIX
from ai_agent_proxy.outbox.store import Outbox
from ai_agent_proxy.rows import NewRequest

from . import openclaw as oc
from .conftest import HTTP, Server, wait_until

MIB = 1 << 20


def test_the_budget_holds_large_bodies_back_and_never_small_ones() -> None:
    async def scenario() -> None:
        budget = BodyBudget(limit=10 * MIB * EXPANSION)  # room for 10 MiB of bodies
        assert await budget.reserve(LARGE_BODY - 1, wait_s=0) == 0  # small: nothing
        a = await budget.reserve(6 * MIB)
        assert a == 6 * MIB * EXPANSION == budget.used
        waiting = asyncio.create_task(budget.reserve(5 * MIB, wait_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # no room for 5 more MiB: it waits ...
        budget.release(a)
        b = await waiting  # ... and goes once there is
        assert budget.used == b == 5 * MIB * EXPANSION
        with pytest.raises(NoRoom, match=r"BODY_MEMORY's 40 MiB.*retry in 2 s"):
            await budget.reserve(6 * MIB, wait_s=0.05)
        assert budget.refused == 1
        assert await budget.reserve(MIB - 1, wait_s=0) == 0  # small ones pass meanwhile
        budget.release(b)
        budget.release(0)
        c = await budget.reserve(20 * MIB, wait_s=0)  # alone, one goes past the limit
        assert budget.used == c
        with pytest.raises(NoRoom):
            await budget.reserve(MIB, wait_s=0)
        budget.release(c)
        assert budget.used == 0

    asyncio.run(scenario())


def big_turn(words: str, message_id: str = "77") -> dict:
    """A captured OpenClaw turn with `words` as the person's."""
    return oc.with_info(oc.typed(oc.load(oc.TURN2), words), message_id=message_id)


def cli_json(server: Server, *args: str) -> object:
    r = CliRunner().invoke(cli, [*args, "--db", str(server.db), "--inbox", str(server.inbox)])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_long_words_live_out_of_the_row_yet_are_whole_wherever_shown(make_server) -> None:
    server = make_server("--reply", "on it")
    words = "first needle " + "a" * (2 * MIB) + " tail"
    assert server.post_chat(big_turn(words)).status_code == 200
    other = "second " + "b" * (MIB + 5)
    assert server.post_chat(big_turn(other, "78")).status_code == 200
    # the same words under the same message: OpenClaw's retry (with its notice, or the
    # same body again); the same start with other words after it: a new message
    assert server.post_chat(oc.retry_of(big_turn(words))).status_code == 200
    assert server.post_chat(big_turn(other, "78")).status_code == 200
    steer = words[:-5] + " CHANGED"
    assert server.post_chat(big_turn(steer)).status_code == 200
    names = server.wait_files(3)
    rows = server.rows("SELECT id, latest_user_prompt, prompt_segment, state, repeat_reason"
                       " FROM requests ORDER BY seq")  # fmt: skip
    assert [(r["state"], r["repeat_reason"]) for r in rows] == [
        ("written", None), ("written", None), ("duplicate", "retry"),
        ("duplicate", "retry"), ("written", None),
    ]  # fmt: skip
    assert rows[0]["latest_user_prompt"] == words[:PROMPT_PREFIX]
    assert rows[0]["prompt_segment"] is not None
    assert rows[0]["prompt_segment"] != rows[4]["prompt_segment"]
    sizes = server.rows("SELECT seq, bytes FROM large_rows ORDER BY seq")
    assert len(sizes) == 5 and all(s["bytes"] > 2 * MIB for s in sizes)
    payloads = [json.loads((server.inbox / n).read_text()) for n in names]
    assert [p["latest-user-prompt"] for p in payloads] == [words, other, steer]
    assert "messages" in payloads[0] and "messages" not in payloads[1]  # full, then compact
    first = rows[0]["id"]
    shown = cli_json(server, "history", "show", first, "--format", "json")
    assert shown["latest_user_prompt"] == words and "prompt_segment" not in shown  # type: ignore[index]
    listed = cli_json(server, "history", "--search", "first needle", "--format", "json")
    # (the retry is a row too: stored, no file)
    assert [r["id"] for r in listed] == [rows[4]["id"], rows[2]["id"], first]  # type: ignore[index]
    assert listed[2]["latest_user_prompt"] == words  # type: ignore[index]
    view = cli_json(server, "next", "--json")["messages"][0]  # type: ignore[index]
    assert view["words"] == words[:2000] and view["words_left_out"] == len(words) - 2000


def raw_post(port: int, body: bytes, *, send: int | None = None) -> socket.socket:
    """A POST whose first `send` bytes of body are sent (all when None)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) if send is None else send])
    return sock


def answer(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_a_large_body_past_the_budget_gets_503_with_retry_after_while_small_ones_pass(
    make_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "ADMIT_WAIT_S", 0.5)
    server = make_server("--body-memory", "4MiB")  # one 1.2 MiB body fills it (x4)
    big = [json.dumps(big_turn(f"big {i} " + "x" * int(1.2 * MIB), str(90 + i))).encode()
           for i in range(2)]  # fmt: skip
    first = raw_post(server.port, big[0], send=MIB)  # admitted; its upload stalls
    try:
        wait_until(lambda: server.get("/readyz").status_code == 200)  # (it is served)
        second = raw_post(server.port, big[1], send=0)
        started = time.monotonic()
        small = server.post_chat(oc.load(oc.TURN1))  # meanwhile, a small one
        assert small.status_code == 200 and time.monotonic() - started < 0.4
        status, head = answer(second)
        assert status == 503 and b"retry-after: 2" in head.lower()
        assert b"BODY_MEMORY" in head + second.recv(4096)
        second.close()
        first.sendall(big[0][MIB:])  # the first one's upload goes on: it is taken
        assert answer(first)[0] == 200
    finally:
        first.close()
    again = raw_post(server.port, big[1])  # the refused one, retried: room now
    assert answer(again)[0] == 200
    again.close()
    server.wait_files(3)


def test_a_body_over_max_body_is_refused_also_when_chunked(make_server) -> None:
    server = make_server("--max-body", "2048")
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        chunk = b"x" * 1500
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
            b"\r\n" + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n"
        )
        assert answer(sock)[0] == 413
    finally:
        sock.close()
    big = HTTP.post(server.base_url + "/v1/chat/completions", content=b"{" + b" " * 4096 + b"}")
    assert big.status_code == 413
    assert server.rows() == []


def test_claims_stop_at_a_number_of_bytes(tmp_path: Path) -> None:
    """A flusher's claim takes the first row whatever its size, then rows while they fit,
    and says whether more were pending."""
    db = tmp_path / "o.db"
    migrate(db)

    async def scenario() -> None:
        outbox = Outbox(db, 60)
        await outbox.open()
        try:
            for i, size in enumerate((3 * MIB, 10, 2 * MIB, 10, 10)):
                words = f"w{i} " + "z" * size
                await outbox.record(NewRequest(
                    id=f"{i:032x}", received_ms=1000 + i, body=b"{}", segments=[b"{}"],
                    latest_user_prompt=words, awaiting_backend=True,
                ))  # fmt: skip
            with sqlite3.connect(db) as conn:  # (pending, leased to nobody)
                conn.execute("UPDATE requests SET state = 'pending'")
            rows, more = await outbox.claim_pending(128, 2 * MIB)
            assert [r.latest_user_prompt[:2] for r in rows] == ["w0"] and more
            assert len(rows[0].latest_user_prompt) == 3 * MIB + 3  # whole, from its segment
            await outbox.mark_written([rows[0].seq], bulk=True)
            rows, more = await outbox.claim_pending(128, 3 * MIB)
            assert [r.latest_user_prompt[:2] for r in rows] == ["w1", "w2", "w3", "w4"]
            assert not more
            rows, more = await outbox.claim_pending(2, 100 * MIB)  # the count bounds too
            assert len(rows) == 2 and more
        finally:
            await outbox.close()

    asyncio.run(scenario())


def test_the_write_engine_commits_ordinary_work_before_bulk_work(tmp_path: Path) -> None:
    from ai_agent_proxy.outbox.engine import WriteEngine

    db = tmp_path / "e.db"
    sqlite3.connect(db).close()
    done: list[int] = []

    def job(n: int, sleep: float = 0.0):
        def work(conn: sqlite3.Connection) -> int:
            time.sleep(sleep)  # (the first holds the thread while the rest are queued)
            done.append(n)
            return n

        return work

    async def scenario() -> None:
        engine = WriteEngine(db)
        await engine.open()
        try:
            first = asyncio.ensure_future(engine.run(job(0, sleep=0.3)))
            await asyncio.sleep(0.1)
            rest = [engine.run(job(n), bulk=n in (1, 4)) for n in (1, 2, 3, 4, 5)]
            assert await asyncio.gather(first, *rest) == [0, 1, 2, 3, 4, 5]
        finally:
            await engine.close()

    asyncio.run(scenario())
    assert done == [0, 2, 3, 5, 1, 4]
