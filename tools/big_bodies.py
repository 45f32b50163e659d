"""Many large bodies at once: the server's and its inbox writer's peak memory, a keyed small
client's latency meanwhile, and that every acknowledged body reaches the inbox.

    python tools/big_bodies.py --count 80 --size-mib 15      # the issue's load test
    python tools/big_bodies.py --count 200 --size-mib 15

Starts `python -m ai_agent_proxy` (KEY set) on a fresh inbox and DB, sends `--count`
distinct bodies (a captured OpenClaw turn whose person's text is `--size-mib` MiB, unique
per body) over as many connections at once, while a small keyed request goes every 50 ms.
A body refused with 503 is sent again after its Retry-After (as OpenAI's SDK does), until
acknowledged. Memory is read from /proc every 20 ms: VmRSS of the server and of each of its
children (the inbox writer), and their sum. Not part of the test suite (it takes a minute
and gigabytes); tests/test_hostile.py keeps a small version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TURN = ROOT / "tests" / "fixtures" / "openclaw-2026.9-telegram-dm-turn2.json"
KEY = "bench-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.server = self.writer = self.total = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            server = rss_mb(self.pid)
            kids = sum(rss_mb(c) for c in children(self.pid))
            self.server, self.writer = max(self.server, server), max(self.writer, kids)
            self.total = max(self.total, server + kids)
            time.sleep(0.02)


def body_bytes(i: int, size: int) -> bytes:
    body = json.loads(TURN.read_text())
    person = next(m for m in reversed(body["messages"]) if isinstance(m["content"], str))
    filler = (f"body {i} " * (size // 8 + 1))[:size]
    person["content"] = person["content"].replace("second message, normal mode", filler)
    return json.dumps(body).encode()


async def post(port: int, data: bytes, key: str) -> tuple[int, float]:
    """(status, Retry-After seconds) of one POST on its own connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
            + key.encode() + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(data)).encode() + b"\r\nconnection: close\r\n\r\n"
        )  # fmt: skip
        writer.write(data)  # (not drained: a server that refuses early never reads it)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        retry = re.search(rb"(?i)retry-after: *(\d+)", head)
        return status, float(retry.group(1)) if retry else 1.0
    finally:
        writer.close()


async def big_load(port: int, count: int, size: int) -> dict[str, int]:
    outcome = {"acked": 0, "refused_then_retried": 0, "failed": 0}

    async def one(i: int) -> None:
        data = body_bytes(i, size)
        for _ in range(600):
            try:
                status, retry_after = await post(port, data, KEY)
            except (OSError, asyncio.IncompleteReadError):
                status, retry_after = 0, 1.0  # as a client library: a connection error, retried
            if status == 200:
                outcome["acked"] += 1
                return
            if status not in (0, 503):
                outcome["failed"] += 1
                return
            outcome["refused_then_retried"] += 1
            await asyncio.sleep(retry_after)

    await asyncio.gather(*(one(i) for i in range(count)))
    return outcome


def small_client(port: int, stop: threading.Event, latencies: list[float]) -> None:
    import httpx

    body = json.loads(TURN.read_text())
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {KEY}"}) as client:
        n = 0
        while not stop.is_set():
            n += 1
            body["messages"][-2]["content"] = f"small {n}"
            started = time.monotonic()
            r = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=80)
    ap.add_argument("--size-mib", type=float, default=15)
    ap.add_argument("--dir", default=None, help="where the inbox and DB go (default: a temp dir)")
    ap.add_argument("--flag", action="append", default=[], help="a server flag (repeatable)")
    args = ap.parse_args()
    size = int(args.size_mib * 1024 * 1024)
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="big-bodies-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "ai_agent_proxy", "--port", str(port), "--key", KEY,
             "--inbox", str(work / "inbox"), "--db", str(work / "outbox.db"), "--reply", "ok",
             *args.flag],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        import httpx

        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        time.sleep(0.5)  # the writer process up
        baseline = rss_mb(server.pid) + sum(rss_mb(c) for c in children(server.pid))
        sampler = Sampler(server.pid)
        sampler.start()
        stop, latencies = threading.Event(), []
        small = threading.Thread(target=small_client, args=(port, stop, latencies), daemon=True)
        small.start()
        started = time.monotonic()
        outcome = asyncio.run(big_load(port, args.count, size))
        took = time.monotonic() - started
        files = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            inbox = work / "inbox"
            names = [n for n in os.listdir(inbox) if n.endswith(".json")] if inbox.is_dir() else []
            files = len(names)
            if files >= outcome["acked"] + len(latencies):
                break
            time.sleep(0.2)
        stop.set()
        small.join()
        sampler.stop.set()
        time.sleep(10)
        after = rss_mb(server.pid) + sum(rss_mb(c) for c in children(server.pid))
        lat = sorted(latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
        print(f"{args.count} bodies of {args.size_mib:g} MiB in {took:.1f} s: {outcome}")
        print(f"inbox files {files} (big acknowledged {outcome['acked']} + small {len(lat)})")
        print(
            f"peak RSS MB: server {sampler.server:.0f}, writer {sampler.writer:.0f}, both"
            f" {sampler.total:.0f} (baseline {baseline:.0f}, 10 s after {after:.0f})"
        )
        if lat:
            p50 = statistics.median(lat) * 1000
            print(
                f"small keyed client: {len(lat)} requests, p50 {p50:.0f} ms,"
                f" p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
