"""Backend relay against a real (fake) backend LLM over HTTP."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import sqlite3
import statistics
import threading
import time
from array import array
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from .backend import REPLY_PARTS, SECRET_ECHO, FakeBackend
from .conftest import Server, fixture_body, free_port, wait_until

API_KEY = "sk-backend-secret-0123456789"
TURN1 = "openclaw-2026.9-telegram-dm-turn1.json"
FULL_REPLY = "".join(REPLY_PARTS)


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    b = FakeBackend(api_key=API_KEY)
    yield b
    b.close()


def relay_server(make_server, backend_url: str, *flags: str) -> Server:
    return make_server(
        "--url", backend_url, "--api-key", API_KEY, "--reply", "fallback text", *flags
    )  # fmt: skip


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def secret_nowhere(server: Server) -> None:
    assert API_KEY not in server.log()
    assert API_KEY.encode() not in server.db.read_bytes()
    for wal in server.db.parent.glob(server.db.name + "*"):
        assert API_KEY.encode() not in wal.read_bytes()
    for name in server.inbox_names():
        assert API_KEY not in (server.inbox / name).read_text()


def test_stream_passes_through_chunk_by_chunk(make_server, backend: FakeBackend) -> None:
    server = relay_server(make_server, backend.url, "--backend-model", "real-model")
    body = fixture_body(TURN1)
    backend.gate.clear()  # the backend pauses after its first content chunk
    stream = sdk(server).chat.completions.create(
        model=body["model"], messages=body["messages"], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts = []
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            if not texts:
                # The first words are here while the backend is still holding the rest.
                assert not backend.finished.is_set()
                backend.gate.set()
            texts.append(ch.choices[0].delta.content)
    assert "".join(texts) == FULL_REPLY
    assert backend.finished.wait(5)  # set just after its last write

    sent = backend.requests[0]
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert sent["body"]["model"] == "real-model"
    assert sent["body"]["messages"][0]["role"] == "system"
    assert "context_id: telegram:123456789" in sent["body"]["messages"][0]["content"]
    assert sent["body"]["messages"][1:] == body["messages"]

    (payload,) = [server.inbox_payloads()[0] for _ in server.wait_files(1)]
    assert payload["backend-llm-reply"] == FULL_REPLY
    assert "context_id: telegram:123456789" in payload["backend-llm-instruction"]
    assert payload["messages"] == body["messages"]  # the person's body, not the backend's
    (row,) = server.rows()
    assert (row["backend_status"], row["backend_error"]) == (200, None)
    assert json.loads(row["backend_usage"])["total_tokens"] == 10
    assert row["backend_latency_ms"] > 0
    secret_nowhere(server)


def test_non_stream_returns_backend_answer(make_server, backend: FakeBackend) -> None:
    server = relay_server(make_server, backend.url)
    answer = sdk(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == FULL_REPLY
    assert answer.usage and answer.usage.total_tokens == 10
    assert backend.requests[0]["body"]["model"] == "m"  # no BACKEND_MODEL: unchanged
    server.wait_files(1)
    assert server.inbox_payloads()[0]["backend-llm-reply"] == FULL_REPLY
    secret_nowhere(server)


def test_backend_ignoring_stream_flag_is_streamed_to_client(make_server, backend) -> None:
    backend.mode = "json-for-stream"
    server = relay_server(make_server, backend.url)
    chunks = list(
        sdk(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL_REPLY
    server.wait_files(1)
    assert server.inbox_payloads()[0]["backend-llm-reply"] == FULL_REPLY


FAILURES = {
    "down": "ConnectError",
    "hang": "ReadTimeout",
    "status500": "HTTP 500",
    "garbage": "unusable backend answer",
}


@pytest.mark.parametrize(
    ("mode", "stream"),
    [
        (mode, stream)
        for mode in FAILURES
        for stream in (False, True)
        if (mode, stream) != ("garbage", True)
    ],  # a garbage stream is the "cut" case below
)
def test_backend_failure_falls_back_and_still_delivers(
    make_server, backend: FakeBackend, mode: str, stream: bool
) -> None:
    url = backend.url
    if mode == "down":
        url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    backend.mode = mode
    server = relay_server(make_server, url, "--backend-timeout", "1")
    t0 = time.monotonic()
    r = server.post_chat({"stream": stream, "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 200
    assert time.monotonic() - t0 < 4
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")
        assert "fallback text" in r.text
    else:
        assert r.json()["choices"][0]["message"]["content"] == "fallback text"
    server.wait_files(1)
    (payload,) = server.inbox_payloads()
    assert "backend-llm-reply" not in payload  # the person got the local answer
    assert FAILURES[mode] in payload["backend-llm-error"]
    assert payload["latest-user-prompt"] == "q"
    (row,) = server.rows()
    assert FAILURES[mode] in row["backend_error"]
    assert row["backend_reply"] is None
    assert "backend_forward_failed" in server.log()
    if mode == "status500":
        assert f"{SECRET_ECHO}****" in row["backend_error"]  # the echoed key is redacted
    secret_nowhere(server)


def test_stream_cut_midway_says_so_and_records_what_the_person_saw(
    make_server, backend: FakeBackend
) -> None:
    backend.mode = "cut"
    server = relay_server(make_server, backend.url, "--cutoff-notice", "[cut off, sorry]")
    chunks = list(
        sdk(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "q"}], stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    received = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert received == REPLY_PARTS[0] + "\n\n[cut off, sorry]"
    server.wait_files(1)
    (row,) = server.rows()
    assert row["state"] == "written"
    assert row["backend_reply"] == received
    assert "RemoteProtocolError" in row["backend_error"]  # the backend hung up
    (payload,) = server.inbox_payloads()
    assert payload["backend-llm-reply"] == received
    assert payload["backend-llm-error"] == row["backend_error"]
    assert "context_id: none" in payload["backend-llm-instruction"]


def test_models_from_backend_with_local_fallback(make_server, backend: FakeBackend) -> None:
    server = relay_server(make_server, backend.url)
    assert [m.id for m in sdk(server).models.list().data] == ["backend-a", "backend-b"]
    assert sdk(server).models.retrieve("backend-b").id == "backend-b"
    with pytest.raises(openai.NotFoundError):
        sdk(server).models.retrieve("nope")
    down = relay_server(make_server, f"http://127.0.0.1:{free_port()}/v1")
    assert [m.id for m in sdk(down).models.list().data] == ["local-agent"]


def test_client_disconnect_cancels_backend_and_delivers(make_server, backend) -> None:
    server = relay_server(make_server, backend.url)
    backend.gate.clear()
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": "bye"}]})
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n{body}".encode()
        )
        s.settimeout(10)
        got = b""
        while b"backend " not in got:  # the first chunk arrived (with the headers or after)
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    # The client is gone; the proxy drops the backend call and still delivers the row.
    server.wait_files(1)
    backend.gate.set()
    assert wait_until(backend.aborted.is_set, timeout=5)
    assert not backend.finished.is_set()
    (row,) = server.rows()
    assert "client disconnected" in row["backend_error"]
    assert server.inbox_payloads()[0]["latest-user-prompt"] == "bye"


@pytest.mark.process
def test_kill_9_mid_backend_call_delivers_without_reply(make_server, backend) -> None:
    server = relay_server(make_server, backend.url)
    backend.gate.clear()
    done = threading.Event()

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):
            server.post_chat({"stream": True, "messages": [{"role": "user", "content": "mid"}]})
        done.set()

    threading.Thread(target=call, daemon=True).start()
    assert wait_until(lambda: backend.requests, timeout=5)
    assert server.rows()[0]["state"] == "awaiting_backend"  # committed before the call
    server.kill()
    assert done.wait(5)
    backend.gate.set()
    server.start()
    server.wait_files(1)
    (row,) = server.rows()
    assert (row["state"], row["backend_error"]) == ("written", "interrupted")
    assert "backend-llm-reply" not in server.inbox_payloads()[0]


def test_slow_backend_does_not_block_other_requests(make_server, backend) -> None:
    """40 streams held open by the backend; the event loop keeps answering at once."""
    server = relay_server(make_server, backend.url)
    backend.gate.clear()
    threads = [
        threading.Thread(
            target=server.post_chat,
            args=({"stream": True, "messages": [{"role": "user", "content": f"s{i}"}]},),
            kwargs={"timeout": 30},
            daemon=True,
        )
        for i in range(40)
    ]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(backend.requests) == 40, timeout=10)
    latencies = []
    with httpx.Client(base_url=server.base_url) as c:
        for _ in range(50):
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            latencies.append((time.perf_counter() - t0) * 1000)
    backend.gate.set()
    for t in threads:
        t.join(10)
    server.wait_files(40)
    median, worst = statistics.median(latencies), max(latencies)
    print(f"\n/healthz, 40 backend calls in flight: median {median:.2f} ms, max {worst:.2f} ms")
    assert median < 20


def test_abandoned_backend_wait_is_delivered(make_server, backend: FakeBackend) -> None:
    """A row left awaiting the backend by a worker that died (as another worker sees it)
    is delivered without a reply once the wait is far past any timeout."""
    server = relay_server(make_server, backend.url, "--backend-timeout", "1")
    body = json.dumps({"messages": [{"role": "user", "content": "orphan"}]}).encode()
    hour_ago = int((time.time() - 3600) * 1000)
    with sqlite3.connect(server.db) as conn:
        seg = conn.execute(
            "INSERT INTO segments (hash, data) VALUES (?, ?)", (b"orphan-hash-0001", body)
        ).lastrowid
        conn.execute(
            "INSERT INTO requests (id, received_ms, body_segments, body_hash, payload_kind,"
            " state, latest_user_prompt) VALUES (?, ?, ?, ?, 'full', 'awaiting_backend', ?)",
            ("0" * 20 + "abandoned000", hour_ago, array("I", [seg]).tobytes(), b"h" * 16,
             "orphan"),
        )  # fmt: skip
    server.wait_files(1)  # picked up by the flusher's idle pass, no restart
    (row,) = server.rows()
    assert (row["state"], row["backend_error"]) == ("written", "interrupted")
    assert server.inbox_payloads()[0]["latest-user-prompt"] == "orphan"
    assert "backend_wait_expired rows=1" in server.log()


def test_client_leaving_right_after_done_keeps_the_reply(make_server, backend) -> None:
    """OpenClaw closes the connection once it has [DONE]; the backend may end its stream a
    moment later. The reply was complete, so it must still be recorded."""
    server = relay_server(make_server, backend.url)
    backend.linger = 0.5
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": "quick"}]})
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n{body}".encode()
        )
        received = b""
        while b"data: [DONE]" not in received:
            received += s.recv(65536)
    server.wait_files(1)
    (row,) = server.rows()
    assert (row["backend_reply"], row["backend_error"]) == (FULL_REPLY, None)
    assert server.inbox_payloads()[0]["backend-llm-reply"] == FULL_REPLY


def test_a_query_in_url_stays_after_each_path(make_server, backend: FakeBackend) -> None:
    """`URL=https://host/v1?api-version=2`: each call goes to `/v1/<path>?api-version=2`."""
    server = relay_server(make_server, backend.url + "?api-version=2&x=a%20b")
    answer = sdk(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == FULL_REPLY
    assert server.get("/v1/models").json()["data"][0]["id"] == "backend-a"
    assert [r["path"] for r in backend.requests] == [
        "/v1/chat/completions?api-version=2&x=a+b", "/v1/models?api-version=2&x=a+b",
    ]  # fmt: skip


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("api_key", "echo"),
    [
        # PHP's json_encode escapes the slash
        ("sk-Zz/SEKRET/0123456789", lambda k: json.dumps({"k": k}).replace("/", "\\/")),
        # a key holding a quote and a backslash, echoed as JSON has them
        ('sk-"q"\\b-0123456789', lambda k: json.dumps({"error": f"bad key {k}"})),
        ("sk-Zz/SEKRET-0123456789", lambda k: "key=" + quote(k, safe="")),
        ("sk-Zz/SEKRET-0123456789", lambda k: "Basic " + b64(b"u:" + k.encode())),
        ("sk-Zz/SEKRET-0123456789", lambda k: "".join(f"\\u{ord(c):04x}" for c in k)),
    ],
)  # fmt: skip
def test_a_key_the_backend_echoes_in_another_encoding_reaches_no_record(
    make_server, api_key: str, echo: Any
) -> None:
    backend = FakeBackend(api_key=api_key)
    try:
        backend.mode, backend.echo_text = "raw500", echo(api_key)
        # the URL's own secret, percent-encoded in it, echoed decoded
        url = backend.url + "?api_key=Zz%2FQUERY-SECRET-42"
        backend.echo_text += " and Zz/QUERY-SECRET-42"
        server = make_server("--url", url, "--api-key", api_key, "--reply", "fallback")
        r = server.post_chat({"messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 200 and "fallback" in r.text
        server.wait_files(1)
    finally:
        backend.close()
    (row,) = server.rows()
    assert "backend answered HTTP 500" in row["backend_error"] and "****" in row["backend_error"]
    records = [server.log(), server.db.read_bytes().decode("latin-1"),
               *(p.read_text() for p in server.inbox.iterdir())]  # fmt: skip
    records += [w.read_bytes().decode("latin-1") for w in server.db.parent.glob("outbox.db-*")]
    for record in records:
        for secret in (api_key, echo(api_key), "QUERY-SECRET-42"):
            assert secret not in record
