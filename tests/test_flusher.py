"""The flusher with the real outbox, DB and inbox writer process, in this process: the
handed-over rows' memory bound, claims handing back to handed rows, and the writer's
report of a batch it cannot render."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ai_agent_proxy import flusher as flusher_module
from ai_agent_proxy.bodies import split_body
from ai_agent_proxy.config import load_settings
from ai_agent_proxy.flusher import Flusher
from ai_agent_proxy.ids import inbox_file_name, new_request_id
from ai_agent_proxy.inbox_writer_client import InboxWriter, WriterOptions
from ai_agent_proxy.migrations import migrate
from ai_agent_proxy.outbox.store import Outbox
from ai_agent_proxy.rows import NewRequest, PendingRow


def request(n: int) -> NewRequest:
    request_id, received_ms = new_request_id()
    body = json.dumps({"messages": [{"role": "user", "content": f"prompt {n}"}]}).encode()
    return NewRequest(
        id=request_id, received_ms=received_ms, body=body, segments=split_body(body),
        latest_user_prompt=f"prompt {n}",
    )  # fmt: skip


def prompts_in(inbox: Path) -> list[str]:
    return [json.loads(p.read_text())["latest-user-prompt"] for p in sorted(inbox.glob("*.json"))]


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_handed_rows_are_bounded_while_the_inbox_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the inbox broken, new rows are not piled up in memory without end: past the
    bound they are dropped and claims take over. Once the inbox works every row is
    written exactly once, in arrival order, and handed rows take over again."""
    monkeypatch.setattr(flusher_module, "HANDED_MAX_ROWS", 5)
    written: list[int] = []
    inbox = tmp_path / "inbox"
    inbox.write_text("in the way")  # a file where the inbox directory should be
    settings = load_settings(None, {"inbox": str(inbox), "db": str(tmp_path / "o.db")})
    migrate(settings.db_path)

    async def scenario() -> None:
        outbox = Outbox(settings.db_path, settings.dedup_window)
        await outbox.open()
        flusher = Flusher(outbox, settings)
        outbox.listen(flusher.hand, flusher.wake)
        flusher.start()
        try:
            for n in range(40):
                await outbox.record(request(n))
            await wait_for(lambda: flusher.status.write_failures >= 2)
            assert len(flusher._handed) <= 5
            inbox.unlink()  # fixed
            await wait_for(lambda: len(prompts_in(inbox)) == 40)
            for n in range(40, 60):  # and on again with rows handed over in memory
                await outbox.record(request(n))
            await wait_for(lambda: len(prompts_in(inbox)) == 60)
        finally:
            await flusher.stop()
            await outbox.close()
        written.append(flusher.status.files_written)

    asyncio.run(scenario())
    assert prompts_in(inbox) == [f"prompt {n}" for n in range(60)]
    assert written == [60]  # each file written once: none taken back by a claim unmarked
    reasons = [r[0] for r in sql(tmp_path, "SELECT error FROM inbox_failures")]  # with why
    assert reasons and all("Error" in r and str(inbox) in r for r in reasons)


def test_writer_rejects_a_row_it_cannot_render_and_writes_the_rest(tmp_path: Path) -> None:
    """The writer process over its real pipes: a row it cannot render (a full payload whose
    body is not JSON) comes back rejected with its reason, and the rows around it in the
    same batch are written, in order; the same process goes on with the next batch, and
    ends when the writer is closed."""
    inbox = tmp_path / "inbox"
    options = WriterOptions(inbox, "reply with the skill", Path("/skills/SKILL.md"))

    def row(seq: int, body: bytes) -> PendingRow:
        request_id, received_ms = new_request_id()
        return PendingRow(
            seq=seq, id=request_id, received_ms=received_ms, body=body, payload_kind="full",
            context_id="c:1", channel="c", target="1", latest_user_prompt=f"prompt {seq}",
        )  # fmt: skip

    async def scenario() -> None:
        writer = InboxWriter(options)
        try:
            mixed = await writer.write([row(1, b"{}"), row(2, b"{not json"), row(3, b"[]")])
            process = writer._proc
            good = await writer.write([row(4, b'{"messages": []}')])
            assert process is not None and writer._proc is process  # one process for both
        finally:
            await writer.close()
        assert process.returncode == 0  # it read the end of its stdin and ended
        assert (mixed.written, mixed.failed_seq) == ([1, 3], None)
        ((seq, error),) = mixed.rejected
        assert seq == 2 and "JSON" in error
        assert (good.written, good.failed_seq, good.rejected) == ([4], None, [])

    asyncio.run(scenario())
    assert prompts_in(inbox) == ["prompt 1", "prompt 3", "prompt 4"]


