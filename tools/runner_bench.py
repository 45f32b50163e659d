"""Benchmark the agent runner (`ai-agent-proxy agent`): how soon a message reaches the
agent, and what the runner itself costs while it waits.

    python tools/runner_bench.py               # ~1 min
    python tools/runner_bench.py --messages 100

It starts a real server and a real runner (processes, a fresh DB and inbox in a temp dir)
whose agent is a two-line shell script (it records when it started and prints its answer,
which the runner sends with --send-output through a shell-script `openclaw`), so that
what is measured is the runner, not an agent CLI's own start-up (claude: ~1 s; codex:
~0.2 s). It prints:

- message -> agent start: from the server's 200 for a message (it is committed) to the
  agent process's first instruction, with `--debounce 0`, one chat answered message after
  message, split at the inbox file's write (the row's written_ms);
- the runner's CPU (user + system, from /proc) while nothing waits; with 100 conversations
  waiting that it may not run yet (their quiet window, --debounce 1h, is not over); and
  the same while a message a second arrives in another chat (each commit makes it list
  the waiting conversations again);
- the listing itself (conversations.waiting_conversations) on DBs of 100, 1,000 and 10,000
  waiting chats.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench import Target, free_port  # noqa: E402

from tests import openclaw as oc  # noqa: E402

console = Console(stderr=True)
TICKS = os.sysconf("SC_CLK_TCK")
AGENT = """#!/bin/sh
echo "$(date +%s.%N) $AIAP_CONTEXT_ID $AIAP_NEWEST_REQUEST_ID" >> "$BENCH_STARTS"
echo "Answered."
"""
OPENCLAW = """#!/bin/sh
echo "Sent via Telegram. Message ID: 1"
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def body(chat: str, n: int) -> bytes:
    turn = oc.typed(oc.load(oc.TURN2), f"message {n} of the bench")
    return json.dumps(oc.with_info(turn, chat_id=chat, message_id=str(n))).encode()


