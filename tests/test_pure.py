"""Pure helpers on the hot path: body segments and the pre-rendered local answers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_agent_proxy import wire
from ai_agent_proxy.bodies import BodyParser, loads, split_body

from .conftest import FIXTURES

BODIES = [p.read_bytes() for p in sorted(FIXTURES.glob("*.json"))]


@given(
    st.binary(max_size=3000),
    st.lists(st.binary(max_size=300), max_size=3),
    st.lists(st.binary(max_size=300), max_size=3),
    st.booleans(),
)
def test_segments_join_back_to_the_body(
    raw: bytes, heads: list[bytes], tails: list[bytes], pieces_of_raw: bool
) -> None:
    if pieces_of_raw:
        heads.append(raw[: len(raw) // 2])
        tails.append(raw[len(raw) // 3 :])
    parts = split_body(raw, heads, tails)
    assert b"".join(parts) == raw
    assert all(parts[1:])  # no empty segment after the first


def test_a_known_head_gives_the_same_segments_as_a_full_scan() -> None:
    for body in BODIES:
        parts = split_body(body)
        assert len(parts[0]) > 40_000  # the system prompt
        # another request of the same agent: same system prompt, different turn
        # the last string a message's text starts in (content, or a part's text)
        keys = (b'"content": "', b'"text": "', b'"content":"', b'"text":"')  # indented or not
        key = max(keys, key=body.rfind)
        at = body.rindex(key) + len(key)
        other = body[:at] + b"x" + body[at:]
        assert split_body(other, [parts[0]]) == split_body(other)
        assert split_body(other, [parts[0]])[0] is parts[0]
        assert split_body(other, [parts[0]], [parts[-1]]) == split_body(other)
        assert split_body(other, [], [parts[-1]])[-1] is parts[-1]


def _normalized(answer: bytes) -> bytes:
    answer = re.sub(rb'"id":"chatcmpl-[0-9a-f]{24}"', b'"id":"X"', answer)
    return re.sub(rb'"created":\d+,', b'"created":0,', answer)


MODELS = ["local-agent", 'quote " and "id":"chatcmpl-template"', '"created":0,', "ü" * 20]


def test_pre_rendered_answers_equal_fresh_ones() -> None:
    for model in MODELS:
        for reply in ["", "working on it", '"created":0, "id":"chatcmpl-template"']:
            fresh = wire._render_chat_completion(model, reply, "chatcmpl-" + "0" * 24, 1)
            answer = wire.chat_completion(model, reply)
            assert _normalized(answer) == _normalized(fresh)
            parsed = orjson.loads(answer)
            assert (parsed["model"], parsed["choices"][0]["message"]["content"]) == (model, reply)
            assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", parsed["id"])
            assert abs(parsed["created"] - json.loads(fresh)["created"]) > 1_000_000  # now
            for usage in (True, False):
                fresh = wire._render_stream(model, reply, usage, "chatcmpl-" + "0" * 24, 1)
                stream = wire.chat_completion_stream(model, reply, usage)
                assert _normalized(stream) == _normalized(fresh)
    # two answers never share an id
    assert wire.chat_completion("m", "r") != wire.chat_completion("m", "r")


def _turn(body: bytes, text: str) -> bytes:
    """Another request of the same agent: same system prompt and tools, another last turn."""
    doc = orjson.loads(body)
    doc["messages"][-1]["content"] = text
    return json.dumps(doc, ensure_ascii=False).encode()


def test_a_body_with_known_pieces_parses_the_same_and_reuses_their_values() -> None:
    for body in BODIES:
        parts = BodyParser()
        first = _turn(body, "first")
        assert parts.parse(first) == loads(first)
        parts.remember(split_body(first))
        texts = [f'turn {n} \\" ü' for n in range(3)]
        parsed = [parts.parse(_turn(body, text)) for text in texts]
        for text, doc in zip(texts, parsed, strict=True):
            assert doc == loads(_turn(body, text))
        # the system prompt and the tools came from an earlier body, not from this one
        assert parsed[1]["messages"][0]["content"] is parsed[2]["messages"][0]["content"]
        assert len(parsed[2]["messages"][0]["content"]) > 40_000
        assert parsed[1]["tools"] is parsed[2]["tools"]
        assert len(parsed[2]["tools"]) > 5


def _outcome(parse: Callable[[bytes], object], raw: bytes) -> object:
    try:
        return parse(raw)
    except ValueError as exc:
        return str(exc)  # the error's position is in the real body either way


def test_known_pieces_in_a_bad_or_odd_body_give_what_a_full_parse_gives() -> None:
    body = _turn(BODIES[0], "x")
    parts = BodyParser()
    parts.remember(split_body(body))
    parts.parse(_turn(BODIES[0], "y"))
    pieces = split_body(body)
    head, tail = pieces[0], pieces[-1]
    assert tail.startswith(b'"tools"')
    middle = body[len(head) : -len(tail)]
    odd = [
        body[:-1],  # truncated
        head + b"}",
        head + middle + b'"tools": [], ' + tail,  # the tail's tools win
        head + middle + tail[:-1] + b', "tools": 1}',  # a later key wins
        body[:-1] + b', "messages": []}',
        body[:-1] + b', "messages": [{"content": "x"}]}',
        body[:-1] + b', "x": "aiap-piece-0"}',
        body + b" ",
        head + b'"a": "' + tail,  # the tail starts inside a string
        head + b'"a": {' + tail + b"}",  # or inside another object
        b'{"a": [' + tail,
        b"{" + tail,
        head + tail,
    ]
    for raw in odd:
        assert _outcome(parts.parse, raw) == _outcome(loads, raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.text(min_size=1100, max_size=1400),
    st.lists(st.tuples(st.sampled_from(["user", "assistant"]), _json), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=5), _json, max_size=3),
    st.lists(_json, min_size=1, max_size=4),
    st.integers(min_value=-40, max_value=40),
)
def test_parsing_past_known_pieces_equals_a_full_parse(
    prompt: str,
    turns: list[tuple[str, object]],
    extra: dict[str, object],
    tools: list[object],
    damage: int,
) -> None:
    prompt = prompt * 4  # past the size from which a piece is kept
    tools.append(prompt)

    def body(turns: list[tuple[str, object]]) -> bytes:
        messages = [{"role": "system", "content": prompt}]
        messages += [{"role": role, "content": content} for role, content in turns]
        return json.dumps({"model": "m", "messages": messages, **extra, "tools": tools}).encode()

    parts = BodyParser()
    parts.remember(split_body(body(turns[:1])))
    for n in range(len(turns)):
        raw = body(turns[: n + 1])
        if damage and n == len(turns) - 1:  # and an invalid one: cut at the end or start
            raw = raw[:damage] if damage < 0 else raw[damage:]
        assert _outcome(parts.parse, raw) == _outcome(loads, raw)


def test_parsing_with_learn_remembers_the_pieces_of_valid_bodies_only() -> None:
    parts = BodyParser()
    bad = _turn(BODIES[1], "bad")[:-1]
    with pytest.raises(ValueError):
        parts.parse(bad, learn=True)
    assert list(parts.heads) == []
    bodies = [_turn(BODIES[1], f"turn {n}") for n in range(3)]
    parsed = [parts.parse(body, learn=True) for body in bodies]
    assert parsed == [loads(body) for body in bodies]
    assert parsed[1]["tools"] is parsed[2]["tools"]
    assert list(parts.heads) == [split_body(bodies[0])[0]]


def test_a_tail_that_is_not_a_key_and_value_is_parsed_in_full() -> None:
    """`"tools"` can also be a string in a list; a tail starting there has no value to
    share, and bodies ending with it still parse exactly."""

    def body(n: int) -> bytes:
        doc = {
            "messages": [{"role": "system", "content": "p" * 5000}, {"role": "user", "content": n}],
            "list": ["tools", "y" * 5000],
        }
        return json.dumps(doc).encode()

    parts = BodyParser()
    pieces = split_body(body(0))
    assert pieces[-1].startswith(b'"tools", ')
    parts.remember(pieces)
    for n in range(1, 4):
        assert parts.parse(body(n)) == loads(body(n))
    parsed = [parts.parse(body(n)) for n in (4, 5)]
    assert parsed[0]["messages"][0]["content"] is parsed[1]["messages"][0]["content"]  # head
    assert parsed[0]["list"][1] is not parsed[1]["list"][1]  # nothing shared from the tail


def test_read_refuses_a_deep_body_whatever_pieces_it_shares() -> None:
    """The cheap depth bound (fresh bytes plus the shared pieces) and the exact test agree
    at the door: a body of a known agent nested past the limit is refused, and one just
    under it is read; with sharing off, the same answers."""
    from ai_agent_proxy.bodies import MAX_DEPTH

    for enabled in (True, False):
        parser = BodyParser(enabled=enabled)
        for n in range(3):  # learn and prepare the agent's pieces
            parser.read(_turn(BODIES[1], f"turn {n}"))
        body = _turn(BODIES[1], "x")
        at = body.rindex(b'"role": "user"')  # in the fresh middle, past the shared head
        ok = body[:at] + b'"deep": ' + b"[" * 200 + b"]" * 200 + b", " + body[at:]
        assert parser.read(ok).value == loads(ok)
        deep = ok.replace(b"[" * 200, b"[" * MAX_DEPTH).replace(b"]" * 200, b"]" * MAX_DEPTH)
        with pytest.raises(ValueError, match="nested deeper"):
            parser.read(deep)
        parsed = parser.read(_turn(BODIES[1], "y"))
        assert parsed.value == loads(_turn(BODIES[1], "y"))
        assert b"".join(parsed.segments) == _turn(BODIES[1], "y")
        assert (len(parser.heads) == 1) is enabled


def test_one_list_of_message_fields(tmp_path) -> None:
    """rows.Message is the list: what context.py stores, the DB's columns after every
    migration, the inbox file's keys and history's records all follow it."""
    from ai_agent_proxy.context import RequestContext
    from ai_agent_proxy.db import connect
    from ai_agent_proxy.history_render import CSV_COLUMNS
    from ai_agent_proxy.inbox import PAYLOAD_KEY, PROXY_KEYS
    from ai_agent_proxy.migrations import migrate
    from ai_agent_proxy.rows import MESSAGE_FIELDS

    assert list(RequestContext().stored()) == list(MESSAGE_FIELDS)
    migrate(tmp_path / "outbox.db")
    conn = connect(tmp_path / "outbox.db")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    conn.close()
    assert set(MESSAGE_FIELDS) <= columns
    assert {PAYLOAD_KEY.get(f, f) for f in MESSAGE_FIELDS} <= set(PROXY_KEYS)
    assert set(MESSAGE_FIELDS) <= set(CSV_COLUMNS)


def test_backend_keys_come_with_the_instruction_they_answered() -> None:
    """A row with only a backend error (or only a reply) still names the instruction."""
    from ai_agent_proxy.inbox import build_payload
    from ai_agent_proxy.rows import PendingRow

    class Options:
        instruction = "use the skill"
        openclaw_message_cli_skill_path = "/skill.md"

    base = {"seq": 1, "id": "a" * 32, "received_ms": 0, "body": b"", "payload_kind": "compact"}
    for extra in ({"backend_error": "timed out"}, {"backend_reply": "hi"}):
        row = PendingRow(**base, backend_instruction="be brief", **extra)  # type: ignore[arg-type]
        assert build_payload(row, Options())["backend-llm-instruction"] == "be brief"
    plain = build_payload(PendingRow(**base, backend_instruction="be brief"), Options())  # type: ignore[arg-type]
    assert "backend-llm-instruction" not in plain


def test_files_are_flushed_before_they_are_named(tmp_path, monkeypatch) -> None:
    """Each file's data is on disk before its rename makes it visible, and the renames
    are flushed: on Linux one syncfs for the batch, elsewhere one fsync per file; the
    directory fsync'd once after the renames."""
    import os
    import sys

    from ai_agent_proxy import inbox

    assert (inbox._syncfs is not None) == sys.platform.startswith("linux")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("dir fsync" if os.path.isdir(f"/proc/self/fd/{fd}") else "file fsync")
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        events.append("syncfs")
        return 0

    def replace(a, b) -> None:
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files = [("a.json", b"1"), ("b.json", b"2")]
    monkeypatch.setattr(inbox, "_syncfs", syncfs)
    assert inbox.write_files(tmp_path, files) == (2, None)
    assert events == ["syncfs", "rename", "rename", "dir fsync"]
    events.clear()
    monkeypatch.setattr(inbox, "_syncfs", None)  # no syncfs(2): each file fsync'd
    assert inbox.write_files(tmp_path, files) == (2, None)
    assert events == ["file fsync", "file fsync", "rename", "rename", "dir fsync"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_write_files_counts_the_files_renamed_before_a_rename_fails(tmp_path) -> None:
    """A directory in the way of the third name: the two files before it are in place and
    counted (so they are not written, and delivered, again); no temp file is left."""
    from ai_agent_proxy import inbox

    (tmp_path / "c.json").mkdir()
    files = [("a.json", b"1"), ("b.json", b"2"), ("c.json", b"3"), ("d.json", b"4")]
    done, error = inbox.write_files(tmp_path, files)
    assert done == 2 and isinstance(error, IsADirectoryError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]
    assert (tmp_path / "b.json").read_bytes() == b"2"


def test_only_stale_temps_are_removed_at_start(tmp_path) -> None:
    from ai_agent_proxy.inbox import remove_stale_temps

    name = "20261202101010-" + "ab" * 16 + ".json"
    (tmp_path / name).write_text("{}")  # a file the agent has not read yet
    (tmp_path / f".{name}.4242.tmp").write_text("{")  # a crash mid-write
    (tmp_path / ".notes.tmp").write_text("the agent's own")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", name]


def test_a_writer_waits_for_another_process_lock_then_gives_up(tmp_path, monkeypatch) -> None:
    """db.begin takes the write lock as soon as another connection lets it go, gives up
    with "database is locked" after BUSY_TIMEOUT_MS, and leaves the connection's own busy
    timeout as it was."""
    import sqlite3
    import threading
    import time

    from ai_agent_proxy import db

    path = tmp_path / "outbox.db"
    writer = db.connect(path)

    def hold(seconds: float, locked: threading.Event) -> None:
        """Another writer (as another process would): the lock for `seconds`."""
        holder = db.connect(path)
        holder.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(seconds)
        holder.execute("ROLLBACK")
        holder.close()

    locked = threading.Event()
    threading.Thread(target=hold, args=(0.2, locked)).start()
    locked.wait(5)
    started = time.monotonic()
    db.begin(writer)  # waits for the other's ROLLBACK
    assert 0.15 < time.monotonic() - started < 2
    assert db.scalar(writer, "PRAGMA busy_timeout") == db.BUSY_TIMEOUT_MS
    writer.execute("COMMIT")

    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 300)
    locked.clear()
    other = threading.Thread(target=hold, args=(1.0, locked))
    other.start()
    locked.wait(5)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.begin(writer)
    assert 0.25 < time.monotonic() - started < 1
    assert not writer.in_transaction
    other.join()
    writer.close()


