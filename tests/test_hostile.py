"""No request can hurt another: odd bodies among good ones, a row that can never become a
file, fuzzed bodies with the delivery invariant checked on every example."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import HTTP, Server, cli, wait_until
from .embedded import EmbeddedServer

KEY = "hostile-test-key-0123456789"


def read_json(data: bytes) -> object:
    """A file as an agent reads it; deep documents need more than the default recursion."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        return json.loads(data.decode("utf-8"))  # strict UTF-8: no raw surrogates
    finally:
        sys.setrecursionlimit(limit)


def nested(depth: int) -> bytes:
    return b'{"messages":[{"role":"user","content":"p"}],"x":' + b"[" * depth + b"]" * depth + b"}"


SURROGATE = b'{"messages":[{"role":"user","content":"half an emoji \\ud83d"}],"channel":"t"}'


def good(i: int) -> dict:
    return {"channel": "good", "messages": [{"role": "user", "content": f"good {i}"}]}


def prompts(server: Server) -> list[str]:
    return [p["latest-user-prompt"] for p in server.inbox_payloads()]


@pytest.mark.parametrize(
    ("odd", "expected"),
    [
        (nested(253), 200),  # 254 levels with the object around: the limit
        (nested(254), 400),  # one more: refused at the door, as nothing could render it
        (nested(1100), 400),  # deeper than the parser takes
        (SURROGATE, 200),  # kept, as its escape in the body and U+FFFD in the prompt
        (b'{"messages":[{"role":"user","content":"n"}],"x":NaN}', 400),
        (b'{"messages":[{"role":"user","content":"i"}],"x":-Infinity}', 400),
        (b'{"messages":[{"role":"user","content":"b"}],"x":1e999999}', 400),
    ],
    ids=["nested-254", "nested-255", "nested-1100", "surrogate", "nan", "infinity", "huge-number"],
)
def test_an_odd_body_among_60_concurrent_good_ones(make_server, odd: bytes, expected: int) -> None:
    server = make_server()
    with ThreadPoolExecutor(16) as pool:
        goods = [pool.submit(server.post_chat, good(i)) for i in range(30)]
        odd_answer = pool.submit(server.post_chat, odd, headers={"content-type": "x"})
        goods += [pool.submit(server.post_chat, good(i)) for i in range(30, 60)]
        answers = [f.result() for f in goods]
    assert [r.status_code for r in answers] == [200] * 60
    r = odd_answer.result()
    assert r.status_code == expected, r.text
    if expected == 400:
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "please retry" not in r.text  # a permanent error is not told to retry
        if b"[[[" in odd:
            assert "not accepted: nested deeper than 254 levels" in r.json()["error"]["message"]
    names = server.wait_files(60 + (expected == 200), timeout=15)
    assert sorted(p for p in prompts(server) if p.startswith("good")) == sorted(
        f"good {i}" for i in range(60)
    )
    assert server.get("/readyz").status_code == 200
    assert "Traceback" not in server.log()
    if expected == 200:
        (odd_row,) = [r for r in server.rows() if not r["latest_user_prompt"].startswith("good")]
        assert odd_row["state"] == "written"
        (name,) = [n for n in names if odd_row["id"] in n]
        raw = (server.inbox / name).read_bytes()
        payload = read_json(raw)
        assert isinstance(payload, dict)
        if odd == SURROGATE:
            assert b'"half an emoji \\ud83d"' in raw  # the person's text, kept exactly
            assert payload["latest-user-prompt"] == "half an emoji \ufffd"
            assert server.body(odd_row["id"]) == SURROGATE  # stored byte for byte


def corrupt_body(db: Path, request_id: str) -> None:
    """Point a row at a body no parser reads: the row can never become a full payload."""
    conn = sqlite3.connect(db)
    try:
        seg = conn.execute(
            "INSERT INTO segments (hash, data) VALUES (randomblob(16), ?) RETURNING id",
            (b"{this is not json",),
        ).fetchone()[0]
        conn.execute(
            "UPDATE requests SET body_segments = ? WHERE id = ?",
            (seg.to_bytes(4, "little"), request_id),
        )
        conn.commit()
    finally:
        conn.close()


