"""Each agent CLI's adapter reads the output the real CLI printed (tests/fixtures/agents/,
captured from Claude Code 2.1.332, Codex 0.169.1, opencode 1.18.33 and Gemini CLI 0.61.0
against a fake model: first runs, resumes, unknown sessions, SIGTERM mid-run, the model
down or answering 500), and makes the argv of a first run and of a resumed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ai_agent_proxy.agent.runner.adapters import PRESETS, Result, read_plain

CAPTURES = Path(__file__).parent / "fixtures" / "agents"


def captured(cli: str, name: str) -> Result:
    base = CAPTURES / cli / name
    meta = json.loads(base.with_suffix(".meta.json").read_text())
    code = meta["exit_code"]
    return PRESETS[cli].read(
        base.with_suffix(".stdout").read_text(), base.with_suffix(".stderr").read_text(),
        code if code >= 0 else 128 - code,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("cli", "name", "answer", "session"),
    [
        ("claude", "01-json", "ANSWER-FROM-FAKE-LLM", "d439380e-edde-44ce-97be-b84ba63aeb7d"),
        ("claude", "03-resume-json", "SECOND-ANSWER-FROM-FAKE-LLM",
         "d439380e-edde-44ce-97be-b84ba63aeb7d"),
        ("codex", "01-exec-json", "ANSWER-FROM-FAKE-LLM", "01a249e4-44cf-7c02-a7b5-8c046fb520b4"),
        ("codex", "02-exec-resume-json", "SECOND-ANSWER-FROM-FAKE-LLM",
         "01a249e4-44cf-7c02-a7b5-8c046fb520b4"),
        ("opencode", "01-run-json", "ANSWER-FROM-FAKE-LLM", "ses_db613eca8ffeF2ICONlWbsRdHF"),
        ("opencode", "02-run-json-resume-session", "SECOND-ANSWER-FROM-FAKE-LLM",
         "ses_db613eca8ffeF2ICONlWbsRdHF"),
        ("gemini", "01-prompt-json", "ANSWER-FROM-FAKE-LLM",
         "fbb61a4a-8910-4ea8-bf8c-daac1de9d222"),
        ("gemini", "02-resume-by-session-id-json", "SECOND-ANSWER-FROM-FAKE-LLM",
         "fbb61a4a-8910-4ea8-bf8c-daac1de9d222"),
    ],
)  # fmt: skip
def test_the_answer_and_session_of_a_run(cli: str, name: str, answer: str, session: str) -> None:
    found = captured(cli, name)
    assert (found.answer, found.session_id, found.failed) == (answer, session, None)
    assert found.tokens and not found.resume_refused


def test_what_a_run_cost() -> None:
    assert captured("claude", "01-json").cost_usd == pytest.approx(0.0006)
    assert captured("claude", "01-json").tokens == 110
    assert captured("codex", "01-exec-json").tokens == 110
    assert captured("opencode", "01-run-json").tokens == 110
    assert captured("gemini", "01-prompt-json").tokens == 220  # the router's call and the turn


@pytest.mark.parametrize(
    ("cli", "name"),
    [("claude", "06-resume-unknown-id"), ("codex", "04-exec-resume-unknown-id"),
     ("opencode", "03-run-json-unknown-session"), ("gemini", "06-resume-unknown-id-json")],
)  # fmt: skip
def test_an_unknown_session_is_told_apart(cli: str, name: str) -> None:
    found = captured(cli, name)
    assert found.resume_refused and found.answer is None and found.failed


@pytest.mark.parametrize(
    ("cli", "name", "why"),
    [
        # killed by SIGTERM: no answer (gemini killed as a group exits 0, with half a stream)
        ("claude", "21-sigterm-json", "exit status 143"),
        ("codex", "20-sigterm-mid-stream", "exit status 143"),
        ("opencode", "20-sigterm-mid-stream", "exit status 143"),
        ("gemini", "21-sigterm-mid-stream-json", None),
        # the model down or failing: claude's is_error even with subtype "success"
        ("claude", "31-server-down-json-max-retries-0", "API Error: Connection refused"),
        ("codex", "32-http500", "high demand"),
        ("opencode", "32-http500", "fake server error"),
        ("gemini", "32-http500-json", "fake server error"),
    ],
)
def test_a_failed_or_killed_run_gives_no_answer(cli: str, name: str, why: str | None) -> None:
    found = captured(cli, name)
    if name == "21-sigterm-mid-stream-json":  # (this capture's SIGTERM went to the top
        return  # process only, which ignored it: it ran to the end; see the group case below)
    assert found.answer is None and not found.resume_refused
    if why:
        assert found.failed and why in found.failed, found.failed


def test_gemini_stopped_as_a_group_exits_0_with_no_answer() -> None:
    base = CAPTURES / "gemini" / "23-sigterm-process-group-stream-json"
    found = PRESETS["gemini"].read(base.with_suffix(".stdout").read_text(), "", 0)
    assert found.answer is None


def test_half_a_json_line_printed_when_killed_is_skipped() -> None:
    events = (CAPTURES / "codex" / "02-exec-resume-json.stdout").read_text()
    cut = events + '{"type":"item.completed","item":{"type":"agent_mess'
    assert PRESETS["codex"].read(cut, "", -9).answer == "SECOND-ANSWER-FROM-FAKE-LLM"
    first = (CAPTURES / "claude" / "01-json.stdout").read_text()
    assert PRESETS["claude"].read(first[: len(first) // 2], "", 143).answer is None


@pytest.mark.parametrize(
    ("preset", "first", "resumed"),
    [
        ("claude", ["claude", "-p", "--output-format", "json", "--x"],
         ["claude", "-p", "--output-format", "json", "--x", "--resume", "S"]),
        ("codex", ["codex", "exec", "--json", "--skip-git-repo-check", "--x", "-"],
         ["codex", "exec", "resume", "--json", "--skip-git-repo-check", "--x", "S", "-"]),
        ("opencode", ["opencode", "run", "--format", "json", "--x"],
         ["opencode", "run", "--format", "json", "--x", "--session", "S"]),
        ("gemini", ["gemini", "-o", "json", "--x"],
         ["gemini", "-o", "json", "--x", "--resume", "S"]),
    ],
)  # fmt: skip
def test_the_argv_of_a_first_and_a_resumed_run(preset: str, first: list, resumed: list) -> None:
    adapter = PRESETS[preset]
    assert adapter.argv(None, ["--x"], None) == first
    assert adapter.argv(None, ["--x"], "S") == resumed
    assert adapter.argv("/opt/bin/" + preset, [], None)[0] == "/opt/bin/" + preset


def test_a_command_of_ones_own_answers_with_its_output() -> None:
    assert read_plain("  Hello there\n", "", 0) == Result(answer="Hello there")
    assert read_plain('{"result": "from json", "x": 1}', "", 0).answer == "from json"
    assert read_plain('{"result": "oops", "is_error": true}', "", 0).failed == "oops"
    assert read_plain("", "", 0).answer is None
    assert read_plain("partial", "boom\n", 3).failed == "boom"
    assert read_plain("", "", 2).failed == "exit status 2"


# -- beside the captures: hand-built variants of the same shapes, for what they left out --


def read(cli: str, stdout: str, stderr: str = "", code: int = 0) -> Result:
    return PRESETS[cli].read(stdout, stderr, code)


def lines(*events: object) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


def test_claude_odd_fields_and_its_stream_json_shape() -> None:
    # a result that is not text, a cost that is a boolean: no answer, no cost, no crash
    odd = read("claude", json.dumps({"result": 123, "total_cost_usd": True, "session_id": "s"}))
    assert (odd.answer, odd.cost_usd, odd.session_id) == (None, None, "s")
    # one object without a type (as --output-format json prints it)
    assert read("claude", json.dumps({"result": "hi", "session_id": "s"})).answer == "hi"
    # --output-format stream-json: the `result` event among others
    stream = lines({"type": "system", "subtype": "init", "session_id": "s"},
                   {"type": "assistant", "message": {"content": []}},
                   {"type": "result", "result": "from the stream", "session_id": "s"})  # fmt: skip
    assert read("claude", stream).answer == "from the stream"


def test_codex_answer_is_the_agent_message_not_reasoning_and_usage_only_from_the_turn() -> None:
    events = lines(
        {"type": "thread.started", "thread_id": "t1"},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "the answer"}},
        {"type": "item.completed", "item": {"type": "reasoning", "text": "**thinking**"}},
        {"type": "item.started", "item": {"type": "agent_message", "text": "not done yet"}},
        {"type": "turn.completed", "usage": {"input_tokens": 7, "output_tokens": 3}},
        {"type": "other", "usage": {"input_tokens": 1000, "output_tokens": 1000}},
    )
    found = read("codex", events)
    assert (found.answer, found.session_id, found.tokens) == ("the answer", "t1", 10)


def test_opencode_text_parts_only_its_cost_summed_and_no_text_no_answer() -> None:
    def event(kind: str, **part: object) -> dict[str, object]:
        return {"type": kind, "sessionID": "ses_1", "part": part}

    events = lines(
        event("step_start"),
        event("text", text="first"),
        event("step_finish", cost=0.0012, tokens={"total": 30}),
        event("step_start"),
        event("tool_use", text="a tool's own text"),
        event("text", text=""),
        event("text", text="second"),
        event("step_finish", cost=0.0003, tokens={"total": 12}),
    )
    found = read("opencode", events)
    assert found.answer == "second"  # the last step's text
    assert found.cost_usd == pytest.approx(0.0015) and found.tokens == 42
    silent = read("opencode", lines(event("step_start"), event("step_finish", cost=0)))
    assert (silent.answer, silent.cost_usd, silent.failed) == (None, None, None)


def test_gemini_an_error_beside_a_response_is_a_failure() -> None:
    both = read("gemini", json.dumps({"response": "partial", "session_id": "g",
                                      "error": {"message": "quota exceeded"}}))  # fmt: skip
    assert (both.answer, both.failed, both.session_id) == (None, "quota exceeded", "g")
    empty = read("gemini", json.dumps({"session_id": "g"}), "a warning\nthe real reason\n", 1)
    assert (empty.answer, empty.failed) == (None, "the real reason")
    fine = read("gemini", json.dumps({"response": "ok", "session_id": "g"}), "a warning\n")
    assert (fine.answer, fine.failed) == ("ok", None)