def test_the_write_engine_isolates_a_failing_function_from_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails for a reason that is not the DB's is run again one function at a
    time: the others commit, only the guilty caller gets RowRejected, and the DB is not
    reported broken. A DB fault (a locked DB) fails every caller with OutboxError."""
    from ai_agent_proxy.errors import OutboxError, RowRejected
    from ai_agent_proxy.outbox.engine import WriteEngine

    db = tmp_path / "e.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (v INTEGER NOT NULL)")
    committed: list[int] = []

    def insert(v: int | None) -> Callable[[sqlite3.Connection], int]:
        return lambda c: c.execute("INSERT INTO t VALUES (?)", (v,)).lastrowid

    async def scenario() -> None:
        engine = WriteEngine(db, on_committed=lambda batch: committed.append(len(batch)))
        await engine.open()
        try:
            results = await asyncio.gather(
                *(engine.run(insert(v)) for v in (1, 2, None, 4)), return_exceptions=True
            )
            assert [isinstance(r, int) for r in results] == [True, True, False, True]
            assert isinstance(results[2], RowRejected) and "NOT NULL" in str(results[2])
            assert engine.last_error is None
            blocker = sqlite3.connect(db, timeout=0)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(OutboxError) as err:
                    await engine.run(insert(5))
                assert not isinstance(err.value, RowRejected)
                assert engine.last_error and "locked" in engine.last_error
            finally:
                blocker.rollback()
                blocker.close()
            assert await engine.run(insert(6))
            assert engine.last_error is None
        finally:
            await engine.close()

    from ai_agent_proxy import db as db_module

    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 200)  # the locked case fails fast
    asyncio.run(scenario())
    with sqlite3.connect(db) as conn:
        assert [v for (v,) in conn.execute("SELECT v FROM t ORDER BY rowid")] == [1, 2, 4, 6]


def test_the_write_engine_refuses_work_once_closed(tmp_path) -> None:
    """run() after close() raises instead of waiting for ever."""
    import asyncio

    from ai_agent_proxy.errors import OutboxError
    from ai_agent_proxy.outbox.engine import WriteEngine

    async def scenario() -> None:
        engine = WriteEngine(tmp_path / "db.sqlite")
        await engine.open()
        assert await engine.run(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1
        await engine.close()
        with pytest.raises(OutboxError, match="is closed"):
            await asyncio.wait_for(engine.run(lambda conn: 1), 5)

    asyncio.run(scenario())


def sql(tmp_path: Path, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """One statement on the test's DB, from a connection of its own."""
    with contextlib.closing(sqlite3.connect(tmp_path / "o.db", isolation_level=None)) as conn:
        return conn.execute(statement, params).fetchall()


def written_in_db(tmp_path: Path) -> int:
    return sql(tmp_path, "SELECT count(*) FROM requests WHERE state = 'written'")[0][0]


def unrenderable() -> NewRequest:
    """A row no file can be made of: its stored body is not JSON and, the first of its
    conversation, its file would carry the body."""
    rid, ms = new_request_id()
    return NewRequest(
        id=rid, received_ms=ms, body=b"{not json", segments=[b"{not json"],
        context_id="x:1", channel="x", target="1", latest_user_prompt="bad",
    )  # fmt: skip


