"""Nothing acknowledged is lost: broken inbox, restarts, kill -9, a locked DB."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import Server, wait_until


def prompt_body(i: int, context: str | None = None) -> dict:
    body: dict = {"messages": [{"role": "user", "content": f"prompt {i}"}]}
    if context:
        body["channel"] = context
    return body


def written_counts(server: Server) -> Counter[str]:
    """How many times each inbox file was written, over every start of the server."""
    return Counter(re.findall(r"inbox_path=\S+/([^/\s]+\.json)", server.log()))


def break_inbox(server: Server) -> None:
    server.inbox.parent.mkdir(parents=True, exist_ok=True)
    server.inbox.write_text("a file where the inbox directory should be\n")


@pytest.mark.process
def test_broken_inbox_keeps_accepting_then_delivers_in_order(make_server) -> None:
    server = make_server(start=False)
    break_inbox(server)
    server.start()
    idle = server.get("/readyz")  # seen before any write is even tried
    assert idle.status_code == 503 and "not a directory" in idle.json()["inbox"]
    for i in range(25):
        assert server.post_chat(prompt_body(i, "api")).status_code == 200
    assert server.inbox.is_file()
    r = wait_until(lambda: (x := server.get("/readyz")).status_code == 503 and x)
    assert r, "readyz should report the broken inbox"
    assert "inbox" in r.json() and r.json()["inbox"].startswith("error:")
    assert r.json()["backlog"] == 25
    wait_until(lambda: "inbox_write_failed" in server.log(), message="no inbox_write_failed line")

    server.inbox.unlink()  # the user fixes the path
    names = server.wait_files(25)
    prompts = [p["latest-user-prompt"] for p in server.inbox_payloads()]
    assert prompts == [f"prompt {i}" for i in range(25)]
    # written in arrival order, not just named in it
    mtimes = [os.stat(server.inbox / n).st_mtime_ns for n in names]
    assert mtimes == sorted(mtimes)
    counts = wait_until(lambda: len(c := written_counts(server)) == 25 and c)
    assert set(counts.values()) == {1}, counts
    rows = server.rows()
    assert all(r["state"] == "written" for r in rows)
    assert rows[0]["attempts"] >= 2  # it failed at least once, then succeeded
    failures = server.rows("SELECT * FROM inbox_failures")
    assert failures
    assert all(re.match(r"(NotADirectory|FileExists)Error", f["error"]) for f in failures)
    assert wait_until(lambda: server.get("/readyz").status_code == 200)


@pytest.mark.process
def test_restart_flushes_pending_rows_once(make_server) -> None:
    server = make_server(start=False)
    break_inbox(server)
    server.start()
    for i in range(10):
        assert server.post_chat(prompt_body(i)).status_code == 200
    server.stop()
    assert sum(1 for r in server.rows() if r["state"] == "pending") == 10
    server.inbox.unlink()
    server.start()
    server.wait_files(10)
    assert "pending=10" in server.log()
    # one more restart writes nothing again
    server.restart()
    assert server.post_chat(prompt_body(99)).status_code == 200
    server.wait_files(11)
    # the last file's line comes after any second write of an older row (rows go in order)
    counts = wait_until(lambda: len(c := written_counts(server)) == 11 and c)
    assert set(counts.values()) == {1}, counts


@pytest.mark.process
def test_kill_9_with_pending_rows_loses_nothing(make_server) -> None:
    server = make_server(start=False)
    break_inbox(server)
    server.start()
    acked = []
    for i in range(40):
        r = server.post_chat(prompt_body(i, "chat"))
        assert r.status_code == 200
        acked.append(f"prompt {i}")
    server.kill()
    server.inbox.unlink()
    server.start()
    server.wait_files(40)
    assert [p["latest-user-prompt"] for p in server.inbox_payloads()] == acked
    assert server.inbox_payloads()[0]["messages"]  # first of the context is full
    assert "request_id" in server.inbox_payloads()[1]  # later ones compact


@pytest.mark.process
def test_kill_9_while_flushing_under_load(make_server) -> None:
    """Kill mid-traffic: every acknowledged request ends up in the inbox exactly once, and
    nothing appears that was never sent (a request committed just before the kill may be
    delivered although its answer was lost: the client retries, dedup absorbs it)."""
    server = make_server()
    sent: set[str] = set()
    acked: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(timeout=5) as c:
            i = 0
            while not stop.is_set():
                prompt = f"w{worker} #{i}"
                sent.add(prompt)
                try:
                    r = c.post(
                        server.base_url + "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": prompt}]},
                    )
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked.append(prompt)
                i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= 300, timeout=20)
    server.kill()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 300
    server.start()

    def delivered() -> Counter[str]:
        return Counter(p["latest-user-prompt"] for p in server.inbox_payloads())

    assert wait_until(lambda: set(acked) <= set(delivered()), timeout=20)
    # Rows committed but never answered (the kill came first) are delivered too.
    assert wait_until(lambda: sum(delivered().values()) >= len(server.rows()))
    seen = delivered()
    assert set(seen) <= sent
    assert set(seen.values()) == {1}
    assert len(server.rows()) == len(seen)


@pytest.mark.process  # the lock is held by another process, as a CLI would
def test_locked_db_answers_503_then_recovers(server: Server) -> None:
    blocker = sqlite3.connect(server.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock past the busy timeout
    try:
        t0 = time.monotonic()
        r = server.post_chat(prompt_body(1), timeout=30)
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 >= 4  # it waited for the lock before giving up
        body = r.json()
        assert body["error"]["type"] == "service_unavailable"
        assert "could not be recorded" in body["error"]["message"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert server.post_chat(prompt_body(2)).status_code == 200
    server.wait_files(1)
    assert [p["latest-user-prompt"] for p in server.inbox_payloads()] == ["prompt 2"]
    assert len(server.rows()) == 1  # the refused request was not recorded


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.process
def test_idle_server_does_not_spin(server: Server) -> None:
    assert server.post_chat(prompt_body(1)).status_code == 200
    server.wait_files(1)
    assert server.proc is not None
    before = cpu_seconds(server.proc.pid)
    time.sleep(2)
    used = cpu_seconds(server.proc.pid) - before
    assert used < 0.2, f"idle server used {used:.2f} s of CPU in 2 s"


def test_a_transaction_inside_another_lands_with_it(tmp_path: Path) -> None:
    """Steps that must land together (a run's end and its count) nest: the inner one joins
    the outer, nobody sees it before the outer commits, and the outer's failure undoes it."""
    from ai_agent_proxy import db

    path = tmp_path / "t.db"
    conn, reader = db.connect(path), db.connect(path)
    conn.execute("CREATE TABLE t (x INTEGER)")
    count = lambda: reader.execute("SELECT count(*) FROM t").fetchone()[0]  # noqa: E731
    with pytest.raises(RuntimeError), db.transaction(conn):
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
        assert conn.in_transaction and count() == 0
        raise RuntimeError("the second step failed")
    assert count() == 0
    with db.transaction(conn):
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES (2)")
        assert count() == 0
    assert count() == 1 and not conn.in_transaction
    # a transaction left open otherwise is not joined (it would never be committed)
    conn.execute("SAVEPOINT leaked")
    with (
        pytest.raises(sqlite3.OperationalError, match="within a transaction"),
        db.transaction(conn),
    ):
        conn.execute("INSERT INTO t VALUES (3)")
