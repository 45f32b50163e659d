"""Start a server, SIGTERM it soon after its first answer, see that it stops in time.

    python tools/sigterm_cycles.py [--cycles 200] [--parallel 4] [--grace 7]

Each cycle starts `python -m ai_agent_proxy` on a free loopback port with its own inbox and
DB, waits for the first `GET /healthz` answer, waits a random delay (half the cycles 0-20 ms,
where start-up listeners may still run; half 0-1 s), sends SIGTERM, and times the exit. A
cycle whose server is still running after the grace time (GRACEFUL_SHUTDOWN_TIMEOUT plus
margin) is a lost stop: it is killed and reported. Exit 1 if any stop was lost.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Cycle:
    delay_s: float
    stopped_in_s: float | None  # None: still running after the grace time (lost)
    exit_code: int | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_cycle(workdir: Path, delay_s: float, grace_s: float) -> Cycle:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ai_agent_proxy", "--port", str(port),
         "--inbox", str(workdir / "inbox"), "--db", str(workdir / "outbox.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {proc.poll()})")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.002)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            code = proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            return Cycle(delay_s, None, None)
        return Cycle(delay_s, time.monotonic() - sent, code)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run_cycles(count: int, parallel: int = 1, grace_s: float = 7.0, seed: int = 0) -> list[Cycle]:
    """`count` cycles, `parallel` at a time; delays drawn from `seed`."""
    rng = random.Random(seed)
    delays = [rng.uniform(0, 0.02) if i % 2 == 0 else rng.uniform(0, 1.0) for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(parallel) as pool:
        dirs = [Path(tmp) / f"c{i}" for i in range(count)]
        for d in dirs:
            d.mkdir()
        return list(pool.map(one_cycle, dirs, delays, [grace_s] * count))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--grace", type=float, default=7.0, help="seconds before a stop is lost")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.monotonic()
    cycles = run_cycles(args.cycles, args.parallel, args.grace, args.seed)
    lost = [c for c in cycles if c.stopped_in_s is None]
    times = sorted(c.stopped_in_s for c in cycles if c.stopped_in_s is not None)
    codes = sorted({c.exit_code for c in cycles if c.exit_code is not None})
    print(f"cycles: {len(cycles)} in {time.monotonic() - started:.0f} s, {args.parallel} at a time")
    print(f"lost stops (running {args.grace:.0f} s after SIGTERM): {len(lost)}")
    for c in lost:
        print(f"  lost: SIGTERM {c.delay_s * 1000:.1f} ms after the first answer")
    if times:
        p = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        print(f"stop time: median {p(0.5):.3f} s, p99 {p(0.99):.3f} s, max {times[-1]:.3f} s")
    print(f"exit codes: {codes}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