def run_flusher(
    tmp_path: Path, scenario: Callable[..., Any], *, report: bool = True, **settings_flags: str
) -> Path:
    """`scenario(outbox, flusher, latencies)` with a real outbox, flusher and writer
    process on a fresh DB and inbox in tmp_path (latencies reported unless `report` is
    False, as a flusher without metrics); returns the inbox."""
    inbox = tmp_path / "inbox"
    settings = load_settings(
        None, {"inbox": str(inbox), "db": str(tmp_path / "o.db"), **settings_flags}
    )
    migrate(settings.db_path)

    async def run() -> None:
        outbox = Outbox(settings.db_path, settings.dedup_window)
        await outbox.open()
        latencies: list[float] = []
        flusher = Flusher(outbox, settings, on_written=latencies.append if report else None)
        outbox.listen(flusher.hand, flusher.wake)
        try:
            await scenario(outbox, flusher, latencies)
        finally:
            await flusher.stop()
            await outbox.close()

    asyncio.run(run())
    return inbox


def test_rows_go_from_their_commit_to_a_file_in_memory(tmp_path: Path) -> None:
    """Normal traffic: every row is handed over by its commit (none dropped, handed rows
    in charge), written in order, and each file's latency reported once."""

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        flusher.start()
        for n in range(30):
            await outbox.record(request(n))
        await wait_for(lambda: flusher.status.files_written == 30)
        await wait_for(lambda: written_in_db(tmp_path) == 30)  # marked as they go
        assert flusher._drops == 0 and flusher.source is flusher_module.Source.HANDED
        assert len(latencies) == 30 and all(0 <= s < 10 for s in latencies)

    inbox = run_flusher(tmp_path, scenario)
    assert prompts_in(inbox) == [f"prompt {n}" for n in range(30)]


def test_rows_committed_before_a_stop_are_written_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop writes what is committed and waiting before it ends, those beyond the
    handed rows' bound included (a flusher without a latency callback, as in tests)."""

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        rows = flusher_module.BATCH * 2 + 5  # several batches
        for n in range(rows):  # committed, handed over, not written: no flusher running
            await outbox.record(request(n))
        # in memory at most HANDED_MAX_ROWS of them; the rest are for claims
        assert len(flusher._handed) <= flusher_module.HANDED_MAX_ROWS and flusher._drops >= 1
        flusher.start()
        await flusher.stop()
        assert flusher.status.files_written == rows
        assert written_in_db(tmp_path) == rows

    monkeypatch.setattr(flusher_module, "HANDED_MAX_ROWS", 100)
    inbox = run_flusher(tmp_path, scenario, report=False)
    assert len(prompts_in(inbox)) == flusher_module.BATCH * 2 + 5


