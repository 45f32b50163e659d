"""Benchmark ai-agent-proxy against a bare Sanic handler on real OpenClaw bodies, and say
where the CPU goes.

    python tools/bench.py                 # ~2 min: throughput and CPU, 1 and 2 workers,
                                          # latency at fixed rates, DB bytes per request
    python tools/bench.py --duration 5    # quicker
    python tools/bench.py --driver httpx  # without wrk (apt-get install wrk)
    python tools/bench.py --fill 1000000  # also: a DB of 1M rows, history's timings on it
                                          # and req/s on it beside an empty DB

Each run starts the bare handler (tools/bare_sanic.py) and ai-agent-proxy (fresh inbox and
DB in a temp dir), drives them in turn, in alternating rounds (a VM's speed drifts within
minutes; alternating spreads the drift over both), with the same bodies over loopback, and
prints the ratios to bare Sanic: req/s, latency, request->file latency (the row's
written_ms against its received_ms), and CPU milliseconds per request of each process and
thread (from /proc: the event loop, the SQLite writer thread, other threads, the inbox
writer process, a multi-worker server's manager; and the load generator's own). Bodies:
tests/fixtures/openclaw-2026.9-telegram-dm-turn2.json (or --bodies mix: four fixtures), made
unique per request (message_id and the person's text carry a counter, so nothing is
dropped as a repeat), and a synthetic 100-turn OpenClaw conversation for the
DB-bytes-per-request figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MARK = "__N__"
console = Console(stderr=True)


# -- bodies ---------------------------------------------------------------------------------


def unique_template(body: dict[str, Any]) -> str:
    """The body as JSON text with MARK where a counter makes each request distinct."""
    body = json.loads(json.dumps(body))
    for msg in body["messages"]:
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = re.sub(
                        r'(\\"message_id\\":\\")(\d+)', rf"\g<1>{MARK}", part["text"]
                    )
    # the person's latest text
    for msg in reversed(body["messages"]):
        if msg["role"] == "user" and isinstance(msg["content"], str):
            msg["content"] = msg["content"].replace("\n\nRuntime:", f" #{MARK}\n\nRuntime:", 1)
            if MARK not in msg["content"]:
                msg["content"] += f" #{MARK}"
            break
    return json.dumps(body, ensure_ascii=False)


# The four text-only fixtures every earlier run used, so figures stay comparable (the media
# and steer fixtures added later are as large, but change the mix).
BENCH_FIXTURES = (
    "openclaw-2026.9-cli-local.json",
    "openclaw-2026.9-telegram-dm-turn1.json",
    "openclaw-2026.9-telegram-dm-turn2.json",
    "openclaw-2026.9-telegram-group.json",
)


BODIES = {"turn2": ("openclaw-2026.9-telegram-dm-turn2.json",), "mix": BENCH_FIXTURES}


def fixture_templates(which: str = "turn2") -> list[str]:
    return [unique_template(json.loads((FIXTURES / n).read_text())) for n in BODIES[which]]


def conversation(turns: int, chat: str = "555000111") -> list[bytes]:
    """A `turns`-long OpenClaw conversation: each request replays the history so far."""
    base = json.loads((FIXTURES / "openclaw-2026.9-telegram-dm-turn2.json").read_text())
    system, first_user = base["messages"][0], base["messages"][1]
    internal = base["messages"][-1]["content"][0]["text"]
    bodies, history = [], [first_user]
    for turn in range(1, turns + 1):
        text = internal.replace("123456789", chat).replace(
            '\\"message_id\\":\\"12\\"', f'\\"message_id\\":\\"{1000 + turn}\\"'
        )
        person = {
            "role": "user",
            "content": f"[Tue 2026-11-24 21:21 UTC] Conversation info: ⟦openclaw:ctx⟧\n```json\n"
            f'{{"sender":{{"id":"{chat}","name":"Bench"}}}}\n```\n\nturn {turn}: please look '
            "into the build failure and tell me what broke",
        }
        context = {"role": "user", "content": [{"type": "text", "text": text}]}
        body = {**base, "messages": [system, *history, person, context]}
        bodies.append(json.dumps(body, ensure_ascii=False).encode())
        history += [person, {"role": "assistant", "content": f"On it (turn {turn})."}]
    return bodies


# -- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    cmd: list[str]
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0
    workers: int = 1

    def start(self) -> None:
        t0 = time.perf_counter()
        log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        body = b'{"messages":[{"role":"user","content":"warm-up"}]}'
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited: {(self.workdir / f'{self.name}.log').read_text()}")
            try:
                r = httpx.post(f"{self.url}/v1/chat/completions", content=body, timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        self.startup_s = time.perf_counter() - t0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        assert self.proc
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# -- load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # by part of the server (cpu_parts)
    driver_cpu_s: float = 0.0  # the load generator's own

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_ms(self, part: str | None = None) -> float | None:
        """CPU milliseconds per request: of one part, or of the whole server."""
        if not self.requests:
            return None
        spent = sum(self.cpu_s.values()) if part is None else self.cpu_s.get(part, 0.0)
        return spent * 1000 / self.requests


WRK_SCRIPT = """
local paths = {%s}
local templates = {}
for i, p in ipairs(paths) do
  local f = assert(io.open(p, "rb")); templates[i] = f:read("*a"); f:close()
