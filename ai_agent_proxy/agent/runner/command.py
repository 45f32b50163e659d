"""What a run is started with: its argv (the preset's or the person's own, the placeholders
filled, the prompt at most one whole argument), its environment (the runner's, our
secrets taken out, the run's ids added: nothing from a message but ids), and the command
as its record shows it (secrets masked). Pure but for the prompt file it writes.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from ...config import SECRET_KEYS, Settings
from ...ids import inbox_file_name
from ..conversations import Message
from . import launch
from .options import Options

_KEYLIKE_FLAG = re.compile(r"(?i)^--?[\w-]*(key|token|secret|passw|pwd|auth)[\w-]*$")
_OUR_SECRETS = {f"AI_AGENT_PROXY_{k}" for k in SECRET_KEYS}  # never the agent's to read


def unfilled(options: Options, session: str | None) -> list[str]:
    """The run's argv, its placeholders not filled yet: the preset's or the command."""
    if options.adapter is not None:
        return options.adapter.argv(None, list(options.preset_args), session)
    return list(options.command)


def fill(argv: list[str], text: str, prompt_file: Path, session: str) -> list[str]:
    """The argv with its placeholders filled (launch.fill_argv); `{prompt_file}` written
    for the run, owner-only from its creation (the runner removes it after the run)."""
    if "{prompt_file}" in argv:
        prompt_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(prompt_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    return launch.fill_argv(argv, text, prompt_file, session)


def environment(
    settings: Settings,
    options: Options,
    run_id: str,
    key: str,
    messages: list[Message],
    stable: str,
) -> dict[str, str]:
    """The child's environment: the runner's (its PATH finds `ai-agent-proxy` and
    `openclaw` as the person's shell does), our secrets taken out, and the ids of this
    run; nothing from a message but ids."""
    env = {k: v for k, v in os.environ.items() if k not in _OUR_SECRETS}
    inbox = settings.inbox
    files = [str(inbox / inbox_file_name(m.request_id, m.received_ms)) for m in messages]
    env.update(
        AIAP_CONTEXT_ID="" if key.startswith("request:") else key,
        AIAP_REQUEST_IDS=" ".join(m.request_id for m in messages),
        AIAP_NEWEST_REQUEST_ID=messages[-1].request_id,
        AIAP_INBOX_FILES=" ".join(files),
        AIAP_DB=str(settings.db_path),
        AIAP_INBOX=str(inbox),
        AIAP_RUN_ID=run_id,
        AIAP_SESSION=stable,
        # `ai-agent-proxy reply` in the agent's shell uses this runner's DB and inbox
        AI_AGENT_PROXY_DB=str(settings.db_path),
        AI_AGENT_PROXY_INBOX=str(inbox),
    )
    if options.adapter is not None:
        env.update(options.adapter.env)
    return env


def masked(argv: Sequence[str], redact: Callable[[str], str]) -> list[str]:
    """The command as recorded: the configured secrets masked, and the value of a
    key-like flag (`--api-key X`, `--token=X`); the prompt, if it is an argument,
    shortened."""
    out, hide = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide:
            shown = "****"
        elif eq and _KEYLIKE_FLAG.match(flag):
            shown = f"{flag}=****"  # --api-key=VALUE
        else:
            shown = redact(arg)
        out.append(shown if len(shown) <= 200 else shown[:200] + "…")
        hide = bool(_KEYLIKE_FLAG.match(arg))
    return out


def parse_preset_args(text: str | None) -> tuple[str, ...]:
    """`--preset-args '--allowedTools Bash'`: split as a shell would, never run by one."""
    return tuple(shlex.split(text)) if text else ()