def test_a_row_no_file_can_be_made_of_ends_undeliverable_and_the_rest_flow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row whose stored body is not JSON (the first of its conversation, so its file
    would carry the body) is tried a few times, then undeliverable; the rows before and
    after it are written, in order, and the inbox is not reported failing."""

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        flusher.start()
        await outbox.record(request(0))
        bad = unrenderable()
        await outbox.record(bad)
        await outbox.record(request(2))
        await wait_for(lambda: flusher.status.files_written == 2)

        def state() -> str:
            return sql(tmp_path, "SELECT state FROM requests WHERE id = ?", bad.id)[0][0]

        await wait_for(lambda: state() == "undeliverable")
        assert flusher.status.consecutive_failures == 0 and flusher.status.write_failures == 0

    inbox = run_flusher(tmp_path, scenario)
    assert prompts_in(inbox) == ["prompt 0", "prompt 2"]
    said = [r.getMessage().split(" ")[0] for r in caplog.records if "inbox_row" in r.getMessage()]
    assert said == ["inbox_row_failed", "inbox_row_failed", "inbox_row_undeliverable"]


def test_a_backend_wait_left_behind_is_delivered_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A row still waiting for a backend long after any backend call could have ended (its
    worker died mid-call) is delivered without a reply by the idle flusher, said once a
    row; idle polls that find none say nothing."""
    monkeypatch.setattr(flusher_module, "IDLE_POLL_S", 0.05)
    monkeypatch.setattr(flusher_module, "STALE_BACKEND_MARGIN_S", 1.0)
    limit_ms = 2_000  # backend_timeout 0.5 s, twice, and the margin

    def left_waiting(prompt: str, age_ms: int) -> NewRequest:
        rid, ms = new_request_id()
        return NewRequest(
            id=rid, received_ms=ms - age_ms, body=b'{"messages": []}',
            segments=[b'{"messages": []}'], latest_user_prompt=prompt, awaiting_backend=True,
        )  # fmt: skip

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        flusher.start()
        await outbox.record(left_waiting("left waiting", 10_000))
        await wait_for(lambda: flusher.status.files_written == 1)
        # stale in 1 s: some twenty idle polls find nothing first
        await outbox.record(left_waiting("left later", limit_ms - 1_000))
        await wait_for(lambda: flusher.status.files_written == 2)

    inbox = run_flusher(tmp_path, scenario, url="http://127.0.0.1:9/v1", backend_timeout="0.5")
    payloads = [json.loads(p.read_text()) for p in sorted(inbox.glob("*.json"))]
    assert [p["latest-user-prompt"] for p in payloads] == ["left waiting", "left later"]
    assert all(p["backend-llm-error"] == "interrupted" for p in payloads)
    said = [r.getMessage() for r in caplog.records if "backend_wait_expired" in r.getMessage()]
    assert said == ["backend_wait_expired rows=1 delivered_without_reply"] * 2


def test_a_handed_row_near_its_lease_end_is_claimed_again_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row handed over long ago (its lease half run out) is leased again by a claim
    before it is written, so that no other worker takes it over meanwhile; fresh rows are
    written straight from memory."""
    import logging

    caplog.set_level(logging.DEBUG, "ai_agent_proxy.flusher")
    near_end = "a handed row near the end of its lease"

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        flusher.start()
        for n in range(3):
            await outbox.record(request(n))
        await wait_for(lambda: flusher.status.files_written == 3)
        assert near_end not in caplog.text
        rid, ms = new_request_id()
        old = NewRequest(
            id=rid, received_ms=ms - flusher_module.CLAIM_LEASE_MS, body=b'{"messages": []}',
            segments=[b'{"messages": []}'], latest_user_prompt="old",
        )  # fmt: skip
        await outbox.record(old)
        await wait_for(lambda: flusher.status.files_written == 4)
        assert near_end in caplog.text

    run_flusher(tmp_path, scenario)


def test_rows_whose_mark_failed_are_marked_before_the_next_claim(tmp_path: Path) -> None:
    """The DB refuses to mark a written batch (a real refusal: a trigger, dropped later).
    Those rows are still pending and leased to this flusher, so its next claim would take
    them again: it marks them first, and no file is written twice or left unreported."""

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        flusher.start()
        for n in range(3):
            await outbox.record(request(n))
        await wait_for(lambda: written_in_db(tmp_path) == 3)
        sql(
            tmp_path,
            "CREATE TRIGGER refuse_mark BEFORE UPDATE OF state ON requests"
            " WHEN NEW.state = 'written' BEGIN SELECT RAISE(ABORT, 'mark refused'); END",
        )
        for n in range(3, 6):
            await outbox.record(request(n))
        # Refused twice: the mark after a batch, then the one before the next claim (no
        # claim until it goes through; the rows after it wait).
        await wait_for(lambda: flusher.status.consecutive_failures >= 2)
        assert "mark refused" in (flusher.status.last_error or "")
        assert 3 < flusher.status.files_written <= 6
        sql(tmp_path, "DROP TRIGGER refuse_mark")
        await wait_for(lambda: written_in_db(tmp_path) == 6)
        await wait_for(lambda: flusher.status.consecutive_failures == 0)
        assert flusher.status.files_written == 6 and len(latencies) == 6

    inbox = run_flusher(tmp_path, scenario)
    assert prompts_in(inbox) == [f"prompt {n}" for n in range(6)]


def test_a_failed_write_gives_back_the_lease_on_every_row_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inbox fails at a batch's first row: the failure is recorded on that row, and
    every row of the batch is released (another worker may take them while this one
    waits to retry). Once the inbox works they are written, in order."""
    monkeypatch.setattr(flusher_module, "BACKOFF_FIRST_S", 60.0)  # one failure, then a wait

    def leases() -> list[tuple[Any, ...]]:
        return sql(
            tmp_path, "SELECT latest_user_prompt, claimed_by, attempts FROM requests ORDER BY seq"
        )

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        inbox = tmp_path / "inbox"
        inbox.write_text("in the way")  # a file where the inbox directory should be
        for n in range(5):
            await outbox.record(request(n))
        assert [holder for _, holder, _ in leases()] == [outbox.token] * 5  # leased at commit
        flusher.start()
        await wait_for(lambda: flusher.status.consecutive_failures == 1)
        assert leases() == [("prompt 0", None, 1)] + [
            (f"prompt {n}", None, 0) for n in (1, 2, 3, 4)
        ]
        inbox.unlink()
        # the stop ends the wait and writes what is pending

    inbox = run_flusher(tmp_path, scenario)
    assert prompts_in(inbox) == [f"prompt {n}" for n in range(5)]


