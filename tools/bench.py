"""Benchmark ai-agent-proxy against a bare Sanic handler on real OpenClaw bodies.

    python tools/bench.py                 # ~90 s: throughput, latency at a fixed rate, DB size
    python tools/bench.py --duration 5    # quicker
    python tools/bench.py --driver httpx  # without wrk (apt-get install wrk)

Each run starts the bare handler (tools/bare_sanic.py) and ai-agent-proxy (fresh inbox and
DB in a temp dir), drives them in turn, in alternating rounds (a VM's speed drifts within
minutes; alternating spreads the drift over both), with the same bodies over loopback, and
prints one table with the ratio to bare Sanic. Bodies: the OpenClaw fixtures in
tests/fixtures, made unique per request (message_id and text carry a counter, so nothing is
dropped as a repeat), and a synthetic 100-turn OpenClaw conversation for the
DB-bytes-per-request figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
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


def fixture_templates() -> list[str]:
    return [unique_template(json.loads((FIXTURES / n).read_text())) for n in BENCH_FIXTURES]


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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


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
    )  # fmt: skip


async def run_httpx(
    url: str, templates: list[str], duration: float, connections: int
) -> LoadResult:
    """Closed loop over `connections` clients (when wrk is not installed)."""
    result = LoadResult()
    counter = 0
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
    )
    p50s = [r.p50_ms for r in rounds if r.p50_ms is not None]
    p99s = [r.p99_ms for r in rounds if r.p99_ms is not None]
    out.p50_ms = statistics.median(p50s) if p50s else None
    out.p99_ms = max(p99s) if p99s else None
    return out


def proxy_target(name: str, work: Path, extra: list[str]) -> tuple[Target, Path]:
    """ai-agent-proxy with its own inbox and DB under work/name; returns it and its DB."""
    (work / name).mkdir()
    db, port = work / name / "outbox.db", free_port()
    cmd = [
        sys.executable, "-m", "ai_agent_proxy", "--port", str(port), "--inbox",
        str(work / name / "inbox"), "--db", str(db), "--reply", "on it", *extra,
    ]  # fmt: skip
    return Target(name, cmd, port, work), db


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
    ap.add_argument("--extra", nargs="*", default=[], help="extra flags for ai-agent-proxy")
    ap.add_argument(
        "--dir",
        default=None,
        help="where the inbox and DB go (default: the temp dir; creating files is slower on "
        "a file system that has just deleted many: ext4 skips inodes freed in the last 30 s)",
    )
    args = ap.parse_args()
    driver = args.driver
    if driver == "auto":
        driver = "wrk" if shutil.which("wrk") else "httpx"

    work = Path(tempfile.mkdtemp(prefix="aiap-bench-", dir=args.dir))
    templates = fixture_templates()
    template_files = []
    for i, t in enumerate(templates):
        path = work / f"body{i}.json"
        path.write_text(t)
        template_files.append(path)
    size_kb = statistics.mean(len(t.encode()) for t in templates) / 1024
    console.print(
        f"bodies: {len(templates)} OpenClaw fixtures, {size_kb:.0f} KB on average; driver "
        f"{driver}; {args.connections} connections; {args.duration} s per server in {args.rounds} "
        f"rounds; work dir {work}"
    )

    def throughput(target: Target, seconds: int) -> LoadResult:
        if driver == "wrk":
            return run_wrk(target.url, template_files, seconds, args.connections)
        return asyncio.run(run_httpx(target.url, templates, seconds, args.connections))

    # 1. bare Sanic and ai-agent-proxy at saturation, in alternating rounds
    bare = Target("bare", [sys.executable, str(ROOT / "tools" / "bare_sanic.py"),
                           str(free_port())], 0, work)  # fmt: skip
    bare.port = int(bare.cmd[-1])
    bare.start()
    proxy, db = proxy_target("proxy", work, args.extra)
    proxy.start()
    t0_ms = int(time.time() * 1000)
    round_s = max(1, args.duration // args.rounds)
    base_rounds, our_rounds = [], []
    for _ in range(args.rounds):
        base_rounds.append(throughput(bare, round_s))
        our_rounds.append(throughput(proxy, round_s))
        wait_drained(db)  # its last files are written before bare Sanic's next round
    base, ours = combine(base_rounds), combine(our_rounds)
    ratios = [o.rps / b.rps for b, o in zip(base_rounds, our_rounds, strict=True) if b.rps]
    rows: dict[str, dict[str, str]] = {}
    rows["bare Sanic"] = {
        "req/s": fmt(base.rps, 0), "p50 ms": fmt(base.p50_ms), "p99 ms": fmt(base.p99_ms),
        "errors": str(base.errors), "RSS MB": fmt(bare.rss_mb()), "start s": fmt(bare.startup_s, 2),
    }  # fmt: skip
    bare.stop()
    f50, f99 = file_latency(db, t0_ms)
    rows["ai-agent-proxy"] = {
        "req/s": fmt(ours.rps, 0), "p50 ms": fmt(ours.p50_ms), "p99 ms": fmt(ours.p99_ms),
        "errors": str(ours.errors), "RSS MB": fmt(proxy.rss_mb()),
        "start s": fmt(proxy.startup_s, 2), "file p50 ms": fmt(f50), "file p99 ms": fmt(f99),
        "ratio": f"{ours.rps / base.rps:.2f}x" if base.rps else "-",
    }  # fmt: skip

    # 3. request->file latency at fixed rates (open loop): light traffic, then --rate
    for rate in (100.0, args.rate):
        t0_ms = int(time.time() * 1000)
        paced = asyncio.run(run_paced(proxy.url, templates, min(args.duration, 10), rate))
        wait_drained(db)
        f50, f99 = file_latency(db, t0_ms)
        rows[f"proxy at {rate:.0f} req/s"] = {
            "req/s": fmt(paced.rps, 0), "p50 ms": fmt(paced.p50_ms), "p99 ms": fmt(paced.p99_ms),
            "errors": str(paced.errors), "file p50 ms": fmt(f50), "file p99 ms": fmt(f99),
            "RSS MB": fmt(proxy.rss_mb()),
        }  # fmt: skip
    total_rows = db_rows(db)
    proxy.stop()

    # 4. DB bytes per request over a long conversation (fresh DB)
    conv, db2 = proxy_target("conv", work, args.extra)
    conv.start()
    before = db_bytes(db2)
    bodies = conversation(args.turns)
    with httpx.Client(base_url=conv.url, timeout=10) as c:
        for b in bodies:
            c.post("/v1/chat/completions", content=b, headers={"content-type": "application/json"})
    wait_drained(db2)
    conv.stop()
    per_request = (db_bytes(db2) - before) / len(bodies)
    mean_body = statistics.mean(len(b) for b in bodies)

    table = Table(title="ai-agent-proxy vs bare Sanic (loopback, same bodies, same run)")
    cols = ["req/s", "ratio", "p50 ms", "p99 ms", "errors", "file p50 ms", "file p99 ms",
            "RSS MB", "start s"]  # fmt: skip
    table.add_column("server")
    for c in cols:
        table.add_column(c, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(row.get(c, "") for c in cols))
    # Piped or captured, rich would squeeze the table into 80 columns and cut the figures.
    out = Console(width=None if sys.stdout.isatty() else 132)
    out.print(table)
    out.print(
        f"ratio per round of {round_s} s: "
        + ", ".join(f"{r:.2f}x" for r in ratios)
        + "; p50 is the median of the rounds', p99 the worst round's"
    )
    out.print(
        f"DB bytes per request over a {args.turns}-turn conversation: {per_request / 1024:.1f} KB"
        f" (mean body {mean_body / 1024:.1f} KB); rows stored in the throughput DB: {total_rows:,}"
    )
    shutil.rmtree(work, ignore_errors=True)
    console.print(
        f"removed {work} with its inbox files: on ext4 without a journal, creating files is "
        "slower for a while after such a delete; wait a minute before the next run"
    )


if __name__ == "__main__":
    main()