def test_a_row_that_cannot_be_rendered_ends_undeliverable_and_the_rest_flows(make_server) -> None:
    server = make_server(start=False)
    server.inbox.parent.mkdir(parents=True, exist_ok=True)
    server.inbox.write_text("in the way")  # rows stay pending until we are ready
    server.start()
    for i in range(3):
        body = {"channel": f"c{i}", "messages": [{"role": "user", "content": f"row {i}"}]}
        assert server.post_chat(body).status_code == 200
    server.stop()
    poisoned = server.rows()[1]["id"]
    corrupt_body(server.db, poisoned)
    server.inbox.unlink()
    server.start()
    for i in range(3, 6):
        body = {"channel": f"c{i}", "messages": [{"role": "user", "content": f"row {i}"}]}
        assert server.post_chat(body).status_code == 200
    server.wait_files(5)
    wait_until(
        lambda: (
            server.rows("SELECT state FROM requests WHERE id = ?", poisoned)[0]["state"]
            == "undeliverable"
        ),
        message=server.log,
    )
    assert prompts(server) == ["row 0", "row 2", "row 3", "row 4", "row 5"]
    log = server.log()
    assert log.count("inbox_row_undeliverable") == 1 and "Traceback" not in log
    ready = server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["undeliverable"] == 1
    assert 'aiap_rows{state="undeliverable"} 1.0' in server.get("/metrics").text
    db = ["--db", str(server.db), "--inbox", str(server.inbox)]
    listed = json.loads(cli("history", "--state", "undeliverable", "--format", "json", *db).stdout)
    assert [r["id"] for r in listed] == [poisoned] and listed[0]["inbox_file"] is None
    stats = json.loads(cli("history", "stats", "--format", "json", *db).stdout)
    assert stats["by_state"]["undeliverable"] == 1
    for args in (["history", "show", poisoned], ["history", "show", poisoned, "--format", "json"]):
        r = cli(*args, *db)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    shown = json.loads(cli("history", "show", poisoned, "--format", "json", *db).stdout)
    assert shown["body"] == "{this is not json" and len(shown["failed_attempts"]) == 3
    # replay cannot render it either: one line, exit 1, nothing written
    r = cli("replay", poisoned, *db)
    assert r.returncode == 1 and "cannot render" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # once fixed, replay writes it
    conn = sqlite3.connect(server.db)
    conn.execute(
        "UPDATE segments SET data = ? WHERE data = ?", (b'{"fixed": true}', b"{this is not json")
    )
    conn.commit()
    conn.close()
    r = cli("replay", poisoned, *db)
    assert r.returncode == 0, r.stderr
    assert len(server.inbox_names()) == 6


# -- fuzzing, with the delivery invariant on every example ----------------------------------