def starts(path: Path) -> list[tuple[float, str, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):  # (the last one may be being written)
            at, chat, request = line.rstrip("\n").split(" ")
            out.append((float(at), chat, request))
    return out


class Runner:
    def __init__(self, work: Path, server: Target, *args: str) -> None:
        env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}",
               "BENCH_STARTS": str(work / "starts.txt")}  # fmt: skip
        cmd = [
            sys.executable,
            "-m",
            "ai_agent_proxy",
            "agent",
            "--db",
            str(work / "outbox.db"),
            "--inbox",
            str(work / "inbox"),
            *args,
            "--",
            "sh",
            str(work / "bin" / "agent"),
        ]
        self.log = open(work / "runner.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log, cwd=work)
        deadline = time.monotonic() + 10
        while "agent_runner_started" not in (work / "runner.log").read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit("the runner did not start:\n" + (work / "runner.log").read_text())
            time.sleep(0.02)

    def cpu_over(self, seconds: float, during: object = None) -> float:
        """Percent of a core the runner used over `seconds` (calling `during(t)` meanwhile)."""
        before, t0 = cpu_s(self.proc.pid), time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            if callable(during):
                during(elapsed)
            time.sleep(0.05)
        return (cpu_s(self.proc.pid) - before) / (time.monotonic() - t0) * 100

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def latency(work: Path, server: Target, messages: int) -> tuple[list[float], list[float]]:
    """(ack -> agent start, written -> agent start) in ms, one message at a time."""
    with sqlite3.connect(work / "outbox.db") as db:  # the warm-up request (not a chat's)
        (warm_up,) = db.execute("SELECT id FROM requests").fetchone()
    subprocess.run([sys.executable, "-m", "ai_agent_proxy", "done", warm_up, "--db",
                    str(work / "outbox.db"), "--inbox", str(work / "inbox")], check=True,
                   capture_output=True)  # fmt: skip
    runner = Runner(work, server, "--debounce", "0", "--send-output")
    to_start, from_written = [], []
    before = 0
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for n in range(messages + 3):  # (the first 3: warm-up)
                r = client.post("/v1/chat/completions", content=body("555000111", 9000 + n))
                acked = time.time()
                assert r.status_code == 200, r.text
                deadline = time.monotonic() + 10
                while len(starts(work / "starts.txt")) <= before + n:
                    if time.monotonic() > deadline:
                        sys.exit("no agent start:\n" + (work / "runner.log").read_text()[-3000:])
                    time.sleep(0.002)
                started, _, request = starts(work / "starts.txt")[before + n]
                with sqlite3.connect(work / "outbox.db") as db:
                    (written,) = db.execute(
                        "SELECT written_ms FROM requests WHERE id = ?", (request,)
                    ).fetchone()
                if n >= 3:
                    to_start.append((started - acked) * 1000)
                    from_written.append(started * 1000 - written)
                wait_answered(work)  # so that the next message is a run of its own
    finally:
        runner.stop()
    return to_start, from_written


def wait_answered(work: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with sqlite3.connect(work / "outbox.db") as db:
            (left,) = db.execute(
                "SELECT count(*) FROM requests WHERE state != 'written' OR answered_ms IS NULL"
            ).fetchone()
        if not left:
            return
        time.sleep(0.005)
    sys.exit("not answered:\n" + (work / "runner.log").read_text()[-3000:])


def idle_cpu(work: Path, server: Target, seconds: float) -> dict[str, float]:
    out = {}
    runner = Runner(work, server, "--debounce", "0", "--send-output")
    try:
        time.sleep(1)
        out["nothing waits"] = runner.cpu_over(seconds)
    finally:
        runner.stop()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n in range(100):
            assert client.post("/v1/chat/completions", content=body(f"77{n:04d}", n)).is_success
        deadline = time.monotonic() + 20
        while True:
            with sqlite3.connect(work / "outbox.db") as db:
                (left,) = db.execute(
                    "SELECT count(*) FROM requests WHERE state != 'written'"
                ).fetchone()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        runner = Runner(work, server, "--debounce", "1h")
        try:
            time.sleep(1)
            out["100 conversations waiting"] = runner.cpu_over(seconds)
            sent = [0]

            def trickle(elapsed: float) -> None:
                if sent[0] < elapsed:  # one a second, to another chat
                    client.post("/v1/chat/completions", content=body("880000", 20000 + sent[0]))
                    sent[0] += 1

            out["100 waiting, 1 new message/s"] = runner.cpu_over(seconds, trickle)
        finally:
            runner.stop()
    return out


def listing(work: Path) -> dict[int, float]:
    """waiting_conversations on DBs of N waiting chats (10 messages each), ms (median)."""
    from ai_agent_proxy import db as dbm
    from ai_agent_proxy.agent import conversations
    from ai_agent_proxy.migrations import migrate

    out = {}
    for chats in (100, 1000, 10_000):
        path = work / f"list-{chats}.db"
        migrate(path)
        with sqlite3.connect(path) as conn:
            now = int(time.time() * 1000)
            conn.executemany(
                "INSERT INTO requests (id, received_ms, body_segments, body_hash, context_id,"
                " payload_kind, state, written_ms)"
                " VALUES (?, ?, x'', ?, ?, 'compact', 'written', ?)",
                [(f"{i:032x}", now + i, f"h{i}".encode(), f"telegram:{i % chats}", now + i)
                 for i in range(chats * 10)],
            )  # fmt: skip
        conn = dbm.connect(path, rows_by_name=True)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            found = conversations.waiting_conversations(conn)
            times.append((time.perf_counter() - t0) * 1000)
        assert len(found) == chats
        out[chats] = statistics.median(times)
        conn.close()
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="per CPU figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aiap-runner-bench-") as tmp:
        work = Path(tmp)
        (work / "bin").mkdir()
        for name, text in (("agent", AGENT), ("openclaw", OPENCLAW)):
            (work / "bin" / name).write_text(text)
            (work / "bin" / name).chmod(0o755)
        port = free_port()
        server = Target("proxy", [sys.executable, "-m", "ai_agent_proxy", "--port", str(port),
                                  "--db", str(work / "outbox.db"), "--inbox", str(work / "inbox"),
                                  "--reply", "on it"], port, work)  # fmt: skip
        server.start()
        try:
            to_start, from_written = latency(work, server, args.messages)
            cpu = idle_cpu(work, server, args.seconds)
        finally:
            server.stop()
        listed = listing(work)
    table = Table(title=f"message -> agent start, --debounce 0 ({len(to_start)} messages)")
    for column in ("", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    for name, values in (("acknowledged -> agent start", to_start),
                         ("inbox file written -> agent start", from_written)):  # fmt: skip
        table.add_row(name, *(f"{pct(values, p):.0f}" for p in (0.5, 0.9, 0.99, 1.0)))
    console.print(table)
    table = Table(title=f"the runner's own CPU (% of one core, over {args.seconds:g} s)")
    table.add_column("while")
    table.add_column("CPU %", justify="right")
    for name, value in cpu.items():
        table.add_row(name, f"{value:.2f}")
    console.print(table)
    table = Table(title="listing the waiting conversations (10 messages each)")
    table.add_column("waiting chats", justify="right")
    table.add_column("ms (median of 7)", justify="right")
    for chats, ms in listed.items():
        table.add_row(f"{chats:,}", f"{ms:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
