"""Faults a skeptical reviewer would try: full disks, read-only DB, vanished inbox, several
workers, kill -9 at several moments, fuzzed bodies, hostile context values, retention."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import HTTP, Server, fixture_body, wait_until
from .load import start_load

KEY = "fault-test-key-0123456789"


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """mount a small tmpfs (root only; CI runs as root on the same kind of machine)."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "2m") -> Path:
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path) -> Path:
    """Use up every free byte of the file system holding `directory`."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def delivered(server: Server) -> Counter[str]:
    return Counter(p["latest-user-prompt"] for p in server.inbox_payloads())


def body(i: int | str, channel: str = "fault") -> dict:
    return {"channel": channel, "messages": [{"role": "user", "content": f"prompt {i}"}]}


def assert_all_once(server: Server, acked: list[str], sent: set[str], timeout: float = 30) -> None:
    """Every acknowledged prompt is in the inbox exactly once; nothing unsent appears."""
    assert wait_until(lambda: set(acked) <= set(delivered(server)), timeout=timeout), (
        f"missing: {sorted(set(acked) - set(delivered(server)))[:10]}\n{server.log()[-2000:]}"
    )
    seen = delivered(server)
    assert set(seen) <= sent, sorted(set(seen) - sent)[:10]
    assert max(seen.values()) == 1, [p for p, n in seen.items() if n > 1][:10]
    # only *.json and dot-temps (a killed writer's leftovers, removed at the next start)
    assert all(
        n.endswith(".json") or (n.startswith(".") and n.endswith(".tmp"))
        for n in os.listdir(server.inbox)
    )
    print(f"\n  sent={len(sent)} acknowledged={len(acked)} delivered={len(seen)} lost=0 dup=0")


def metric(server: Server, name: str) -> float:
    text = server.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


# -- inbox outages --------------------------------------------------------------------------


def test_inbox_disk_full_then_recovers_in_order(make_server, small_fs) -> None:
    disk = small_fs("inboxfs", "1m")
    server = make_server("--inbox", str(disk / "inbox"))
    server.inbox = disk / "inbox"
    assert server.post_chat(body(0)).status_code == 200
    server.wait_files(1)
    filler = fill(disk)
    for i in range(1, 31):
        assert server.post_chat(body(i)).status_code == 200
    ready = wait_until(lambda: (r := server.get("/readyz")).status_code == 503 and r.json())
    assert ready and "No space left" in ready["inbox"]
    assert ready["backlog"] == 30 and ready["retry_in_s"] > 0
    assert metric(server, "aiap_inbox_write_failures") >= 1
    assert metric(server, "aiap_backlog_rows") == 30
    assert metric(server, "aiap_backlog_oldest_age_seconds") > 0
    filler.unlink()
    names = server.wait_files(31)
    assert [p["latest-user-prompt"] for p in server.inbox_payloads()] == [
        f"prompt {i}" for i in range(31)
    ]
    mtimes = [os.stat(server.inbox / n).st_mtime_ns for n in names]
    assert mtimes == sorted(mtimes)
    assert wait_until(lambda: server.get("/readyz").status_code == 200)


def test_inbox_directory_removed_while_running(server: Server) -> None:
    assert server.post_chat(body(0)).status_code == 200
    server.wait_files(1)
    for name in os.listdir(server.inbox):
        os.unlink(server.inbox / name)
    server.inbox.rmdir()  # e.g. the agent's workspace was re-created
    for i in range(1, 6):
        assert server.post_chat(body(i)).status_code == 200
    server.wait_files(5)
    assert sorted(delivered(server)) == [f"prompt {i}" for i in range(1, 6)]


# -- DB faults ------------------------------------------------------------------------------


def test_db_disk_full_answers_503_then_recovers(make_server, small_fs) -> None:
    disk = small_fs("dbfs", "4m")
    server = make_server("--db", str(disk / "outbox.db"))
    server.db = disk / "outbox.db"
    assert server.post_chat(body("before")).status_code == 200
    filler = fill(disk)
    refused = [server.post_chat(fixture_body("openclaw-2026.9-telegram-group.json"))
               for _ in range(3)]  # fmt: skip
    for r in refused:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "full" in r.json()["error"]["message"]
    filler.unlink()
    assert wait_until(lambda: server.post_chat(body("after")).status_code == 200, timeout=10)
    server.wait_files(2)
    assert sorted(delivered(server)) == ["prompt after", "prompt before"]


def chattr(flag: str, *paths: Path) -> None:
    r = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr {flag} is not possible here: {r.stderr.strip()}")


def test_db_read_only_answers_503_then_recovers(server: Server) -> None:
    assert server.post_chat(body("before")).status_code == 200
    server.wait_files(1)
    files = [p for p in server.db.parent.glob(server.db.name + "*")]
    chattr("+i", *files)  # immutable: even root's open descriptors cannot write
    try:
        for _ in range(2):
            r = server.post_chat(body("refused"))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "service_unavailable"
        ready = server.get("/readyz")
        assert ready.status_code == 503 and ready.json()["db"].startswith("error:")
    finally:
        chattr("-i", *files)
    assert wait_until(lambda: server.post_chat(body("after")).status_code == 200, timeout=10)
    server.wait_files(2)
    assert sorted(delivered(server)) == ["prompt after", "prompt before"]
    assert server.get("/readyz").status_code == 200


# -- several workers ------------------------------------------------------------------------


def worker_pids(server: Server) -> list[int]:
    """The Sanic worker processes, as the server logs them (the main process also has
    multiprocessing helpers as children; killing those is not killing a worker)."""
    return [int(pid) for pid in re.findall(r"Starting worker \[(\d+)\]", server.log())]


@pytest.mark.process
@pytest.mark.slow
def test_two_workers_under_load_and_one_killed(make_server) -> None:
    server = make_server("--worker", "2")
    record, _, thread = start_load(server.port, total=400, connections=32)
    thread.join(120)
    assert record.statuses == {200: 400}  # never a 503 ("database is locked") under WORKER=2
    assert_all_once(server, record.acked, record.sent)

    pids = worker_pids(server)
    assert len(pids) == 2, pids
    # The killed worker may hold most connections (one worker can accept a whole burst):
    # its clients connect again, as real ones do, and reach the survivor.
    record2, _, thread2 = start_load(
        server.port, total=600, connections=32, tag="second", reconnects=3
    )
    wait_until(lambda: len(record2.acked) >= 100, timeout=30)
    os.kill(pids[0], signal.SIGKILL)  # one worker dies mid-load
    thread2.join(120)
    assert server.proc is not None and server.proc.poll() is None  # still serving
    # the survivor keeps serving and delivers the dead worker's claimed rows too
    assert_all_once(server, record.acked + record2.acked, record.sent | record2.sent)
    assert len(record2.acked) >= 400


# -- the inbox writer process --------------------------------------------------------------


def writer_pids(server_pid: int) -> list[int]:
    """The inbox writer processes among the children of a server process."""
    pids = []
    for pid in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"ai_agent_proxy.inbox_writer" in cmdline:
            pids.append(int(pid))
    return pids


@pytest.mark.process
def test_inbox_writer_killed_under_load(server: Server) -> None:
    """kill -9 of the writer process while it works: the flusher reports the failed batch,
    starts a new writer and every acknowledged request is still delivered exactly once."""
    assert server.proc is not None
    record, _, thread = start_load(server.port, total=1200, connections=16)
    wait_until(lambda: len(record.acked) >= 300, timeout=60)
    (first,) = wait_until(lambda: writer_pids(server.proc.pid), timeout=10)
    os.kill(first, signal.SIGKILL)
    thread.join(120)
    assert len(record.acked) == 1200
    assert_all_once(server, list(record.acked), record.sent)
    (second,) = writer_pids(server.proc.pid)
    assert second != first
    # found dead between batches, or by the batch it was writing
    assert re.search(r"inbox_writer_died|inbox writer process failed", server.log())
    assert server.get("/readyz").json()["inbox"] == "ok"


@pytest.mark.process
def test_inbox_writer_ends_with_its_server(make_server) -> None:
    """A writer never outlives its server, even one killed with -9 (its stdin closes)."""
    server = make_server()
    assert server.post_chat(body("first")).status_code == 200
    server.wait_files(1)
    assert server.proc is not None
    (pid,) = writer_pids(server.proc.pid)
    server.kill()
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    server.start()
    assert server.post_chat(body("second")).status_code == 200
    server.wait_files(2)
    assert sorted(delivered(server)) == ["prompt first", "prompt second"]


# -- kill -9 at several moments ---------------------------------------------------------------


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["early", "mid-load", "mid-flush"])
def test_kill_9_at_several_moments(make_server, moment: str) -> None:
    server = make_server(start=False)
    if moment == "mid-flush":  # build a backlog the flusher is busy with when killed
        server.inbox.parent.mkdir(parents=True, exist_ok=True)
        server.inbox.write_text("blocked")
    server.start()
    record, stop, thread = start_load(server.port, total=2000, connections=32)
    if moment == "early":
        wait_until(lambda: len(record.acked) >= 100, timeout=30)
    elif moment == "mid-load":
        wait_until(lambda: len(record.acked) >= 800, timeout=60)
    else:
        wait_until(lambda: len(record.acked) >= 1000, timeout=60)
        server.inbox.unlink()  # the flusher starts on 1,000 rows ...
        wait_until(lambda: len(server.inbox_names()) >= 150, timeout=30, step=0.002)
    server.kill()  # ... and dies partway
    stop.set()
    thread.join(30)
    acked = list(record.acked)
    assert len(acked) >= 100
    server.start()
    # Rows committed but never answered (the kill came first) are delivered too.
    rows = server.rows("SELECT count(*) AS n FROM requests")[0]["n"]
    assert wait_until(lambda: sum(delivered(server).values()) >= rows), rows
    assert_all_once(server, acked, record.sent)
    assert len(delivered(server)) == rows


def test_no_path_is_built_from_request_data(make_server, tmp_path: Path) -> None:
    server = make_server(key=KEY)
    before = set(os.listdir(server.workdir))
    hostile = {
        "channel": "../../../../tmp/evil", "user_id": "/etc/passwd", "model": "../x",
        "messages": [{"role": "user", "content": "../../escape\x00.json"}],
    }  # fmt: skip
    assert server.post_chat(hostile).status_code == 200
    (name,) = server.wait_files(1)
    assert name.endswith(".json") and "/" not in name and ".." not in name
    assert set(os.listdir(server.workdir)) - before <= {"inbox"}
    assert not Path("/tmp/evil").exists()
    payload = server.inbox_payloads()[0]
    assert payload["context_id"] == "../../../../tmp/evil:/etc/passwd"  # data, not a path
    assert (server.inbox / name).stat().st_mode & 0o777 == 0o600
    assert server.inbox.stat().st_mode & 0o777 == 0o700
    # the key is nowhere on disk or in the logs
    assert KEY not in server.log()
    assert KEY.encode() not in server.db.read_bytes()
    assert all(KEY not in (server.inbox / n).read_text() for n in server.inbox_names())


def test_default_bind_is_loopback(tmp_path: Path) -> None:
    from ai_agent_proxy.config import load_settings

    s = load_settings(None, {}, {})
    assert s.host == "127.0.0.1" and s.is_loopback


# -- retention ----------------------------------------------------------------------------------


def test_retention_prunes_delivered_rows_only(make_server) -> None:
    # 0.00002 days = 1.7 s
    server = make_server("--retention-days", "0.00002", start=False)
    server.inbox.parent.mkdir(parents=True, exist_ok=True)
    server.start()
    for i in range(5):
        assert server.post_chat(body(i, channel=f"c{i}")).status_code == 200
    server.wait_files(5)
    server.inbox.rename(server.inbox.with_name("moved"))
    server.inbox.write_text("blocked")  # the next rows cannot be delivered
    for i in range(5, 8):
        assert server.post_chat(body(i, channel=f"c{i}")).status_code == 200
    assert wait_until(lambda: len(server.rows()) == 3, timeout=15), server.rows()
    assert {r["state"] for r in server.rows()} == {"pending"}  # undelivered rows stay

    # One pass, or two when the five rows came of age either side of a pass; a pass says
    # so after its commit, so the line may follow the rows' going by a moment.
    def pruned() -> list[str]:
        return re.findall(r"retention_pruned rows=(\d+)", server.log())

    wait_until(lambda: sum(map(int, pruned())) == 5, timeout=15, message=lambda: str(pruned()))
    server.inbox.unlink()
    server.wait_files(3)
    # segments of pruned rows are reclaimed at the next start
    segments_before = server.rows("SELECT count(*) AS n FROM segments")[0]["n"]
    assert wait_until(lambda: not server.rows(), timeout=15)
    server.restart()
    assert server.rows("SELECT count(*) AS n FROM segments")[0]["n"] < segments_before
    assert "unused_segments_removed=" in server.log()


def test_metrics_is_prometheus_text(server: Server) -> None:
    server.post_chat(body(1))
    server.wait_files(1)
    r = server.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"aiap_http_requests", "aiap_rows", "aiap_backlog_rows",
            "aiap_request_to_file_seconds", "aiap_inbox_write_failures"} <= names  # fmt: skip
    assert metric(server, 'aiap_rows{state="written"}') == 1
    assert HTTP.get(server.base_url + "/readyz").json()["status"] == "ready"


# -- health tells the truth ----------------------------------------------------------------


def writer_pids_of(pid: int) -> list[int]:
    """The inbox writers started by any thread of process `pid` (an embedded server starts
    its writer from its own thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"ai_agent_proxy.inbox_writer" in cmdline:
                found.append(int(child))
    return found


def test_a_db_deleted_or_replaced_under_the_server_is_never_acknowledged_into(
    make_server, tmp_path: Path
) -> None:
    server = make_server()
    assert server.post_chat(body("before")).status_code == 200
    server.wait_files(1)
    moved = tmp_path / "moved-away.db"
    server.db.rename(moved)  # as `rm` does to the path
    ready = server.get("/readyz")
    assert ready.status_code == 503
    assert f"the database file {server.db} was deleted while the server ran" in ready.json()["db"]
    refused = server.post_chat(body("into the deleted file"))
    assert refused.status_code == 503
    assert "restart the server" in refused.json()["error"]["message"]
    server.db.write_bytes(b"")  # another file at the path
    assert "was replaced by another file" in server.get("/readyz").json()["db"]
    assert server.post_chat(body("into the other file")).status_code == 503
    moved.replace(server.db)  # the file it opened is back: it takes requests again
    assert server.post_chat(body("after")).status_code == 200
    assert server.get("/readyz").status_code == 200
    server.wait_files(2)
    assert delivered(server) == Counter(["prompt before", "prompt after"])


def test_a_stopped_writer_makes_the_server_not_ready_and_says_why(
    make_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_agent_proxy import flusher

    monkeypatch.setattr(flusher, "WRITER_STALL_S", 0.3)
    server = make_server()
    assert server.post_chat(body(0)).status_code == 200
    server.wait_files(1)
    (pid,) = writer_pids_of(os.getpid())
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in (1, 2, 3):
            assert server.post_chat(body(i)).status_code == 200  # still accepted
        ready = wait_until(lambda: (r := server.get("/readyz")).status_code == 503 and r)
        said = ready.json()["inbox"]
        assert (
            "the inbox writer process has held a batch of" in said and "without answering" in said
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    server.wait_files(4)
    wait_until(lambda: server.get("/readyz").status_code == 200)


def test_a_stop_gives_up_on_a_writer_that_does_not_answer(
    make_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer is stopped holding a batch: the server's stop kills it after its wait
    instead of waiting for ever; the row stays pending and is written at the next start."""
    from ai_agent_proxy import flusher

    monkeypatch.setattr(flusher, "STOP_WAIT_S", 0.5)
    server = make_server()
    assert server.post_chat(body(0)).status_code == 200
    server.wait_files(1)
    (pid,) = writer_pids_of(os.getpid())
    os.kill(pid, signal.SIGSTOP)
    assert server.post_chat(body(1)).status_code == 200
    wait_until(lambda: "T" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3])
    server.stop()
    assert "inbox_writer_unresponsive" in server.log()
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid))
    server.start()
    server.wait_files(2)
    assert delivered(server) == Counter(["prompt 0", "prompt 1"])


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.process
@pytest.mark.parametrize("end", ["SIGTERM", "SIGKILL"])
def test_a_stopped_writer_never_outlives_its_server(make_server, end: str) -> None:
    server = make_server()
    assert server.post_chat(body(0)).status_code == 200
    server.wait_files(1)
    assert server.proc is not None
    (pid,) = writer_pids(server.proc.pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        if end == "SIGTERM":
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 6  # its own wait, not a writer's for ever
        else:
            server.kill()  # the kernel ends it: PR_SET_PDEATHSIG
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=5)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
