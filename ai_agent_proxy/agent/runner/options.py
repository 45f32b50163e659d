"""The runner's options (`ai-agent-proxy agent ...`; cli_agent.py reads them), with the
defaults SPEC section 8 documents."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..conversations import LEASE_S
from .adapters import PRESETS, Adapter


@dataclass(frozen=True)
class Options:
    command: tuple[str, ...] = ()  # `-- CMD ARGS...`
    preset: str | None = None
    preset_args: tuple[str, ...] = ()
    parallel: int = 2
    debounce_s: float = 1.0
    timeout_s: float = 1800.0
    idle_timeout_s: float | None = None
    grace_s: float = 30.0
    attempts: int = 2
    retry_after_s: float = 15.0  # the first backoff; doubled after each failure
    send_output: bool = False
    workdir: Path = field(default_factory=Path.cwd)
    prompt_template: str | None = None
    name: str = field(default_factory=lambda: f"runner@{socket.gethostname()}")
    lease_s: float = LEASE_S

    @property
    def agent(self) -> str:
        """The sessions' key: the preset, or the command's program."""
        return self.preset or f"command:{Path(self.command[0]).name}"

    @property
    def adapter(self) -> Adapter | None:
        return PRESETS[self.preset] if self.preset else None