end
local counter = 0
local threads = 0
-- setup runs in the main Lua state; thread:set makes `tid` a global of each thread's own
-- state, so each thread counts in its own range and no two requests are alike.
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
request = function()
  counter = counter + 1
  local n = tostring(tid * 100000000 + counter)
  local body = string.gsub(templates[(counter %% #templates) + 1], "%s", n)
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%.3f %%.3f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def run_wrk(url: str, templates: list[Path], duration: int, connections: int) -> LoadResult:
    script = templates[0].parent / "bench.lua"
    paths = ", ".join(f'"{p}"' for p in templates)
    script.write_text(WRK_SCRIPT % (paths, MARK))
    before = children_cpu_s()
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s",
         str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    m = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", out)
    assert m, out
    return LoadResult(
        requests=int(m.group(1)), errors=int(m.group(2)), seconds=int(m.group(3)) / 1e6,
        p50_ms=float(m.group(4)), p99_ms=float(m.group(5)),
        driver_cpu_s=children_cpu_s() - before,
    )  # fmt: skip


async def run_httpx(
    url: str, templates: list[str], duration: float, connections: int
) -> LoadResult:
    """Closed loop over `connections` clients (when wrk is not installed)."""
    result = LoadResult()
    counter = 0
    cpu_before = self_cpu_s()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

        async def one() -> None:
            nonlocal counter
            counter += 1
            body = templates[counter % len(templates)].replace(MARK, str(counter)).encode()
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"},
                )  # fmt: skip
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)
            result.requests += 1
            result.errors += not ok

        start = time.perf_counter()
        end = start + duration

        async def worker() -> None:
            while time.perf_counter() < end:
                await one()

        await asyncio.gather(*(worker() for _ in range(connections)))
        result.seconds = time.perf_counter() - start
    result.p50_ms, result.p99_ms = p50_p99(result.latencies_ms)
    result.driver_cpu_s = self_cpu_s() - cpu_before
    return result


async def run_paced(
    url: str, templates: list[str], duration: float, rate: float, connections: int = 64
) -> LoadResult:
    """Open loop: request i is due at start + i/rate and its latency counts from then, so
    a slow server cannot hide queueing (no coordinated omission). Raw keep-alive sockets,
    light enough for one Python process to send 1,000+ 60 KB requests a second."""
    host, port = url.removeprefix("http://").split(":")
    result = LoadResult()
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while (ticket := await queue.get()) is not None:
            n, due = ticket
            body = templates[n % len(templates)].replace(MARK, f"9{n}").encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
                b"content-type: application/json\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body
            )  # fmt: skip
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            result.latencies_ms.append((time.perf_counter() - due) * 1000)
            result.requests += 1
            result.errors += not head.startswith(b"HTTP/1.1 200")
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    start = time.perf_counter()
    total = int(duration * rate)
    for n in range(total):
        due = start + n / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        queue.put_nowait((n, due))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    result.seconds = time.perf_counter() - start
    result.p50_ms, result.p99_ms = p50_p99(result.latencies_ms)
    return result


