"""Benchmark a reply's delivery: through the gateway (a stand-in speaking the real gateway's
frames, tests/gateway.py) and through the CLI fallback (a stand-in `openclaw` that only
logs its call: the real one takes ~5 s to start), each as a one-shot `ai-agent-proxy reply`
process and in-process with a kept connection (what the MCP server and the runner do).

    python tools/reply_bench.py              # ~30 s
    python tools/reply_bench.py --replies 50

Prints p50/p90/max in ms of: the `reply` command's wall time, and the delivery alone
(`reply_delivery_ms` of history stats: a reply's claim to the transport's answer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench import Target, free_port  # noqa: E402

from tests import openclaw as oc  # noqa: E402
from tests.gateway import TOKEN, StandInGateway  # noqa: E402
from tests.openclaw import FAKE_OPENCLAW  # noqa: E402

console = Console(stderr=True)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def post_messages(server: Target, count: int, first: int) -> list[str]:
    import httpx

    for n in range(count):  # a chat each: Telegram's one message a second per chat
        chat, words = str(700000000 + first + n), f"question {first + n}"
        body = oc.with_info(oc.typed(oc.load(oc.TURN2), words), chat_id=chat, message_id=chat)
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        rows = history(server.workdir)
        waiting = [r["id"] for r in rows
                   if r["state"] == "written" and not r.get("reply_state")
                   and r.get("target")]  # fmt: skip
        if len(waiting) >= count or time.monotonic() > deadline:
            return waiting[:count]
        time.sleep(0.05)


def history(work: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "ai_agent_proxy", "history", "--format", "json", "--limit", "0",
         "--db", str(work / "outbox.db"), "--inbox", str(work / "inbox")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return list(reversed(json.loads(out)))


def one_shot(work: Path, ids: list[str], env: dict[str, str]) -> list[float]:
    times = []
    for rid in ids:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ai_agent_proxy", "reply", rid, "--message", "an answer",
             "--db", str(work / "outbox.db"), "--inbox", str(work / "inbox")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        times.append((time.perf_counter() - t0) * 1000)
    return times


def kept(work: Path, ids: list[str], env: dict[str, str]) -> list[float]:
    from ai_agent_proxy.agent import replies
    from ai_agent_proxy.agent.delivery import Deliverer
    from ai_agent_proxy.config import load_settings

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        settings = load_settings(
            None, {"db": str(work / "outbox.db"), "inbox": str(work / "inbox")}
        )
        times = []
        with Deliverer(settings) as deliverer, replies.session(settings.db_path) as (_, conn):
            for rid in ids:
                t0 = time.perf_counter()
                replies.reply(conn, settings, rid, "an answer", deliverer=deliverer)
                times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=20)
    args = parser.parse_args()
    n = args.replies
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="aiap-reply-bench-") as tmp:
        work = Path(tmp)
        (work / "bin").mkdir()
        (work / "bin" / "openclaw").write_text(FAKE_OPENCLAW)
        (work / "bin" / "openclaw").chmod(0o755)
        port = free_port()
        server = Target("proxy", [sys.executable, "-m", "ai_agent_proxy", "--port", str(port),
                                  "--db", str(work / "outbox.db"), "--inbox", str(work / "inbox"),
                                  "--reply", "on it"], port, work)  # fmt: skip
        server.start()
        gateway = StandInGateway()
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AI_AGENT_PROXY_", "OPENCLAW_"))
        }
        base.update(PATH=f"{work / 'bin'}:{base['PATH']}", FAKE_OPENCLAW_LOG=str(work / "calls"),
                    OPENCLAW_STATE_DIR=str(work / "no-openclaw"))  # fmt: skip
        via_gateway = {**base, "AI_AGENT_PROXY_OPENCLAW_GATEWAY_URL": gateway.url,
                       "AI_AGENT_PROXY_OPENCLAW_GATEWAY_TOKEN": TOKEN}  # fmt: skip
        try:
            rows["gateway, `reply` process"] = one_shot(
                work, post_messages(server, n, 0), via_gateway
            )
            rows["gateway, kept connection"] = kept(
                work, post_messages(server, n, 1000), via_gateway
            )
            rows["CLI stand-in, `reply` process"] = one_shot(
                work, post_messages(server, n, 2000), base
            )
            rows["CLI stand-in, in-process"] = kept(work, post_messages(server, n, 3000), base)
            stats = json.loads(subprocess.run(
                [sys.executable, "-m", "ai_agent_proxy", "history", "stats", "--format", "json",
                 "--db", str(work / "outbox.db"), "--inbox", str(work / "inbox")],
                capture_output=True, text=True, check=True).stdout)  # fmt: skip
        finally:
            gateway.stop()
            server.stop()
    table = Table(title=f"a reply's wall time, ms ({n} replies each)")
    for column in ("", "p50", "p90", "max"):
        table.add_column(column, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{pct(values, p):.1f}" for p in (0.5, 0.9, 1.0)))
    console.print(table)
    table = Table(title="the delivery alone (history stats: reply_delivery_ms), all replies")
    for column in ("transport", "count", "p50", "p90", "max"):
        table.add_column(column, justify="right")
    for transport, p in stats["reply_delivery_ms"].items():
        table.add_row(transport, str(p["count"]), *(f"{p[k]:.0f}" for k in ("p50", "p90", "max")))
    console.print(table)


if __name__ == "__main__":
    main()