json_leaf = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)  # fmt: skip
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=40,
)  # fmt: skip
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=2000) | st.sampled_from(
    ["\x00", "\u202e", "\ud7ff", "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>", "```json\n{", "𝕏" * 50]
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", 7, None])},
    optional={"content": odd_text | json_value | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": odd_text}), max_size=3)},
)  # fmt: skip
dict_bodies = st.fixed_dictionaries(
    {}, optional={"messages": st.lists(message, max_size=4) | json_value, "stream": json_value,
                  "model": json_value, "channel": json_value, "target": json_value},
)  # fmt: skip


@st.composite
def hostile_bytes(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """(raw body, the status it must get, or None where either 200 or 400 is right)."""
    kind = draw(st.sampled_from(["dict", "value", "deep", "surrogate", "constant", "raw"]))
    if kind == "dict":
        return json.dumps(draw(dict_bodies)).encode(), 200
    if kind == "value":
        value = draw(json_value)
        return json.dumps(value).encode(), 200 if isinstance(value, dict) else 400
    if kind == "deep":
        depth = draw(st.integers(min_value=240, max_value=1100))
        opener = draw(st.sampled_from([b"[", b'{"k":']))
        closer = b"]" if opener == b"[" else b"}"
        raw = b'{"messages":[],"x":' + opener * depth + b"1" + closer * depth + b"}"
        return raw, 200 if depth + 1 <= 254 else 400  # the outer object is a level too
    if kind == "surrogate":
        half = draw(st.integers(min_value=0xD800, max_value=0xDFFF))
        text = json.dumps(draw(st.text(max_size=20)))[1:-1]  # escaped as JSON wants
        escaped = f"{text}\\u{half:04x}".encode()
        return b'{"messages":[{"role":"user","content":"' + escaped + b'"}]}', 200
    if kind == "constant":
        const = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-2e999"]))
        return b'{"messages":[],"x":' + const + b"}", 400
    return draw(st.binary(max_size=300)), None


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("fuzz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    server = EmbeddedServer(workdir, workdir / "inbox", workdir / "outbox.db", ["--key", KEY], env,
                    key=KEY).start()  # fmt: skip
    yield server
    server.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_bytes())
def test_fuzzed_bodies_every_200_is_delivered(fuzz_server: Server, case: tuple) -> None:
    """Every 200 appears in the inbox as valid JSON, and a normal request sent after it is
    written within a second; every refusal is a 400 in the error shape."""
    raw, expected = case
    server = fuzz_server
    before = server.rows("SELECT count(*) AS n FROM requests")[0]["n"]
    r = server.post_chat(raw, headers=server.headers())
    if expected is not None:
        assert r.status_code == expected, (raw[:200], r.text[:300])
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["status"] == "error" and r.json()["error"]["code"] == 400
        assert server.rows("SELECT count(*) AS n FROM requests")[0]["n"] == before
        return
    if b'"stream"' in raw and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    (row,) = server.rows("SELECT id FROM requests ORDER BY seq DESC LIMIT 1")
    marker = f"normal after {row['id']}"
    assert server.post_chat({"messages": [{"role": "user", "content": marker}]}).status_code == 200
    wait_until(
        lambda: server.rows("SELECT 1 FROM requests WHERE latest_user_prompt = ? AND state = "
                            "'written'", marker),
        timeout=1.0, step=0.005,
        message=lambda: f"not written within 1 s after {raw[:100]!r}\n{server.log()[-2000:]}",
    )  # fmt: skip
    # Files are written in arrival order: the odd one is decided by now.
    (state,) = server.rows("SELECT state FROM requests WHERE id = ?", row["id"])
    assert state["state"] in ("written", "duplicate"), state  # a repeat makes no file
    if state["state"] == "written":
        (name,) = [n for n in server.inbox_names() if row["id"] in n]
        assert isinstance(read_json((server.inbox / name).read_bytes()), dict)


def test_fuzzing_leaves_only_whole_files(fuzz_server: Server) -> None:
    """Whatever ran before on this server: only whole JSON files, nothing stuck."""
    assert fuzz_server.post_chat({"messages": [{"role": "user", "content": "x"}]}).status_code
    wait_until(
        lambda: not fuzz_server.rows("SELECT 1 FROM requests WHERE state = 'pending'"),
        message="rows left pending",
    )
    names = os.listdir(fuzz_server.inbox)
    assert names and all(n.endswith(".json") and not n.startswith(".") for n in names)
    for n in names:
        assert isinstance(read_json((fuzz_server.inbox / n).read_bytes()), dict)
    assert not fuzz_server.rows("SELECT 1 FROM requests WHERE state = 'undeliverable'")
    assert HTTP.get(fuzz_server.base_url + "/healthz").status_code == 200


# -- connections ------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.process
def test_a_trickling_flood_does_not_lock_out_normal_clients(make_server) -> None:
    """With `ulimit -n 256` (bound: 128 connections) and 300 connections trickling header
    bytes, normal requests are still answered during the flood, the log says why
    connections are being closed, and the tricklers are cut at the header deadline."""
    import socket
    import threading

    server = make_server(start=False)
    server.args += ["--header-timeout", "2"]
    server.nofile = (256, 256)
    server.start()
    wait_until(lambda: "max_connections=128" in server.log(), message=server.log)
    flood: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            flood.append(s)
        send_now_and_then(flood, b"x", stop)  # a header byte to every one of them

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(flood) >= 300, timeout=20, message="flood not opened")
        served = served_during(server, 3.0)
        assert served >= 10
        assert "connection_limit_reached" in server.log()
        # the tricklers still open are cut at the header deadline
        wait_until(lambda: all(_closed(s) for s in flood), timeout=10,
                   message="trickling connections outlived the header deadline")  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
        for s in flood:
            s.close()
    r = server.post_chat(good(10**6), timeout=2)  # (a number no served one had)
    assert r.status_code == 200
    server.wait_files(served + 1)


@pytest.mark.process
def test_sigterm_under_load_answers_what_it_committed_and_writes_it(make_server) -> None:
    from .load import start_load

    server = make_server()
    record, stop, thread = start_load(server.port, total=200_000, connections=32)
    wait_until(lambda: len(record.acked) >= 400, timeout=30)
    import time

    t0 = time.monotonic()
    server.proc.send_signal(15)
    server.proc.wait(15)
    took = time.monotonic() - t0
    stop.set()
    thread.join(30)
    rows = server.rows("SELECT latest_user_prompt, state FROM requests")
    committed = {r["latest_user_prompt"] for r in rows}
    # every committed request was answered, and is in the inbox already
    assert committed == set(record.acked), (len(committed), len(record.acked))
    assert {r["state"] for r in rows} == {"written"}
    assert len(server.inbox_names()) == len(rows)
    assert took < 3.0, took
    print(f"\n  SIGTERM under load: exit in {took:.2f} s, {len(rows)} committed, all answered")