# -- CPU per process and thread -------------------------------------------------------------

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
WRITER_THREAD = "aiap-db-writer"  # outbox.engine.THREAD_NAME (a test keeps them one)
PARTS = ("loop", "db writer", "other threads", "inbox writer", "manager")


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (wrk, once it has)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_parts(root: int, workers: int) -> dict[str, float]:
    """CPU seconds so far (user + system) of every thread of a server's processes, by part:
    a server process's main thread (`loop`), its SQLite writer thread, its other threads;
    the inbox writer processes; the manager of a multi-worker server (Sanic's main process).
    """
    parts = dict.fromkeys(PARTS, 0.0)
    for pid in process_tree(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        role = "inbox writer" if b"inbox_writer" in cmdline else None
        if role is None and pid == root and workers > 1:
            role = "manager"
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            spent = (int(fields[11]) + int(fields[12])) * TICK_S
            if role is not None:
                part = role
            elif int(task.name) == pid:
                part = "loop"
            else:
                part = "db writer" if comm == WRITER_THREAD else "other threads"
            parts[part] += spent
    return parts


def measured(target: Target, run: Any) -> LoadResult:
    """`run()`'s result with the CPU each part of `target` spent meanwhile."""
    assert target.proc is not None
    before = cpu_parts(target.proc.pid, target.workers)
    result: LoadResult = run()
    after = cpu_parts(target.proc.pid, target.workers)
    result.cpu_s = {part: after[part] - before[part] for part in PARTS}
    return result


# -- measurements on the proxy's own files ---------------------------------------------------


def wait_drained(db: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            (left,) = conn.execute(
                "SELECT count(*) FROM requests WHERE state IN ('pending', 'awaiting_backend')"
            ).fetchone()
        if not left:
            return
        time.sleep(0.1)
    console.print(f"[red]backlog not drained after {timeout}s: {left} rows")


def file_latency(db: Path, since_ms: int) -> tuple[float | None, float | None]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        values = [
            r[0]
            for r in conn.execute(
                "SELECT written_ms - received_ms FROM requests"
                " WHERE state = 'written' AND received_ms >= ?",
                (since_ms,),
            )
        ]
    return p50_p99(values)


def p50_p99(values: list[float]) -> tuple[float | None, float | None]:
    ordered = sorted(values)
    if not ordered:
        return None, None
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def db_bytes(db: Path) -> int:
    """DB plus WAL, after a checkpoint so the WAL does not count twice."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))


def db_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]


# -- main -----------------------------------------------------------------------------------


def combine(rounds: list[LoadResult]) -> LoadResult:
    """One server's rounds as one result: all requests over all seconds."""
    out = LoadResult(
        requests=sum(r.requests for r in rounds),
        errors=sum(r.errors for r in rounds),
        seconds=sum(r.seconds for r in rounds),
        cpu_s={part: sum(r.cpu_s.get(part, 0.0) for r in rounds) for part in PARTS},
        driver_cpu_s=sum(r.driver_cpu_s for r in rounds),
    )
    p50s = [r.p50_ms for r in rounds if r.p50_ms is not None]
    p99s = [r.p99_ms for r in rounds if r.p99_ms is not None]
    out.p50_ms = statistics.median(p50s) if p50s else None
    out.p99_ms = max(p99s) if p99s else None
    return out


def proxy_target(
    name: str, work: Path, extra: list[str], workers: int = 1, db: Path | None = None
) -> tuple[Target, Path]:
    """ai-agent-proxy with its own inbox (and DB, unless given) under work/name; returns it
    and its DB."""
    (work / name).mkdir()
    db, port = db or work / name / "outbox.db", free_port()
    cmd = [
        sys.executable, "-m", "ai_agent_proxy", "--port", str(port), "--inbox",
        str(work / name / "inbox"), "--db", str(db), "--reply", "on it",
        "--worker", str(workers), *extra,
    ]  # fmt: skip
    return Target(name, cmd, port, work, workers=workers), db


def bare_target(name: str, work: Path, workers: int = 1) -> Target:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "tools" / "bare_sanic.py"), str(port), str(workers)]
    return Target(name, cmd, port, work, workers=workers)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=15, help="seconds of throughput per server")
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds the duration is cut in"
    )
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=float, default=1000, help="req/s for the file-latency run")
    ap.add_argument("--turns", type=int, default=100, help="turns of the synthetic conversation")
    ap.add_argument("--driver", choices=("auto", "wrk", "httpx"), default="auto")
    ap.add_argument("--bodies", choices=tuple(BODIES), default="turn2")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="WORKER values run")
    ap.add_argument("--fill", type=int, default=0, help="rows of a filled DB to time history on")
    ap.add_argument("--extra", nargs="*", default=[], help="extra flags for ai-agent-proxy")
    ap.add_argument(
        "--extraction-only", action="store_true",
        help="only time context extraction: the captured turn beside the worst hostile text",
    )  # fmt: skip
    ap.add_argument(
        "--dir",
        default=None,
        help="where the inbox and DB go (default: the temp dir; creating files is slower on "
        "a file system that has just deleted many: ext4 skips inodes freed in the last 30 s)",
    )
    args = ap.parse_args()
    if args.extraction_only:
        Console(width=None if sys.stdout.isatty() else 160).print(extraction_table())
        return
    driver = args.driver
    if driver == "auto":
        driver = "wrk" if shutil.which("wrk") else "httpx"

    work = Path(tempfile.mkdtemp(prefix="aiap-bench-", dir=args.dir))
    templates = fixture_templates(args.bodies)
    template_files = []
    for i, t in enumerate(templates):
        path = work / f"body{i}.json"
        path.write_text(t)
        template_files.append(path)
    size_kb = statistics.mean(len(t.encode()) for t in templates) / 1024
    console.print(
        f"bodies: {', '.join(BODIES[args.bodies])} ({size_kb:.0f} KB on average), each made "
        f"unique; driver {driver}; {args.connections} connections; {args.duration} s per "
        f"server in {args.rounds} rounds; {os.cpu_count()} cores; work dir {work}"
    )

    def throughput(target: Target, seconds: int) -> LoadResult:
        if driver == "wrk":
            run = lambda: run_wrk(target.url, template_files, seconds, args.connections)  # noqa: E731
        else:
            run = lambda: asyncio.run(run_httpx(target.url, templates, seconds, args.connections))  # noqa: E731
        return measured(target, run)

    rows: dict[str, dict[str, str]] = {}
    cpu_rows: dict[str, LoadResult] = {}
    ratios: list[str] = []
    for workers in args.workers:
        suffix = "" if workers == 1 else f", {workers} workers"
        bare = bare_target(f"bare{workers}", work, workers)
        bare.start()
        proxy, db = proxy_target(f"proxy{workers}", work, args.extra, workers)
        proxy.start()
        t0_ms = int(time.time() * 1000)
        base, ours, round_ratios = alternate(bare, proxy, db, throughput, args)
        ratios.append(f"{workers} worker(s): " + ", ".join(f"{r:.2f}x" for r in round_ratios))
        rows[f"bare Sanic{suffix}"] = load_row(base, None, bare)
        cpu_rows[f"bare Sanic{suffix}"] = base
        bare.stop()
        rows[f"ai-agent-proxy{suffix}"] = load_row(ours, base, proxy, file_latency(db, t0_ms))
        cpu_rows[f"ai-agent-proxy{suffix}"] = ours
        if workers == 1:  # request->file latency at fixed rates (open loop)
            for rate in (100.0, args.rate):
                t0_ms = int(time.time() * 1000)
                paced = asyncio.run(run_paced(proxy.url, templates, min(args.duration, 10), rate))
                wait_drained(db)
                rows[f"proxy at {rate:.0f} req/s"] = load_row(
                    paced, None, proxy, file_latency(db, t0_ms)
                )
        proxy.stop()

    conv_kb, body_kb = conversation_bytes(work, args)
    out = Console(width=None if sys.stdout.isatty() else 160)  # piped: do not cut figures
    out.print(load_table(rows))
    out.print("ratio per round: " + "; ".join(ratios))
    out.print(cpu_table(cpu_rows))
    out.print(
        f"DB bytes per request over a {args.turns}-turn conversation: {conv_kb:.1f} KB"
        f" (mean body {body_kb:.1f} KB)"
    )
    out.print(extraction_table())
    if args.fill:
        filled(work, args, templates, throughput, out)
    shutil.rmtree(work, ignore_errors=True)
    console.print(
        f"removed {work} with its inbox files: on ext4 without a journal, creating files is "
        "slower for a while after such a delete; wait a minute before the next run"
    )


