"""A run's process (agent/runner/launch.py) on its own: its group, what is left of it when it
ends, its output kept to a bound, a stop that comes late, a command that cannot run. Real
child processes (this interpreter, `sleep`); no runner, no server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ai_agent_proxy.agent.runner import launch
from ai_agent_proxy.agent.runner.launch import CannotStart, Limit, Limits

from .conftest import wait_until

LIMITS = Limits(timeout_s=30, idle_timeout_s=None, grace_s=1)


async def _launch(code: str, **kw: object) -> launch.Launched:
    return await launch.launch([sys.executable, "-c", code], "", env=os.environ,
                               cwd=Path.cwd(), limits=LIMITS, **kw)  # type: ignore[arg-type]  # fmt: skip


def gone(pid: int) -> bool:
    return launch.started_at(pid) is None


def test_a_group_is_alive_while_a_process_of_it_runs_and_not_as_a_zombie() -> None:
    import subprocess

    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert launch.group_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        wait_until(lambda: not launch.group_alive(child.pid))  # a zombie (not reaped yet)
        assert launch.started_at(child.pid) is None
    finally:
        child.kill()
        child.wait()
    assert not launch.group_alive(child.pid)


def test_what_a_run_leaves_in_its_group_is_stopped_when_it_ends() -> None:
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )

    async def go(code: str) -> tuple[launch.Finished, float]:
        run = await _launch(code)
        started = time.monotonic()
        return await asyncio.wait_for(run.finished(), 10), time.monotonic() - started

    finished, took = asyncio.run(go(code))
    leftover = int(finished.stdout.split()[0])
    assert finished.exit_status == 0 and finished.limit is None
    wait_until(lambda: gone(leftover), timeout=5, message="the grandchild outlived its run")
    assert took < launch.LEFTOVER_GRACE_S / 2, took  # it ended at SIGTERM: no wait for the grace
    # one that ignores SIGTERM is killed when the grace is over
    stubborn = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {IGNORE_TERM!r}], stdout=subprocess.PIPE,"
        " stderr=subprocess.DEVNULL)\n"
        "p.stdout.readline()\n"  # its handler is in place
        "print(p.pid, flush=True)\n"
    )
    finished, took = asyncio.run(go(stubborn))
    leftover = int(finished.stdout.split()[0])
    wait_until(lambda: gone(leftover), timeout=5, message="the grandchild outlived its run")
    assert launch.LEFTOVER_GRACE_S <= took < launch.LEFTOVER_GRACE_S + 1.5, took


IGNORE_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\ntime.sleep(60)\n"
)


def test_a_run_that_ended_is_not_stopped_afterwards() -> None:
    async def go() -> launch.Finished:
        run = await _launch("pass")
        await run.process.wait()
        run.stop(Limit.STOPPED)  # too late: it ended on its own
        return await run.finished()

    finished = asyncio.run(go())
    assert (finished.exit_status, finished.limit) == (0, None)


def test_the_output_kept_is_its_end_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "STDOUT_MAX", 1000)
    code = "import sys\nsys.stdout.write('a' * 4000 + 'b' * 1000)"

    async def go() -> launch.Finished:
        return await (await _launch(code)).finished()

    finished = asyncio.run(go())
    assert finished.stdout == "b" * 1000  # its end, at most STDOUT_MAX
    assert finished.tail == "a" * 3096 + "b" * 1000  # the last TAIL_BYTES


def test_a_command_that_cannot_run_says_why_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)

    async def go(argv: list[str]) -> None:
        await launch.launch(argv, "", env=os.environ, cwd=tmp_path, limits=LIMITS)

    with pytest.raises(CannotStart) as raised:
        asyncio.run(go([str(script)]))
    assert str(raised.value) == f"{script}: cannot run it: Permission denied"
    with pytest.raises(CannotStart, match=r"^no-such-cli-7f3: not found \(is it on PATH\?\)$"):
        asyncio.run(go(["no-such-cli-7f3"]))
