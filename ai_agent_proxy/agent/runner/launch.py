"""A run's process, as a supervisor keeps one (systemd's KillMode=control-group,
supervisord's stopasgroup): its own session and process group, the prompt on its standard
input (then closed, so a permission prompt can never wait for ever) or as one argument,
no shell. Limits: the whole run (`timeout`), silence on both outputs (`idle_timeout`).
Stopping it, for a limit or a stop, is SIGTERM to the whole group, SIGKILL to the group
after `grace`; when it ends, whatever of its group is left is stopped the same way, so no
process it started outlives the run. Chat text never becomes a command: the argv is the
person's, with the prompt at most as one whole element.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TAIL_BYTES = 4096  # the end of a run's output kept with its record
STDOUT_MAX = 16 << 20  # the end of stdout kept for reading the answer
ARG_MAX = 128 * 1024 - 1  # Linux refuses a longer single argument (MAX_ARG_STRLEN)
LEFTOVER_GRACE_S = 2.0  # what is left of a finished run's group gets this long after SIGTERM
KILL_WAIT_S = 2.0  # how long stop_group waits for a group to go after its SIGKILL
PLACEHOLDERS = ("{prompt}", "{prompt_file}", "{session_id}")


class Limit(str, enum.Enum):
    """Why a run was stopped before it ended on its own."""

    TIMEOUT = "timeout"  # --timeout
    IDLE = "idle"  # --idle-timeout: no output for that long
    STOPPED = "stopped"  # the runner stopped, or `agent stop`


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    idle_timeout_s: float | None
    grace_s: float


@dataclass
class Finished:
    exit_status: int | None  # negative: killed by that signal; None: it never started
    limit: Limit | None
    stdout: str
    stderr: str
    tail: str  # the last TAIL_BYTES of both outputs, in the order they came
    error: str | None = None  # it could not be started, and why


class CannotStart(Exception):
    """The command could not be made or started (not found, a prompt too long for an
    argument, ...): the run failed, with this one line."""


def fill_argv(argv: Sequence[str], prompt: str, prompt_file: Path, session: str) -> list[str]:
    """The argv with an element that is exactly `{prompt}`, `{prompt_file}` or
    `{session_id}` replaced by it (a whole element: never split, never a shell's)."""
    out = []
    for arg in argv:
        if arg == "{prompt}":
            if len(prompt.encode()) > ARG_MAX:
                raise CannotStart(
                    f"the prompt ({len(prompt.encode()):,} bytes) is too long for one argument:"
                    " give it on standard input, or as {prompt_file}"
                )
            arg = prompt
        elif arg == "{prompt_file}":
            arg = str(prompt_file)
        elif arg == "{session_id}":
            arg = session
        out.append(arg)
    return out


def takes_prompt_on_stdin(argv: Sequence[str]) -> bool:
    return not any(a in ("{prompt}", "{prompt_file}") for a in argv)


_ENDED = ("Z", "X")  # a zombie (only its exit status left) or a dead process has ended


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command's name (its state first); None when there
    is no such process (or it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _live_processes() -> Iterator[tuple[str, list[str]]]:
    """(pid, stat fields) of every process that has not ended; OSError without /proc."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and (fields := _stat(entry.name)) and fields[0] not in _ENDED:
                yield entry.name, fields


def started_at(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc), to tell it from another
    process that later got the same pid; None when there is no such process (or only its
    exit status is left, a zombie)."""
    fields = _stat(pid)
    try:
        return None if fields is None or fields[0] in _ENDED else int(fields[19])
    except (IndexError, ValueError):
        return None


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. A zombie does not: where orphans are
    not reaped (PID 1 of some containers) a killed group's processes stay zombies for
    ever, and a signal to the group still "succeeds"."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return any(int(fields[2]) == pgid for _, fields in _live_processes())
    except OSError:
        return True  # no /proc: the signal's word is all there is


def groups_of_run(run_id: str) -> set[int]:
    """The process groups of the live processes whose environment says AIAP_RUN_ID=`run_id`
    (command.environment gives it to the run, its children inherit it): how a run is found
    when its runner died after starting it but before recording its pid. Only processes of
    this user can be read; none on a system without /proc. Never this process's own group
    (a runner started from a run's shell inherits its AIAP_RUN_ID)."""
    needle, own = f"AIAP_RUN_ID={run_id}".encode(), os.getpgrp()

    def of_the_run(pid: str) -> bool:
        try:
            return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False  # another user's, or ended meanwhile

    try:
        return {int(fields[2]) for pid, fields in _live_processes()
                if int(fields[2]) != own and of_the_run(pid)}  # fmt: skip
    except OSError:
        return set()


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def stop_group(pgid: int, grace_s: float) -> None:
    """Stop what lives in process group `pgid`: SIGTERM, then SIGKILL once the group is
    gone or `grace_s` is over (a group already gone is left alone); returns once it is gone
    (or KILL_WAIT_S after the SIGKILL: a process stuck in the kernel cannot be waited for)."""
    if not group_alive(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_alive(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@dataclass
class Launched:
    """A running child: wait for it with `finished()`, stop it with `stop()`."""

    process: asyncio.subprocess.Process
    limits: Limits
    pid_started: int | None
    _last_output: float = field(default_factory=time.monotonic)
    _limit: Limit | None = None
    _stdout: bytearray = field(default_factory=bytearray)
    _stderr: bytearray = field(default_factory=bytearray)
    _tail: deque[bytes] = field(default_factory=deque)
    _tail_bytes: int = 0
    _kill: asyncio.TimerHandle | None = None
    _feeding: asyncio.Task[None] | None = None  # writing the prompt to its stdin

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, why: Limit, kill_after: float | None = None) -> None:
        """SIGTERM to the group now, SIGKILL to it after `kill_after` (the grace), once."""
        if self._limit is not None or self.process.returncode is not None:
            return
        self._limit = why
        signal_group(self.pid, signal.SIGTERM)
        self._kill = asyncio.get_running_loop().call_later(
            self.limits.grace_s if kill_after is None else kill_after,
            signal_group, self.pid, signal.SIGKILL,
        )  # fmt: skip

    async def finished(self) -> Finished:
        """Wait for the run to end (its limits watched meanwhile), stop what is left of its
        group, and say how it ended."""
        readers = [
            asyncio.create_task(self._read(self.process.stdout, self._stdout)),
            asyncio.create_task(self._read(self.process.stderr, self._stderr)),
        ]
        watch = asyncio.create_task(self._watch())
        try:
            await self.process.wait()
            # its outputs are read to their end (a child of it may still hold them: the
            # group is stopped below, which closes them)
            await asyncio.wait(readers, timeout=1.0)
        finally:
            watch.cancel()
            if self._kill is not None:
                self._kill.cancel()
            await self._stop_leftovers()
            for task in (*readers, self._feeding):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*readers, watch, return_exceptions=True)
        return Finished(
            exit_status=self.process.returncode,
            limit=self._limit,
            stdout=self._stdout.decode("utf-8", "replace"),
            stderr=self._stderr[-TAIL_BYTES:].decode("utf-8", "replace"),
            tail=b"".join(self._tail)[-TAIL_BYTES:].decode("utf-8", "replace"),
        )

    async def _read(self, stream: asyncio.StreamReader | None, into: bytearray) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            self._last_output = time.monotonic()
            into += chunk
            if len(into) > STDOUT_MAX:
                del into[: len(into) - STDOUT_MAX]
            self._tail.append(chunk)
            self._tail_bytes += len(chunk)
            while self._tail_bytes - len(self._tail[0]) >= TAIL_BYTES:
                self._tail_bytes -= len(self._tail.popleft())

    async def _watch(self) -> None:
        """Stop the run at its timeout, or after idle_timeout without output."""
        started = time.monotonic()
        limits = self.limits
        while True:
            now = time.monotonic()
            if now - started >= limits.timeout_s:
                self.stop(Limit.TIMEOUT)
                return
            idle = limits.idle_timeout_s
            if idle is not None and now - self._last_output >= idle:
                self.stop(Limit.IDLE)
                return
            wake = started + limits.timeout_s - now
            if idle is not None:
                wake = min(wake, self._last_output + idle - now)
            await asyncio.sleep(max(0.05, min(wake, 1.0)))

    async def _stop_leftovers(self) -> None:
        """What the run left in its group (a child it started and did not wait for) is
        stopped: SIGTERM, then SIGKILL after LEFTOVER_GRACE_S."""
        await stop_group(self.pid, LEFTOVER_GRACE_S)


async def launch(
    argv: Sequence[str],
    prompt: str,
    *,
    env: Mapping[str, str],
    cwd: Path,
    limits: Limits,
    on_stdin: bool = True,
) -> Launched:
    """Start a run: `argv` (placeholders already filled) in its own process group in
    `cwd`, the prompt on standard input unless the argv took it (`on_stdin`, decided
    by takes_prompt_on_stdin on the argv before it was filled). CannotStart if it cannot
    be started."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if on_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,  # its own session and process group: stopped as one
        )
    except FileNotFoundError:
        raise CannotStart(f"{argv[0]}: not found (is it on PATH?)") from None
    except OSError as exc:
        raise CannotStart(f"{argv[0]}: cannot run it: {exc.strerror or exc}") from None
    launched = Launched(process, limits, started_at(process.pid))
    if on_stdin:
        launched._feeding = asyncio.create_task(_feed(process, prompt.encode()))
    return launched


async def _feed(process: asyncio.subprocess.Process, data: bytes) -> None:
    """Write the prompt and close standard input; a child that never reads it (or ends
    first) is not waited for."""
    stdin = process.stdin
    assert stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        stdin.write(data)
        await stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        stdin.close()
