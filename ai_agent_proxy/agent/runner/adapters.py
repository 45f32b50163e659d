"""One small adapter per agent CLI: the argv of a first run and of a resumed one, and how to
read the CLI's final answer, its session id, whether it failed, and what it cost, from
the output it really prints (captured from the real CLIs offline: Claude Code 2.1.332,
Codex 0.169.1, opencode 1.18.33, Gemini CLI 0.61.0; tests/fixtures/agents/). The
scheduler knows none of them. Pure: no I/O.

Every preset takes the prompt on standard input and answers in JSON, so its final text
can be sent as the reply (`--send-output`) without giving the agent a shell: tool
permissions stay the person's choice (`--preset-args`, or their own `-- CMD`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Result:
    """What a run's output says: its final answer (None: none, and always None when it
    failed), the CLI's session id, why the CLI failed, its cost and tokens, and whether
    the stored session it was asked to resume was refused (then dropped, and the run
    tried fresh once)."""

    answer: str | None = None
    session_id: str | None = None
    failed: str | None = None
    cost_usd: float | None = None
    tokens: int | None = None
    resume_refused: bool = False


@dataclass(frozen=True)
class Adapter:
    """A CLI: `command` makes the argv of a run from the person's own flags and the
    session to resume (None: a first run); `read` reads its output."""

    name: str
    command: Callable[[list[str], str | None], list[str]]
    read: Callable[[str, str, int], Result]  # (stdout, stderr, exit status) -> Result
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, program: str | None, extra: list[str], session: str | None) -> list[str]:
        """The argv of a run (`program`: the CLI's path or name, when not its own)."""
        argv = self.command(extra, session)
        return [program, *argv[1:]] if program else argv


def _objects(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of JSONL output, one a line; a line that is not one (half a line
    printed when the CLI was killed, a log line) is skipped."""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def _whole_object(text: str) -> dict[str, Any] | None:
    """The output as one JSON object (pretty-printed or on one line), else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _trailing_object(text: str) -> dict[str, Any]:
    """The JSON object that ends `text` (a line that is just `{` opens it), else {}."""
    start = text.rfind("\n{")
    found = _whole_object(text[start + 1 :].strip()) if start != -1 else None
    return found or {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _refused(patterns: tuple[str, ...], stderr: str, exit_status: int) -> bool:
    return exit_status != 0 and any(p in stderr for p in patterns)


def read_claude(stdout: str, stderr: str, exit_status: int) -> Result:
    """`claude -p --output-format json`: one object; `result` is the answer, `is_error`
    says it failed (even with subtype "success"), `session_id`, `total_cost_usd`,
    `usage`. Killed (SIGTERM): exit 143 and no output at all."""
    found = _whole_object(stdout.strip()) or next(
        (o for o in _objects(stdout) if o.get("type") == "result"), None
    )
    refused = _refused(CLAUDE_REFUSES, stderr, exit_status)
    if found is None:
        return Result(failed=_last_line(stderr, exit_status), resume_refused=refused)
    usage = found.get("usage") if isinstance(found.get("usage"), dict) else {}
    tokens = sum(int(usage.get(k) or 0) for k in ("input_tokens", "output_tokens")) or None
    error = found.get("is_error") is True
    return Result(
        answer=None if error else _text(found.get("result")),
        session_id=_text(found.get("session_id")),
        failed=(_text(found.get("result")) or "is_error") if error else None,
        cost_usd=_number(found.get("total_cost_usd")),
        tokens=tokens,
        resume_refused=refused,
    )


def read_codex(stdout: str, stderr: str, exit_status: int) -> Result:
    """`codex exec --json`: JSONL events; the session is `thread.started`'s `thread_id`,
    the answer the last `item.completed` of type `agent_message`, a failure
    `turn.failed`; `turn.completed` has the usage."""
    session = answer = failed = None
    tokens = None
    for event in _objects(stdout):
        kind = event.get("type")
        item = event.get("item") if isinstance(event.get("item"), dict) else {}
        if kind == "thread.started":
            session = _text(event.get("thread_id")) or session
        elif kind == "item.completed" and item.get("type") == "agent_message":
            answer = _text(item.get("text")) or answer
        elif kind == "turn.failed":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            failed = _text(error.get("message")) or "turn.failed"
        elif kind == "turn.completed" and isinstance(event.get("usage"), dict):
            usage = event["usage"]
            tokens = sum(int(usage.get(k) or 0) for k in ("input_tokens", "output_tokens"))
    if failed is None and exit_status != 0 and answer is None:
        failed = _last_line(stderr, exit_status)
    return Result(
        answer=None if failed else answer,
        session_id=session,
        failed=failed,
        tokens=tokens or None,
        resume_refused=_refused(CODEX_REFUSES, stderr, exit_status),
    )


def read_opencode(stdout: str, stderr: str, exit_status: int) -> Result:
    """`opencode run --format json`: JSONL events, `sessionID` on every one; the answer is
    the `text` parts of the last step (a text is printed once its part completes), a
    failure an `error` event; `step_finish` parts have tokens and cost."""
    session = failed = None
    step: list[str] = []
    cost = 0.0
    tokens = 0
    for event in _objects(stdout):
        session = _text(event.get("sessionID")) or session
        kind = event.get("type")
        part = event.get("part") if isinstance(event.get("part"), dict) else {}
        if kind == "step_start":
            step = []
        elif kind == "text" and _text(part.get("text")):
            step.append(part["text"])
        elif kind == "step_finish":
            cost += _number(part.get("cost")) or 0.0
            counted = part.get("tokens") if isinstance(part.get("tokens"), dict) else {}
            tokens += int(_number(counted.get("total")) or 0)
        elif kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            data = error.get("data") if isinstance(error.get("data"), dict) else {}
            failed = _text(data.get("message")) or _text(error.get("name")) or "error"
    if failed is None and exit_status != 0 and not step:
        failed = _last_line(stderr, exit_status)
    return Result(
        answer=None if failed or not step else "\n\n".join(step),
        session_id=session,
        failed=failed,
        cost_usd=cost or None,
        tokens=tokens or None,
        resume_refused=_refused(OPENCODE_REFUSES, stderr, exit_status),
    )


def read_gemini(stdout: str, stderr: str, exit_status: int) -> Result:
    """`gemini -o json`: one pretty-printed object; `response` is the answer, `session_id`,
    `stats.models.*.tokens.total`. Errors go to stderr (a JSON object). Killed by a signal
    to its group it exits 0 with no answer: so no answer is no answer, whatever the exit."""
    found = _whole_object(stdout.strip())
    refused = _refused(GEMINI_REFUSES, stderr, exit_status)
    if found is None:
        error = _trailing_object(stderr).get("error")
        why = _text(error.get("message")) if isinstance(error, dict) else None
        return Result(failed=why or _last_line(stderr, exit_status), resume_refused=refused)
    models = (
        (found.get("stats") or {}).get("models") if isinstance(found.get("stats"), dict) else {}
    )
    tokens = sum(
        int(((m or {}).get("tokens") or {}).get("total") or 0)
        for m in (models.values() if isinstance(models, dict) else [])
        if isinstance(m, dict)
    )
    answer = _text(found.get("response"))
    error = found.get("error")
    failed = (_text(error.get("message")) if isinstance(error, dict) else None) or (
        None if answer else _last_line(stderr, exit_status)
    )
    return Result(
        answer=None if error else answer,
        session_id=_text(found.get("session_id")),
        failed=failed if (error or not answer) else None,
        tokens=tokens or None,
        resume_refused=refused,
    )


def read_plain(stdout: str, stderr: str, exit_status: int) -> Result:
    """A command of the person's own: its standard output is its answer; when that is one
    JSON object with a `result` string (`--output-format json`-style CLIs), that field."""
    found = _whole_object(stdout.strip())
    answer = _text(found.get("result")) if found is not None else _text(stdout.strip())
    if found is not None and found.get("is_error") is True:
        return Result(failed=_text(found.get("result")) or "is_error")
    if exit_status != 0:
        return Result(failed=_last_line(stderr, exit_status))
    return Result(answer=answer.strip() if answer else None)


def _last_line(stderr: str, exit_status: int) -> str | None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1].strip()[:500]
    return None if exit_status == 0 else f"exit status {exit_status}"


CLAUDE_REFUSES = ("No conversation found with session ID",)
CODEX_REFUSES = ("no rollout found for thread id", "thread/resume failed")
OPENCODE_REFUSES = ("Session not found",)
GEMINI_REFUSES = ("Error resuming session", "Invalid session identifier")


def claude(extra: list[str], session: str | None) -> list[str]:
    """`claude -p --output-format json [--resume ID]`, the prompt on stdin."""
    return [
        "claude",
        "-p",
        "--output-format",
        "json",
        *extra,
        *(["--resume", session] if session else []),
    ]


def codex(extra: list[str], session: str | None) -> list[str]:
    """`codex exec --json --skip-git-repo-check -`, resumed with a subcommand:
    `codex exec resume --json --skip-git-repo-check ID -` (`-`: the prompt on stdin)."""
    resume = ["resume"] if session else []
    return ["codex", "exec", *resume, "--json", "--skip-git-repo-check", *extra,
            *([session] if session else []), "-"]  # fmt: skip


def opencode(extra: list[str], session: str | None) -> list[str]:
    """`opencode run --format json [--session ID]`, the prompt on stdin (no message arg)."""
    return [
        "opencode",
        "run",
        "--format",
        "json",
        *extra,
        *(["--session", session] if session else []),
    ]


def gemini(extra: list[str], session: str | None) -> list[str]:
    """`gemini -o json [--resume ID]`, the prompt on stdin (no -p)."""
    return ["gemini", "-o", "json", *extra, *(["--resume", session] if session else [])]


PRESETS: dict[str, Adapter] = {
    "claude": Adapter("claude", claude, read_claude),
    "codex": Adapter("codex", codex, read_codex),
    "opencode": Adapter("opencode", opencode, read_opencode),
    # one process (no relaunched child), so that a signal reaches the one doing the work
    "gemini": Adapter("gemini", gemini, read_gemini, env={"GEMINI_CLI_NO_RELAUNCH": "true"}),
}