@pytest.mark.process
def test_memory_returns_near_its_baseline_after_large_bodies(make_server) -> None:
    """Four 15 MiB bodies: the server's and the writer's RSS come back near where they were
    (nothing keeps a copy of a large body once it is written)."""
    server = make_server()
    assert server.post_chat(good(0)).status_code == 200
    server.wait_files(1)
    writer = wait_until(lambda: [
        int(p) for p in subprocess.run(["pgrep", "-P", str(server.proc.pid)],
                                       capture_output=True, text=True).stdout.split()
    ], message="no writer process")[0]  # fmt: skip
    base = rss_kb(server.proc.pid), rss_kb(writer)
    big = json.dumps(
        {"messages": [{"role": "system", "content": "s" * (15 << 20)}, {"role": "user",
                                                                          "content": "big"}]}
    ).encode()  # fmt: skip
    for i in range(4):
        r = server.post_chat(big.replace(b'"big"', f'"big {i}"'.encode()), timeout=60)
        assert r.status_code == 200
    server.wait_files(5, timeout=60)
    for i in range(1, 4):  # a little normal traffic after
        assert server.post_chat(good(i)).status_code == 200
    server.wait_files(8)
    after = rss_kb(server.proc.pid), rss_kb(writer)
    print(f"\n  RSS KB server {base[0]} -> {after[0]}, writer {base[1]} -> {after[1]}")
    assert after[0] - base[0] < 60_000, (base, after)
    assert after[1] - base[1] < 30_000, (base, after)


SIGNAL_DURING_START = """
import asyncio, os, signal, sys
from ai_agent_proxy.app import create_app
from ai_agent_proxy.startup import prepare_storage
from ai_agent_proxy.config import load_settings
from ai_agent_proxy.connections import GuardedHttpProtocol

settings = load_settings(flags=dict(port={port}, inbox={inbox!r}, db={db!r}))
prepare_storage(settings)  # as `serve` does
app = create_app(settings)
stops = dict(
    SIGTERM=lambda app: os.kill(os.getpid(), signal.SIGTERM),
    SIGINT=lambda app: os.kill(os.getpid(), signal.SIGINT),
    # Sanic's own handler, run in the loop iteration that ends the start-up step
    handler=lambda app: asyncio.get_running_loop().call_soon(app.stop, False),
)
if {when!r} == "paused":
    # Sanic calls set_serving(True) between its start-up steps, with the loop paused
    serving = type(app).set_serving
    def set_serving(self, on):
        if on:
            os.kill(os.getpid(), signal.{how})
        serving(self, on)
    type(app).set_serving = set_serving
else:
    first_or_last = -100 if {how!r} == "handler" else 100  # around the app's listeners
    getattr(app, {when!r})(stops[{how!r}], priority=first_or_last)
app.run(host="127.0.0.1", port={port}, single_process=True, motd=False,
        protocol=GuardedHttpProtocol)
print("stopped")
"""