def extraction_table() -> Table:
    """Context extraction (context.extract_context, on the event loop for bodies under
    1 MiB, in the large-body thread from there), microseconds per request: the captured
    turn beside the worst of the hostile shapes (tests/openclaw.py) in each place a
    stranger's text can be, at 64 KiB and 1 MiB, and the three worst again at 16 MiB."""
    sys.path.insert(0, str(ROOT))
    from ai_agent_proxy.context import MediaStore, extract_context
    from tests import openclaw as oc

    media = MediaStore("/home/alice/.openclaw")

    def us(body: Any) -> float:  # the best of 3 runs of calls, each run at least 20 ms
        best = float("inf")
        for _ in range(3):
            calls, start = 0, time.perf_counter()
            while (took := time.perf_counter() - start) < 0.02 or not calls:
                extract_context(body, media)
                calls += 1
            best = min(best, took / calls)
        return best * 1e6

    table = Table(title="context extraction, µs per request")
    for column in ("body", "size", "µs", "µs per KiB"):
        table.add_column(column, justify="right" if column != "body" else "left")
    normal = oc.load(oc.TURN2)
    size = len(json.dumps(normal))
    table.add_row("captured turn (dm-turn2)", f"{size / 1024:.0f} KiB", fmt(us(normal), 0),
                  fmt(us(normal) / (size / 1024), 2))  # fmt: skip
    worst_at_1m: list[tuple[float, str, str]] = []
    for label, length in (("64 KiB", 1 << 16), ("1 MiB", 1 << 20)):
        found = []
        for name, shape in oc.PATHOLOGICAL.items():
            for where, body in oc.hostile_placements(oc.filled_with(shape, length)).items():
                found.append((us(body), name, where))
        found.sort(reverse=True)
        if length == 1 << 20:
            worst_at_1m = found[:3]
        took, name, where = found[0]
        table.add_row(f"worst: {name} in the {where}", label, fmt(took, 0),
                      fmt(took / (length / 1024), 2))  # fmt: skip
    for _, name, where in worst_at_1m:
        length = 16 << 20
        body = oc.hostile_placements(oc.filled_with(oc.PATHOLOGICAL[name], length))[where]
        took = us(body)
        table.add_row(f"{name} in the {where}", "16 MiB", fmt(took, 0),
                      fmt(took / (length / 1024), 2))  # fmt: skip
    return table


