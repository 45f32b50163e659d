"""Who runs next, and what a run's end means (SPEC section 8).

The runner runs the agent CLI on each waiting conversation, up to `parallel` at once:

- one run at a time per conversation, and only after its quiet window (`debounce` since
  its newest message), so that a burst is one run; what arrives during a run waits, and
  starts the next run of that conversation after it;
- a conversation is taken like `next --as` takes it (a lease per slot, renewed while the
  run lasts), so two runners, or a runner and a person at the CLI, never work on the same
  chat; a runner that dies loses its leases (released at once when it starts again);
- the answer check: a run succeeded only if every message it was given is replied to or
  done in the DB, whatever its exit status. Else, with `send_output`, the CLI's final
  answer is sent as the reply to the newest message it was given, through the same
  once-only path. Unless the person wrote again during the run: then, as `reply` refuses
  an answer while newer messages wait, the answer is held back and the conversation runs
  again at once with all its waiting messages (resumed: the agent has its draft), so that
  a burst spread over a run gets one answer; at most HOLD_BACK times in a row, so that a
  person who keeps writing still gets answers. A run stopped by a limit sends nothing on
  its behalf. A run that answered nothing is tried again after a backoff, at
  most `attempts` times for the same messages; then the conversation is set aside as
  failed until a newer message arrives;
- every run is a row (runs.py), begun before it starts: started again after a kill -9,
  the runner stops what its predecessor left running (by the pid recorded, or by the run
  id in the processes' environment if it died before recording one) and records it as
  interrupted.

Finding work costs next to nothing while nothing changes: every POLL_S the runner looks
at the DB's write-ahead log (a stat: its size and time move with every commit), asks
SQLite only then whether another connection committed (`PRAGMA data_version`), and lists
the waiting conversations (one index seek per chat) only then, when a slot was freed, or
when a quiet window, a backoff or another taker's lease it is waiting for ends (measured:
0.4% of a core idle, a message's run started 40 ms after its inbox file). Its statements
run on one connection in a thread of their own, never on the loop that watches the runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ... import db
from ...config import Settings
from ...errors import HistoryError, ProxyError, ReplyFailed, ReplyRefused
from .. import conversations, replies, views
from ..delivery import Deliverer
from . import command, launch, prompt, runs
from .adapters import Result, read_plain
from .launch import CannotStart, Finished, Limit, Limits
from .options import Options
from .runs import Outcome

log = logging.getLogger("ai_agent_proxy.agent")

POLL_S = 0.05  # how often the runner looks whether the DB changed (a stat of its WAL)
LOOK_ANYWAY_S = 5.0  # the waiting conversations are listed at least this often
HOLD_BACK = 2  # answers held back in a row for newer messages, before one is sent anyway
STOP_WATCH_S = 0.5  # how often a run checks whether `agent stop` asked for it
PRUNE_S = 300.0  # how often failures of conversations that no longer wait are dropped
T = TypeVar("T")


@dataclass
class Slot:
    number: int
    conversation: str | None = None
    task: asyncio.Task[None] | None = None
    launched: launch.Launched | None = None


@dataclass(frozen=True)
class Prepared:
    """A run about to start: its row is begun (runs.begin)."""

    run_id: str
    given: list[str]  # the request ids it is given, in arrival order
    newest_seq: int
    failures: runs.Failures | None
    session: str | None  # the CLI's session to resume
    argv: list[str]
    prompt: str
    on_stdin: bool  # the prompt on standard input (not an argument, not a file)
    env: dict[str, str]
    prompt_file: Path
    error: str | None  # it cannot be started, and why


class Runner:
    """The runner of one process: `await run()` until `stop()`."""

    def __init__(self, settings: Settings, options: Options) -> None:
        self.settings = settings
        self.options = options
        self.identity = {
            "name": options.name, "pid": os.getpid(), "started": launch.started_at(os.getpid()),
        }  # fmt: skip
        self.slots = [Slot(n) for n in range(options.parallel)]
        self.conn: sqlite3.Connection | None = None
        self.polls = 0  # passes of the loop (a test waits for some to see nothing happen)
        self.looks = 0  # times the waiting conversations were listed
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="aiap-runner-db")
        self._version: int | None = None  # PRAGMA data_version when last listed
        self._look_at_ms = 0  # list again by then whatever changed
        self._wal = Path(f"{settings.db_path}-wal")
        self._wal_seen: tuple[int, int, int] | None = None
        self._pruned = 0.0
        self._held: dict[str, int] = {}  # conversation -> its answers held back in a row
        self.deliverer = Deliverer(settings)  # --send-output's: one gateway connection

    def taker(self, slot: Slot) -> str:
        return f"runner:{self.options.name}:{os.getpid()}/slot-{slot.number}"

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` on the runner's connection, in its DB thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, self.conn, *args))

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn = await loop.run_in_executor(
            self._executor, replies.connect, self.settings.db_path
        )
        try:
            await self._recover()
            log.info(
                "agent_runner_started name=%s agent=%s parallel=%d debounce=%gs timeout=%gs"
                " db=%s", self.options.name, self.options.agent, self.options.parallel,
                self.options.debounce_s, self.options.timeout_s, self.settings.db_path,
            )  # fmt: skip
            while not self._stopping.is_set():
                self.polls += 1
                await self._start_runs()
                await asyncio.sleep(POLL_S)  # (cheaper than waiting on the stop event)
            await self._finish_running()
        finally:
            with contextlib.suppress(sqlite3.Error):
                for slot in self.slots:
                    await self._db(conversations.release, self.taker(slot))
            await loop.run_in_executor(self._executor, self.conn.close)
            self._executor.shutdown()
            self.deliverer.close()
            log.info("agent_runner_stopped name=%s", self.options.name)

    def stop(self) -> None:
        """No new runs; the running ones get the grace, then are stopped."""
        self._stopping.set()

    async def _finish_running(self) -> None:
        """The running runs get the grace to end on their own; those still running after
        it are stopped (SIGTERM to the group, SIGKILL a moment later)."""
        running = [s.task for s in self.slots if s.task is not None]
        if not running:
            return
        log.info("agent_runner_stopping runs=%d grace=%gs", len(running), self.options.grace_s)
        _, late = await asyncio.wait(running, timeout=self.options.grace_s)
        for slot in self.slots:
            if slot.launched is not None and slot.task in late:
                slot.launched.stop(Limit.STOPPED, kill_after=launch.LEFTOVER_GRACE_S)
        if late:
            await asyncio.wait(late)

    async def _start_runs(self) -> None:
        free = [s for s in self.slots if s.task is None]
        if not free:
            return
        if not self._wal_moved() and conversations.now_ms() < self._look_at_ms:
            return  # nobody wrote to the DB, and nothing is due
        try:
            picked = await self._db(self._pick, free)
        except sqlite3.Error as exc:  # the DB is locked or gone: said, and tried again
            log.warning("agent_runner_db_error %s", exc)
            return
        for slot, key in picked:
            slot.conversation = key
            slot.task = asyncio.create_task(self._work(slot, key), name=f"run-{key}")
            slot.task.add_done_callback(lambda _, s=slot: self._free(s))

    def _wal_moved(self) -> bool:
        """Whether the DB's write-ahead log changed since the last look (every commit
        writes to it): a stat on the loop, no thread, no query."""
        try:
            st = os.stat(self._wal)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        moved, self._wal_seen = seen != self._wal_seen, seen
        return moved

    def _free(self, slot: Slot) -> None:
        slot.conversation, slot.task, slot.launched = None, None, None
        self._look_at_ms = 0  # its conversation may wait again (a message came meanwhile)

    def _pick(self, conn: sqlite3.Connection, free: list[Slot]) -> list[tuple[Slot, str]]:
        """(In the DB thread) the conversations to run now, each held by a free slot:
        past their quiet window, not running here, not held by another taker, not in
        backoff nor set aside; oldest first. Nothing is listed while nothing changed."""
        ((version,),) = conn.execute("PRAGMA data_version")
        now = conversations.now_ms()
        if version == self._version and now < self._look_at_ms:
            return []
        self._version, self.looks = version, self.looks + 1
        self._look_at_ms = now + int(LOOK_ANYWAY_S * 1000)
        if time.monotonic() - self._pruned > PRUNE_S:
            self._pruned = time.monotonic()
            runs.prune(conn)
        waiting = conversations.waiting_conversations(conn)
        if not waiting:
            return []
        running = {s.conversation for s in self.slots}
        held = conversations.held(conn, now)
        failures = runs.failures(conn)
        picked: list[tuple[Slot, str]] = []
        for chat in waiting:
            if chat.key in running:
                continue
            due = self._due(conn, chat, held, failures, now)
            if due is not None:
                self._look_at_ms = min(self._look_at_ms, due)
                continue
            slot = free[len(picked)]
            if not conversations.renew(conn, chat.key, self.taker(slot), self.options.lease_s):
                continue  # another taker got it first
            picked.append((slot, chat.key))
            if len(picked) == len(free):
                break
        return picked

    def _due(
        self,
        conn: sqlite3.Connection,
        chat: conversations.Waiting,
        held: dict[str, int],
        failures: dict[str, runs.Failures],
        now: int,
    ) -> int | None:
        """None when `chat` may run now; else when to look at it again (the end of its
        quiet window, backoff or another's lease; a set-aside one: when a message comes,
        a commit, so never by the clock)."""
        if chat.key in held:
            return held[chat.key]
        quiet_until = chat.newest_ms + int(self.options.debounce_s * 1000)
        if now < quiet_until:
            return quiet_until  # a burst may go on
        failed = failures.get(chat.key)
        if failed is None:
            return None
        if failed.set_aside_seq is not None:
            if chat.last_seq <= failed.set_aside_seq:
                return 1 << 62  # set aside until a newer message arrives
            runs.cleared(conn, chat.key)  # one did: tried afresh
            return None
        if failed.retry_after_ms is not None and failed.retry_after_ms > now:
            return failed.retry_after_ms  # in its backoff
        return None

    # -- one run -----------------------------------------------------------------------

    async def _work(self, slot: Slot, key: str) -> None:
        """Run the agent on conversation `key` (held by the slot), check its answer, and
        record it all; the lease is renewed while it runs and given back after."""
        renewing = asyncio.create_task(self._renew(slot, key))
        try:
            fresh = False
            while True:  # (at most twice: once more, fresh, when a resume is refused)
                retry_fresh = await self._one_run(slot, key, fresh)
                if not retry_fresh or fresh:
                    return
                fresh = True
        except Exception as exc:  # one conversation's trouble never stops the others
            log.exception("agent_run_crashed conversation=%s", key)
            with contextlib.suppress(sqlite3.Error):  # not tried again at once
                await self._db(self._crashed, key, f"{type(exc).__name__}: {exc}")
        finally:
            renewing.cancel()
            with contextlib.suppress(sqlite3.Error):
                await self._db(conversations.release, self.taker(slot), key)

    def _crashed(self, conn: sqlite3.Connection, key: str, why: str) -> None:
        retry = conversations.now_ms() + int(max(self.options.retry_after_s, 1.0) * 1000)
        with db.transaction(conn):
            runs.failed(conn, key, Outcome.FAILED, retry, None)
            for row in runs.unfinished(conn):
                if row["conversation"] == key and json.loads(row["runner"]) == self.identity:
                    runs.end(conn, row["id"], outcome=Outcome.FAILED,
                             error=f"the runner failed: {why}"[:500])  # fmt: skip

    async def _one_run(self, slot: Slot, key: str, fresh: bool) -> bool:
        """One run; True when the CLI refused the session it was asked to resume (it is
        dropped then, and the caller runs once more, fresh)."""
        ready = await self._db(self._prepare, slot, key, fresh)
        if ready is None:  # answered meanwhile (by a person at the CLI, say)
            return False
        if ready.error is None:
            finished = await self._launch(slot, ready, key)
        else:
            finished = Finished(None, None, "", "", "", ready.error)
        with contextlib.suppress(OSError):
            ready.prompt_file.unlink()
        asked_to_stop = await self._db(runs.stop_requested, ready.run_id)  # `agent stop`
        if asked_to_stop and finished.limit is None:
            finished.limit = Limit.STOPPED
        read = self._read(finished)
        if read.resume_refused and ready.session is not None:
            await self._db(self._refused, key, ready, finished)
            return True
        sent_output, send_error, held = await self._send_output(slot, key, ready, finished, read)
        if held:
            self._held[key] = self._held.get(key, 0) + 1
        else:
            self._held.pop(key, None)
        outcome = await self._db(self._conclude, key, ready, finished, read, sent_output,
                                 send_error or None, asked_to_stop, held)  # fmt: skip
        log.info(
            "agent_run_ended run=%s conversation=%s outcome=%s exit=%s limit=%s"
            " sent_output=%s messages=%d", ready.run_id, key, outcome.value,
            finished.exit_status, finished.limit.value if finished.limit else "-",
            sent_output, len(ready.given),
        )  # fmt: skip
        return False

    def _prepare(
        self, conn: sqlite3.Connection, slot: Slot, key: str, fresh: bool
    ) -> Prepared | None:
        """(DB thread) What the run is given, its prompt, argv and environment; its row
        begun. None when nothing in the conversation waits any more."""
        options = self.options
        chat = conversations.conversation(conn, key)
        if chat is None:
            return None
        view = views.conversation_view(chat, self.settings.inbox, time.time())
        failures = runs.failures(conn).get(key)
        stable, session = runs.session(conn, key, options.agent)
        session = None if fresh else session
        text = prompt.render(view, send_output=options.send_output, session=stable,
                             template=options.prompt_template,
                             held=self._held.get(key, 0) > 0)  # fmt: skip
        run_id = runs.new_run_id()
        prompt_file = Path(self.settings.db_path).parent / "runs" / f"{run_id}.prompt"
        error = None
        unfilled = command.unfilled(options, session)
        try:
            argv = command.fill(unfilled, text, prompt_file, session or stable)
        except CannotStart as exc:
            argv, error = unfilled, str(exc)
        given = [m.request_id for m in chat.messages]
        attempt = 1 + (failures.count if failures else 0)
        runs.begin(conn, runs.Begun(run_id, key, given, command.masked(argv, self.settings.redact),
                                    self.identity,
                                    slot.number, attempt, session))  # fmt: skip
        env = command.environment(self.settings, options, run_id, key, chat.messages, stable)
        on_stdin = launch.takes_prompt_on_stdin(unfilled)
        return Prepared(run_id, given, chat.messages[-1].seq, failures, session, argv, text,
                        on_stdin, env, prompt_file, error)  # fmt: skip

    async def _launch(self, slot: Slot, ready: Prepared, key: str) -> Finished:
        """Start the run and wait for its end (stopped on `agent stop`)."""
        options = self.options
        limits = Limits(options.timeout_s, options.idle_timeout_s, options.grace_s)
        try:
            slot.launched = await launch.launch(ready.argv, ready.prompt, env=ready.env,
                                                cwd=options.workdir, limits=limits,
                                                on_stdin=ready.on_stdin)  # fmt: skip
        except CannotStart as exc:
            return Finished(None, None, "", "", "", str(exc))
        launched = slot.launched
        with contextlib.suppress(sqlite3.Error):  # (a run is not stopped for a lost pid)
            await self._db(runs.started, ready.run_id, launched.pid, launched.pid_started)
        log.info(
            "agent_run_started run=%s conversation=%s messages=%d pid=%d session=%s",
            ready.run_id, key, len(ready.given), launched.pid, ready.session or "-",
        )  # fmt: skip
        watching = asyncio.create_task(self._watch_stop_request(launched, ready.run_id))
        try:
            return await launched.finished()
        finally:
            watching.cancel()

    async def _watch_stop_request(self, launched: launch.Launched, run_id: str) -> None:
        while True:
            await asyncio.sleep(STOP_WATCH_S)
            with contextlib.suppress(sqlite3.Error):
                if await self._db(runs.stop_requested, run_id):
                    launched.stop(Limit.STOPPED)
                    return

    def _read(self, finished: Finished) -> Result:
        read = self.options.adapter.read if self.options.adapter else read_plain
        if finished.exit_status is None:
            return Result(failed=finished.error)
        return read(finished.stdout, finished.stderr, finished.exit_status)

    def _refused(
        self, conn: sqlite3.Connection, key: str, ready: Prepared, finished: Finished
    ) -> None:
        """(DB thread) The CLI refused the session it was to resume: dropped, the run
        recorded as failed for it (the caller runs once more, fresh)."""
        with db.transaction(conn):
            runs.keep_session(conn, key, self.options.agent, None)
            runs.end(
                conn,
                ready.run_id,
                exit_status=finished.exit_status,
                outcome=Outcome.FAILED,
                output_tail=finished.tail,
                error=f"the session {ready.session} could not be resumed: tried fresh",
            )
        log.warning("agent_session_refused run=%s conversation=%s session=%s: running fresh",
                    ready.run_id, key, ready.session)  # fmt: skip

    async def _send_output(
        self, slot: Slot, key: str, ready: Prepared, finished: Finished, read: Result
    ) -> tuple[bool, str | None, bool]:
        """With send_output, the CLI's final answer as the reply to the newest message it
        was given, once, when the run left its messages unanswered (and ended on its own:
        a run stopped by a limit sends nothing on its behalf). Held back when the person
        wrote again during the run (HOLD_BACK times in a row at most; then sent, threaded
        under the message it answers). (sent, why not, held back)."""
        if not self.options.send_output or finished.limit is not None or read.answer is None:
            return False, None, False
        if not await self._db(conversations.unanswered, ready.given):  # answered meanwhile
            return False, None, False
        newest, answer = ready.given[-1], read.answer.strip()
        taker, settings = self.taker(slot), self.settings
        context_id = None if key.startswith("request:") else key
        newer = await self._db(conversations.after, context_id, ready.newest_seq, newest)
        if newer and self._held.get(key, 0) < HOLD_BACK:
            log.info("agent_answer_held run=%s conversation=%s newer=%d: running again with"
                     " them", ready.run_id, key, len(newer))  # fmt: skip
            return False, None, True

        def send() -> str | None:  # its own connection: a send may take seconds
            with replies.session(settings.db_path) as (_, conn):
                try:
                    if answer == prompt.NO_REPLY:
                        replies.done(conn, newest, taker=taker)
                    else:  # (anyway: what came during the run is not what it answered)
                        replies.reply(conn, settings, newest, answer, anyway=True,
                                      reply_to=bool(newer), taker=taker,
                                      deliverer=self.deliverer)  # fmt: skip
                except ReplyRefused:
                    return None  # answered meanwhile: nothing more to send
                except (ReplyFailed, HistoryError, ProxyError) as exc:
                    return str(exc)
            return None

        error = await asyncio.to_thread(send)
        return error is None, error, False

    def _conclude(
        self,
        conn: sqlite3.Connection,
        key: str,
        ready: Prepared,
        finished: Finished,
        read: Result,
        sent_output: bool,
        send_error: str | None,
        asked_to_stop: bool,
        held: bool,
    ) -> Outcome:
        """(DB thread) The run's outcome, from the DB (the answer check), recorded with
        the session it left and counted in the conversation's failures."""
        outcome = self._outcome(len(conversations.unanswered(conn, ready.given)), len(ready.given),
                                finished, read, held)  # fmt: skip
        with db.transaction(conn):  # one step: whoever sees the run ended sees its count
            if read.session_id is not None and read.session_id != ready.session:
                runs.keep_session(conn, key, self.options.agent, read.session_id)
            runs.end(
                conn, ready.run_id, exit_status=finished.exit_status,
                limit_fired=finished.limit.value if finished.limit else None, outcome=outcome,
                sent_output=int(sent_output), session_after=read.session_id,
                cost_usd=read.cost_usd, tokens=read.tokens,
                error=ready.error or finished.error or send_error or read.failed,
                output_tail=finished.tail,
            )  # fmt: skip
            self._count(conn, key, outcome, ready.failures, ready.newest_seq, asked_to_stop)
        return outcome

    @staticmethod
    def _outcome(
        left: int, given: int, finished: Finished, read: Result, held: bool = False
    ) -> Outcome:
        """The one place a run's outcome is decided: `left` of the `given` messages are
        still unanswered; `held`: its answer was held back for newer messages."""
        if left == 0:
            return Outcome.ANSWERED
        if left < given:
            return Outcome.PARTLY
        if held:
            return Outcome.HELD
        if finished.limit is Limit.TIMEOUT:
            return Outcome.TIMED_OUT
        if finished.limit is Limit.IDLE:
            return Outcome.IDLE
        if finished.limit is Limit.STOPPED:
            return Outcome.STOPPED
        if read.failed is not None:  # (a CLI that never started says why too)
            return Outcome.FAILED
        return Outcome.UNANSWERED

    def _count(
        self,
        conn: sqlite3.Connection,
        key: str,
        outcome: Outcome,
        before: runs.Failures | None,
        newest_seq: int,
        asked_to_stop: bool,
    ) -> None:
        """A run's end in the conversation's failures: answered (or partly: the rest are
        newer messages, a new matter) clears them; the runner's own stop does not count
        (the next start runs it again), a person's `agent stop` sets it aside until a new
        message; any other end is a failure, tried again after a backoff, or set aside
        once the attempts are spent."""
        if outcome in (Outcome.ANSWERED, Outcome.PARTLY):
            if before is not None:
                runs.cleared(conn, key)
            return
        if outcome is Outcome.HELD:
            return  # not a failure: run again at once, with the newer messages
        if outcome is Outcome.STOPPED:
            if asked_to_stop:
                runs.failed(conn, key, outcome, None, newest_seq)
            return
        count = 1 + (before.count if before else 0)
        if count >= self.options.attempts:  # until a message newer than those it was given
            runs.failed(conn, key, outcome, None, newest_seq)
            log.warning("agent_conversation_set_aside conversation=%s failures=%d outcome=%s"
                        " (until a new message arrives)", key, count, outcome.value)  # fmt: skip
        else:
            backoff = self.options.retry_after_s * 2 ** (count - 1)
            runs.failed(conn, key, outcome, conversations.now_ms() + int(backoff * 1000), None)

    async def _renew(self, slot: Slot, key: str) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.options.lease_s / 3))
            with contextlib.suppress(sqlite3.Error):
                await self._db(conversations.renew, key, self.taker(slot), self.options.lease_s)

    # -- after a kill -9 ---------------------------------------------------------------

    async def _recover(self) -> None:
        """Runs left unfinished by a runner that is gone: what is left of their process
        groups is stopped, they are recorded as interrupted, and that runner's leases are
        given back (its conversations come back at once, not after their lease)."""
        for row in await self._db(runs.unfinished):
            runner = json.loads(row["runner"])
            if runner.get("pid") == os.getpid() or _alive(runner.get("pid"), runner.get("started")):
                continue  # a runner that lives (another process on this DB)
            pid, groups = row["pid"], launch.groups_of_run(row["id"])
            if pid is not None and _alive(pid, row["pid_started"]):
                groups.add(pid)  # (its pid is its group's id: started in a session of its own)
            for group in sorted(groups):  # (found by the run's id: died before noting a pid)
                log.warning("agent_run_left_running run=%s group=%d: stopping it", row["id"], group)
                await launch.stop_group(group, min(self.options.grace_s, 10.0))
            await self._db(runs.interrupted, row["id"], runner.get("pid"))
            log.warning("agent_run_interrupted run=%s conversation=%s", row["id"],
                        row["conversation"])  # fmt: skip


def _alive(pid: int | None, started: int | None) -> bool:
    """Whether process `pid` lives and is the one that started at `started`."""
    if pid is None:
        return False
    now = launch.started_at(pid)
    return now is not None and (started is None or now == started)