@pytest.mark.parametrize(
    ("when", "how"),
    [("before_server_start", "SIGTERM"), ("before_server_start", "SIGINT"),
     ("after_server_start", "SIGTERM"), ("after_server_start", "handler"),
     ("paused", "SIGTERM"), ("paused", "SIGINT")],
)  # fmt: skip
@pytest.mark.process
def test_a_signal_while_start_up_listeners_run_stops_the_server(
    tmp_path: Path, when: str, how: str
) -> None:
    """A stop asked for while Sanic still runs its start-up listeners (the port may answer
    already) used to be consumed by the end of that step, and one that came while Sanic
    had the loop paused between its steps (just after READY=1) was kept by uvloop until
    another signal came: the server ran on. It signals itself at each such moment here."""
    from .conftest import free_port

    script = SIGNAL_DURING_START.format(
        port=free_port(), inbox=str(tmp_path / "inbox"), db=str(tmp_path / "db"), when=when,
        how=how,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{how} during {when} was lost: {proc.communicate()[0][-2000:]}")
    assert proc.returncode == 0 and out.rstrip().endswith("stopped"), out
    assert "ERROR" not in out, out


def test_sigterm_soon_after_the_first_answer_stops_the_server() -> None:
    """A few cycles of tools/sigterm_cycles.py (200 of them in the closing notes)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    try:
        from sigterm_cycles import run_cycles
    finally:
        sys.path.pop(0)
    cycles = run_cycles(3, parallel=2, grace_s=7.0, seed=1)
    assert all(c.stopped_in_s is not None and c.exit_code == 0 for c in cycles), cycles


def _trickle_bodies(port: int, count: int, key: str | None = None) -> list[Any]:
    """`count` connections that send whole headers of a 60 KB chat request, then its body
    a byte now and then (a few bytes at once here)."""
    import socket

    auth = f"authorization: Bearer {key}\r\n" if key else ""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"{auth}content-length: 60000\r\n\r\n{{"
    ).encode()
    flood = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        flood.append(s)
    return flood


def send_now_and_then(flood: list[Any], data: bytes, stop: Any) -> None:
    """Send `data` to every connection of `flood` every 0.3 s until `stop` is set."""
    while not stop.wait(0.3):
        for s in flood:
            with contextlib.suppress(OSError):
                s.send(data)


def served_during(server: Server, seconds: float) -> int:
    """Normal requests one after the other for `seconds`; each must be answered 200 (in
    2 s). How many were."""
    import time

    served, t_end = 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        assert server.post_chat(good(served), timeout=2).status_code == 200
        served += 1
    return served


def _closed(s: Any) -> bool:
    """Whether the server closed this (non-blocking peek)."""
    s.setblocking(False)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_trickling_bodies_do_not_lock_out_normal_clients(make_server) -> None:
    """200 connections trickle their bodies (headers whole, then a byte now and then) at
    MAX_CONNECTIONS=64: a steady client is served throughout (the slowest body-stage
    connection makes room), and the tricklers are cut once BODY_TIMEOUT has passed and
    they keep no BODY_MIN_RATE."""
    import threading

    server = make_server("--max-connections", "64", "--body-timeout", "2")
    stop = threading.Event()
    flood = _trickle_bodies(server.port, 200)

    thread = threading.Thread(target=send_now_and_then, args=(flood, b" ", stop), daemon=True)
    thread.start()
    try:
        served = served_during(server, 3.0)
        assert served >= 10
        assert "connection_limit_reached" in server.log()
        wait_until(lambda: all(_closed(s) for s in flood), timeout=10,
                   message="trickling bodies outlived BODY_TIMEOUT")  # fmt: skip
        assert "body_timeout" in server.log()
    finally:
        stop.set()
        thread.join(10)
        for s in flood:
            s.close()
    server.wait_files(served)


@pytest.mark.process  # 80 connections at once: the server needs its own interpreter
def test_a_wrong_key_is_refused_on_the_headers_before_the_body(make_server) -> None:
    """With KEY set, 80 connections with no key (or a wrong one) send headers and trickle
    their bodies at MAX_CONNECTIONS=64: each gets 401 at once and is closed; the client
    with the key is served meanwhile."""
    import time

    server = make_server("--max-connections", "64", key="sk-proxy-key-123456")
    started = time.monotonic()
    flood = _trickle_bodies(server.port, 40) + _trickle_bodies(server.port, 40, key="wrong")
    try:
        for s in flood:
            s.settimeout(5)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
        assert time.monotonic() - started < 5  # at once: nobody waited for a body
        wait_until(lambda: all(_closed(s) for s in flood), timeout=5,
                   message="refused connections were kept open")  # fmt: skip
        assert server.post_chat(good(1), timeout=2).status_code == 200
    finally:
        for s in flood:
            s.close()
    server.wait_files(1)


def test_a_slow_but_steady_body_is_served_past_body_timeout(make_server) -> None:
    """BODY_TIMEOUT 1 s, BODY_MIN_RATE 1,000 B/s: a 4 KB body sent at ~2.5 KB/s over
    ~1.6 s is served; one sent at ~250 B/s is cut."""
    import socket
    import time

    server = make_server("--body-timeout", "1", "--body-min-rate", "1000")
    body = json.dumps(good(7)).encode()
    body += b" " * (4000 - len(body))

    def send(chunks: int, pause: float) -> tuple[bytes, float]:
        """Send the first `chunks` 500-byte pieces, `pause` s apart; (answer, when)."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            began = time.monotonic()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                      b"application/json\r\ncontent-length: 4000\r\n\r\n")  # fmt: skip
            for i in range(0, 500 * chunks, 500):
                s.sendall(body[i : i + 500])
                time.sleep(pause)
            try:
                return s.recv(4096), time.monotonic() - began
            except OSError:
                return b"", time.monotonic() - began

    answer, _ = send(8, 0.2)  # 4 KB in ~1.6 s
    assert answer.startswith(b"HTTP/1.1 200 ")
    answer, took = send(1, 0)  # 500 bytes, then nothing: cut soon after the deadline
    assert answer == b"" and 0.9 < took < 3, took
    server.wait_files(1)
    assert len(server.rows()) == 1


def test_aborted_and_unparsable_connections_are_one_short_escaped_line(make_server) -> None:
    """Connections Sanic gives up on (a request line with escape sequences, headers cut at
    their deadline, a body the client abandons) log one short line per kind a minute, no
    traceback, and no raw control character reaches the log."""
    import socket
    import time

    server = make_server("--header-timeout", "0.5", "--debug")

    def connect(data: bytes, wait: float) -> None:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(data)
            s.settimeout(wait)
            with contextlib.suppress(OSError):
                s.recv(100)

    for _ in range(3):
        connect(b"GET /\x1b[2J\x1b[31mred\x07\x9b HTTP/1.1\r\nhost: x\r\n\r\n", 0.3)
        connect(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", 1.0)  # cut at 0.5 s
        connect(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 9\r\n\r\n{", 0.05)
    wait_until(lambda: server.log().count("connection_failed") >= 2, message=server.log)
    time.sleep(0.3)  # (nothing more may come: checked below)
    log = server.log()
    assert "Traceback" not in log, log
    assert "\x1b" not in log and "\x07" not in log and "\x9b" not in log
    failed = [line.split("error=")[1] for line in log.splitlines() if "connection_failed" in line]
    assert len(failed) == 2 and failed[1].startswith("CancelledError: the connection was")
    assert log.count("header_timeout:") == 1


@pytest.mark.process
def test_many_large_bodies_at_once_stay_within_memory_and_a_small_client_is_served(
    make_server,
) -> None:
    """The suite's small version of tools/big_bodies.py (80 x 15 MiB: 663 MB; 13.6 + 11.6 GB
    for 200 before): 6 distinct 6 MiB bodies at once with BODY_MEMORY 48 MiB (two at a
    time), each refused one retried after its Retry-After as a client library does. The
    server and its writer stay under 260 MB (176 MB measured; 353 MB before the bound, and
    a small answer then took 1.08 s), a keyed small client is answered within a second
    throughout, and every acknowledged body is written."""
    import threading

    import httpx

    server = make_server("--body-memory", "48MiB", key="k-0123456789abcdef")
    assert server.proc is not None
    assert server.post_chat(good(0)).status_code == 200
    server.wait_files(1)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            kids = [int(p) for p in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
                    .read_text().split()]  # fmt: skip
            peak[0] = max(peak[0], rss_kb(server.proc.pid) + sum(rss_kb(k) for k in kids))
            time.sleep(0.02)

    small_waits: list[float] = []

    def small() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            assert server.post_chat(good(f"small {n}"), timeout=30).status_code == 200
            small_waits.append(time.monotonic() - started)
            time.sleep(0.05)

    acked: list[int] = []

    def big(i: int) -> None:
        data = json.dumps({"channel": "big", "user_id": f"u{i}", "messages": [
            {"role": "user", "content": f"big {i} " + "y" * (6 << 20)}]}).encode()  # fmt: skip
        with httpx.Client(timeout=60, headers=server.headers()) as client:
            for _ in range(100):
                try:
                    r = client.post(server.base_url + "/v1/chat/completions", content=data)
                except httpx.TransportError:  # refused before its body was read
                    time.sleep(1)
                    continue
                if r.status_code == 200:
                    acked.append(i)
                    return
                assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
                time.sleep(float(r.headers["retry-after"]))

    helpers = [threading.Thread(target=sample), threading.Thread(target=small)]
    bigs = [threading.Thread(target=big, args=(i,)) for i in range(6)]
    for t in helpers + bigs:
        t.start()
    for t in bigs:
        t.join(120)
    stop.set()
    for t in helpers:
        t.join(30)
    assert sorted(acked) == list(range(6))
    files = server.wait_files(1 + 6 + len(small_waits), timeout=60)
    assert len(files) == 7 + len(small_waits)
    assert peak[0] < 260_000, f"server + writer peaked at {peak[0] // 1024} MB"
    assert small_waits and max(small_waits) < 1.0, sorted(small_waits)[-5:]
