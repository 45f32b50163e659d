"""Start a server, SIGTERM it soon after its first answer, see that it stops in time.

    python tools/sigterm_cycles.py [--cycles 200] [--parallel 4] [--grace 7]

Each cycle starts `python -m ai_agent_proxy` on a free loopback port with its own inbox and
DB, as systemd would (NOTIFY_SOCKET set), then sends SIGTERM: in a third of the cycles the
moment READY=1 arrives (what a service manager stopping a just-started service does); in
the others after the first `GET /healthz` answer and a random delay (0-20 ms, where
start-up listeners may still run, or 0-1 s). It times the exit. A
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
    delay_s: float | None  # None: sent on READY=1
    stopped_in_s: float | None  # None: still running after the grace time (lost)
    exit_code: int | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_cycle(workdir: Path, delay_s: float | None, grace_s: float) -> Cycle:
    """delay_s None: SIGTERM on READY=1; else that long after the first /healthz answer."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    notify.settimeout(30)
    env["NOTIFY_SOCKET"] = str(workdir / "notify.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ai_agent_proxy", "--port", str(port),
         "--inbox", str(workdir / "inbox"), "--db", str(workdir / "outbox.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
    )  # fmt: skip
    try:
        while delay_s is None and b"READY=1" not in notify.recv(4096):
            pass
        deadline = time.monotonic() + 30
        while delay_s is not None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {proc.poll()})")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.002)
        time.sleep(delay_s or 0)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            code = proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            return Cycle(delay_s, None, None)
        return Cycle(delay_s, time.monotonic() - sent, code)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run_cycles(count: int, parallel: int = 1, grace_s: float = 7.0, seed: int = 0) -> list[Cycle]:
    """`count` cycles, `parallel` at a time; delays drawn from `seed`."""
    rng = random.Random(seed)
    kinds = (lambda: None, lambda: rng.uniform(0, 0.02), lambda: rng.uniform(0, 1.0))
    delays = [kinds[i % 3]() for i in range(count)]
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
        when = "on READY=1" if c.delay_s is None else f"{c.delay_s * 1000:.1f} ms after /healthz"
        print(f"  lost: SIGTERM {when}")
    if times:
        p = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        print(f"stop time: median {p(0.5):.3f} s, p99 {p(0.99):.3f} s, max {times[-1]:.3f} s")
    print(f"exit codes: {codes}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