def alternate(
    bare: Target, proxy: Target, db: Path, throughput: Any, args: argparse.Namespace
) -> tuple[LoadResult, LoadResult, list[float]]:
    """Both servers at saturation in alternating rounds; each one's rounds combined."""
    round_s = max(1, args.duration // args.rounds)
    base_rounds, our_rounds = [], []
    for _ in range(args.rounds):
        base_rounds.append(throughput(bare, round_s))
        our_rounds.append(throughput(proxy, round_s))
        wait_drained(db)  # its last files are written before bare Sanic's next round
    ratios = [o.rps / b.rps for b, o in zip(base_rounds, our_rounds, strict=True) if b.rps]
    return combine(base_rounds), combine(our_rounds), ratios


def load_row(
    result: LoadResult,
    base: LoadResult | None,
    target: Target,
    file_p50_p99: tuple[float | None, float | None] = (None, None),
) -> dict[str, str]:
    return {
        "req/s": fmt(result.rps, 0),
        "ratio": f"{result.rps / base.rps:.2f}x" if base and base.rps else "",
        "p50 ms": fmt(result.p50_ms), "p99 ms": fmt(result.p99_ms),
        "file p50 ms": fmt(file_p50_p99[0]), "file p99 ms": fmt(file_p50_p99[1]),
        "errors": str(result.errors), "RSS MB": fmt(target.rss_mb()),
        "start s": fmt(target.startup_s, 2),
    }  # fmt: skip


def load_table(rows: dict[str, dict[str, str]]) -> Table:
    table = Table(title="ai-agent-proxy vs bare Sanic (loopback, same bodies, same run)")
    cols = ["req/s", "ratio", "p50 ms", "p99 ms", "file p50 ms", "file p99 ms", "errors",
            "RSS MB", "start s"]  # fmt: skip
    table.add_column("server")
    for c in cols:
        table.add_column(c, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(row.get(c, "") for c in cols))
    return table


def cpu_table(results: dict[str, LoadResult]) -> Table:
    """CPU ms per request at saturation, by part, and the total's ratio to bare Sanic's
    (the bare row above each proxy row)."""
    table = Table(title="CPU milliseconds per request at saturation (from /proc)")
    table.add_column("server")
    for c in (*PARTS, "server total", "ratio", "load generator"):
        table.add_column(c, justify="right")
    base = None
    for name, r in results.items():
        total = r.cpu_ms()
        if name.startswith("bare"):
            base = total
        ratio = f"{total / base:.2f}x" if base and total and not name.startswith("bare") else ""
        driver = r.driver_cpu_s * 1000 / r.requests if r.requests else None
        table.add_row(
            name, *(fmt(r.cpu_ms(p), 3) for p in PARTS), fmt(total, 3), ratio, fmt(driver, 3)
        )
    return table


def conversation_bytes(work: Path, args: argparse.Namespace) -> tuple[float, float]:
    """DB KB per request over a long conversation (a fresh DB), and the mean body's KB."""
    conv, db = proxy_target("conv", work, args.extra)
    conv.start()
    before = db_bytes(db)
    bodies = conversation(args.turns)
    with httpx.Client(base_url=conv.url, timeout=10) as c:
        for b in bodies:
            c.post("/v1/chat/completions", content=b, headers={"content-type": "application/json"})
    wait_drained(db)
    conv.stop()
    per_request = (db_bytes(db) - before) / len(bodies)
    return per_request / 1024, statistics.mean(len(b) for b in bodies) / 1024


# -- a DB of many rows ------------------------------------------------------------------------


def filled(
    work: Path, args: argparse.Namespace, templates: list[str], throughput: Any, out: Console
) -> None:
    """Fill a DB with args.fill rows (through the outbox itself, not HTTP: the same parser,
    context extraction and INSERT, delivered as the flusher would mark them), then time
    the history commands a person runs on it and the proxy's req/s on it."""
    (work / "filled").mkdir()
    db = work / "filled" / "outbox.db"
    t0 = time.perf_counter()
    asyncio.run(fill_db(db, args.fill, templates))
    took = time.perf_counter() - t0
    size_mb = db_bytes(db) / 1024**2
    out.print(f"filled {db_rows(db):,} rows in {took:.0f} s: {size_mb:,.0f} MB")
    table = Table(title=f"history on {args.fill:,} rows (the CLI, as a person runs it)")
    table.add_column("command")
    table.add_column("seconds", justify="right")
    for words in (["--limit", "50"], ["--search", "bench-needle-7"], ["stats"]):
        argv = [sys.executable, "-m", "ai_agent_proxy", "history", *words, "--db", str(db)]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        took = time.perf_counter() - t0
        table.add_row("history " + " ".join(words), f"{took:.2f}" + ("" if done.returncode == 0
                      else f" (exit {done.returncode}: {done.stderr.strip()[:60]})"))  # fmt: skip
    out.print(table)
    out.print(agent_loop_table(db, args.fill, work))
    rps = {}
    for name, on in (("empty", None), ("filled", db)):  # a fresh server each, one round each
        proxy, _ = proxy_target(f"proxy-{name}", work, args.extra, db=on)
        proxy.start()
        rps[name] = throughput(proxy, max(1, args.duration // args.rounds)).rps
        proxy.stop()
    out.print(
        f"req/s on the {args.fill:,}-row DB: {rps['filled']:,.0f}, on an empty one just before:"
        f" {rps['empty']:,.0f} ({rps['filled'] / rps['empty']:.2f}x; one round each)"
    )


def agent_loop_table(db: Path, rows: int, work: Path) -> Table:
    """The agent's loop on the filled DB, as the MCP server and the runner call it (the
    library, in this process: a CLI adds its interpreter's start-up, ~0.3 s): next (look),
    next --as (take), new_messages, and what `reply` adds to the send itself (the send is
    `true`, timed alone beside it). First with every row waiting in one chat (the fill),
    then with all but the newest 25 answered (a month of history)."""
    from ai_agent_proxy.agent import conversations, replies
    from ai_agent_proxy.config import load_settings
    from ai_agent_proxy.db import connect

    table = Table(title=f"the agent's loop on {rows:,} rows, ms (best of 5)")
    for column in ("step", "all waiting", "25 waiting"):
        table.add_column(column, justify="right" if column != "step" else "left")
    conn = connect(db, rows_by_name=True)

    def best(fn: Any) -> float:
        took = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            took.append((time.perf_counter() - t0) * 1000)
        return min(took)

    def look() -> Any:
        key = conversations.oldest_waiting(conn, None, conversations.now_ms())
        return conversations.conversation(conn, key or "")

    def take() -> Any:
        return conversations.conversation(conn, conversations.take(conn, "bench") or "")

    def steps() -> dict[str, float]:
        last = conn.execute(
            "SELECT id, seq, context_id FROM requests ORDER BY seq DESC LIMIT 1 OFFSET 3"
        ).fetchone()
        found = {
            "next (the oldest waiting conversation, shown)": best(look),
            "next --as (taken, shown)": best(take),
            "new_messages (after a message)": best(
                lambda: conversations.after(conn, last["context_id"], last["seq"], last["id"])
            ),
        }
        conversations.release(conn, "bench")
        return found

    waiting_all = steps()
    with sqlite3.connect(db) as raw:  # a month of answered history, the newest 25 waiting
        raw.execute(
            "UPDATE requests SET answered_ms = received_ms + 60000 WHERE state = 'written'"
            " AND seq <= (SELECT max(seq) - 25 FROM requests)"
        )
    waiting_few = steps()
    (newest,) = conn.execute("SELECT id FROM requests ORDER BY seq DESC LIMIT 1").fetchone()
    conn.execute("UPDATE requests SET channel = 'telegram', target = '1' WHERE id = ?", (newest,))
    true = shutil.which("true") or "/bin/true"
    settings = load_settings(
        None, {"db": str(db), "inbox": str(work / "filled-inbox"), "openclaw_bin": true}
    )
    beyond = []
    for attempt in range(5):
        t0 = time.perf_counter()
        replies.reply(conn, settings, newest, "bench", again=attempt > 0)
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([true], check=False)
        beyond.append((whole - (time.perf_counter() - t0)) * 1000)
    conn.close()
    for step, took in waiting_all.items():
        table.add_row(step, fmt(took, 1), fmt(waiting_few[step], 1))
    table.add_row("reply, beyond the send itself (covering 24 earlier)", "-", fmt(min(beyond), 1))
    return table


async def fill_db(db: Path, rows: int, templates: list[str]) -> None:
    from ai_agent_proxy.app import new_request
    from ai_agent_proxy.bodies import BodyParser
    from ai_agent_proxy.context import MediaStore, extract_context
    from ai_agent_proxy.ids import new_request_id
    from ai_agent_proxy.migrations import migrate
    from ai_agent_proxy.outbox.store import Outbox

    migrate(db)
    outbox = Outbox(db, dedup_window_s=60.0)
    await outbox.open()
    parser, media = BodyParser(), MediaStore("/nonexistent")
    start_ms = int(time.time() * 1000) - rows * 2600  # one every 2.6 s: a month for 1M
    batch = 2000
    for first in range(0, rows, batch):
        records = []
        for n in range(first, min(rows, first + batch)):
            word = f"bench-needle-{n}" if n % 100_000 == 7 else str(n)
            raw = templates[n % len(templates)].replace(MARK, word).encode()
            parsed = parser.read(raw)
            context = extract_context(parsed.value, media)
            row = new_request(new_request_id()[0], start_ms + n * 2600, parsed, raw, context, None)
            records.append(outbox.record(row))
        await asyncio.gather(*records)
        if first // batch % 50 == 0:
            console.print(f"  {first + batch:,} rows", end="\r")
    await outbox.close()
    with sqlite3.connect(db) as conn:  # delivered, as the flusher would have marked them
        conn.execute(
            "UPDATE requests SET state = 'written', written_ms = received_ms + 7,"
            " claimed_by = NULL, claimed_until_ms = NULL WHERE state = 'pending'"
        )


if __name__ == "__main__":
    main()