def turn2_variants(n: int) -> list[bytes]:
    """The captured turn-2 body, made distinct n times (as the bench makes it)."""
    raw = (FIXTURES / "openclaw-2026.9-telegram-dm-turn2.json").read_text("utf-8")
    body = json.loads(raw)
    (part,) = [p for p in body["messages"][-1]["content"] if p.get("type") == "text"][-1:]
    text, variants = part["text"], []
    for i in range(n):
        part["text"] = f"{text} #{i}"  # the person's words: the middle of the body
        variants.append(json.dumps(body, ensure_ascii=False).encode())
    return variants


def test_repeated_pieces_are_parsed_once_and_shared() -> None:
    """An agent's system prompt and tool list, the same in every body, are parsed from the
    second body on by swapping in the values parsed before: the same objects, each piece
    known once, and every result equal to a full parse."""
    first, second, third = turn2_variants(3)
    parser = BodyParser()
    values = [parser.read(raw).value for raw in (first, second, third)]
    assert values == [json.loads(raw) for raw in (first, second, third)]
    assert len(parser.heads) == 1 and parser.heads[0] == split_body(first)[0]
    prompt = max((m["content"] for m in values[2]["messages"] if m["role"] == "system"), key=len)
    assert prompt is max(
        (m["content"] for m in values[1]["messages"] if m["role"] == "system"), key=len
    )
    assert values[2]["tools"] is values[1]["tools"]
    assert values[1]["tools"] is not values[0]["tools"]  # the first two are parsed in full
    plain = BodyParser(enabled=False)
    unshared = [plain.read(raw).value for raw in (first, second, third)]
    assert unshared == values and unshared[2]["tools"] is not unshared[1]["tools"]
    assert plain.heads == []