def test_files_written_beside_a_rejected_row_count_once_when_its_failure_is_refused(
    tmp_path: Path,
) -> None:
    """The writer rejects one row of a batch and the DB refuses to record that (a trigger,
    dropped later). The batch's other files are in the inbox: they are counted and marked
    as written, never written again by the retry."""

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        await outbox.record(request(0))
        bad = unrenderable()
        await outbox.record(bad)
        await outbox.record(request(2))
        sql(
            tmp_path,
            "CREATE TRIGGER refuse_failure BEFORE UPDATE OF row_failures ON requests"
            " BEGIN SELECT RAISE(ABORT, 'failure refused'); END",
        )
        flusher.start()  # one batch of the three
        await wait_for(lambda: flusher.status.consecutive_failures >= 2)
        assert "failure refused" in (flusher.status.last_error or "")
        assert flusher.status.files_written == 2 and len(latencies) == 2
        sql(tmp_path, "DROP TRIGGER refuse_failure")
        await wait_for(lambda: written_in_db(tmp_path) == 2)
        await wait_for(lambda: flusher.status.consecutive_failures == 0)
        assert flusher.status.files_written == 2 and len(latencies) == 2

    inbox = run_flusher(tmp_path, scenario)
    assert prompts_in(inbox) == ["prompt 0", "prompt 2"]


def test_files_renamed_before_a_failed_rename_are_not_written_again(tmp_path: Path) -> None:
    """A directory in the way of the third file's name: the two before it are in place,
    marked written, and never written again (an agent that took them would get them
    twice); the rest follow once the way is clear."""

    async def scenario(outbox: Outbox, flusher: Flusher, latencies: list[float]) -> None:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        rows = [request(n) for n in range(5)]
        for row in rows:
            await outbox.record(row)
        names = [inbox_file_name(r.id, r.received_ms) for r in rows]
        (inbox / names[2]).mkdir()
        flusher.start()  # one batch of the five
        await wait_for(lambda: flusher.status.consecutive_failures >= 2)
        assert flusher.status.files_written == 2 and written_in_db(tmp_path) == 2
        first = [(inbox / n).stat().st_ino for n in names[:2]]
        (inbox / names[2]).rmdir()
        await wait_for(lambda: written_in_db(tmp_path) == 5)
        assert [(inbox / n).stat().st_ino for n in names[:2]] == first
        assert flusher.status.files_written == 5

    inbox = run_flusher(tmp_path, scenario)
    assert prompts_in(inbox) == [f"prompt {n}" for n in range(5)]