def test_segment_ids_are_stored_little_endian() -> None:
    from ai_agent_proxy.bodies import pack_ids, unpack_ids

    assert pack_ids([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00"  # the DB's format
    assert unpack_ids(b"\x01\x00\x00\x00\x02\x01\x00\x00") == [1, 258]


def test_depth_and_range_checks() -> None:
    from ai_agent_proxy.bodies import TooDeep, check_depth

    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(TooDeep):
        check_depth(deep)
    check_depth(["\ud800", [[["shallow"]]]])  # orjson refuses the surrogate: measured
    with pytest.raises(TooDeep):
        check_depth(["\ud800", deep])
    with pytest.raises(ValueError, match="beyond the range of a double"):
        loads(b"[1e999]")
    assert loads(b"[1.5, -2e300]") == [1.5, -2e300]


def test_pieces_of_two_agents_are_kept_newest_first() -> None:
    """Two agents' heads are both known, the one seen last first; a body with an unknown
    head still gets the known tool list swapped in; a small body teaches nothing."""
    a1, a2, a3, a4 = turn2_variants(4)
    other = json.loads(a1)
    other["messages"][0]["content"] = "Another agent. " + other["messages"][0]["content"]
    b1 = json.dumps(other, ensure_ascii=False).encode()
    parser = BodyParser()
    for raw in (a1, a2, a3):
        last_a = parser.read(raw).value
    head_a = parser.heads[0]
    got_b = parser.read(b1).value
    assert got_b == json.loads(b1)
    assert got_b["tools"] is last_a["tools"]  # B's head unknown yet, its tail known
    assert len(parser.heads) == 2 and parser.heads[0] == split_body(b1)[0]
    parser.read(a4)
    assert parser.heads == [head_a, split_body(b1)[0]]  # A seen again: first again
    parser.read(b'{"messages": [{"role": "user", "content": "short"}]}')
    assert parser.heads == [head_a, split_body(b1)[0]]


def test_the_bench_knows_the_writer_threads_name() -> None:
    """tools/bench.py tells the SQLite writer thread's CPU apart by the name it gives itself."""
    import sys

    from ai_agent_proxy.outbox.engine import THREAD_NAME

    sys.path.insert(0, str(FIXTURES.parents[1] / "tools"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    assert bench.WRITER_THREAD == THREAD_NAME and len(THREAD_NAME) <= 15  # (the OS's limit)
