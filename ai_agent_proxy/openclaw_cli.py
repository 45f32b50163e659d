"""OpenClaw's own CLI, for `setup` and `doctor`: its config is changed and read only through
it (`openclaw config patch --stdin`, one validated write; `config get`, `config file`,
`config validate`), never by JSON code of ours. A patch goes on standard input, so the key
it holds is never on a command line. Facts of OpenClaw 2026.9.6 relied on (SPEC section 9):
`config patch` merges objects, replaces arrays and scalars, prints "Applied N config
update(s)…", and exits 1 with "Config validation failed: …" leaving the file as it was;
`config get PATH` prints a scalar raw and JSON otherwise, redacts every `apiKey` as
`__OPENCLAW_REDACTED__`, and exits 1 for an unset path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_S = 60.0  # its start-up alone is a second or several
REDACTED = "__OPENCLAW_REDACTED__"


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def said(self) -> str:
        """Its last meaningful line (errors first): what to show a person."""
        lines = [ln.strip() for ln in (self.err + "\n" + self.out).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "fail" in ln.lower() or "error" in ln.lower()]
        return (errors or lines or [f"exit status {self.code}"])[-1][:500]


def found(binary: str) -> str | None:
    """The CLI's path, or None when it is not installed (not on PATH)."""
    return shutil.which(binary)


def run(binary: str, *args: str, stdin: str | None = None, timeout: float = TIMEOUT_S) -> Ran:
    try:
        done = subprocess.run(
            [binary, *args], input=stdin if stdin is not None else "", capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
    except FileNotFoundError:
        return Ran(127, "", f"{binary}: not found (set OPENCLAW_BIN)")
    except OSError as exc:
        return Ran(126, "", f"{binary}: cannot run it: {exc.strerror or exc}")
    except subprocess.TimeoutExpired:
        return Ran(124, "", f"{binary} {' '.join(args[:2])} did not finish in {timeout:.0f} s")
    return Ran(done.returncode, done.stdout, done.stderr)


def version(binary: str) -> str | None:
    ran = run(binary, "--version")
    line = ran.out.strip().splitlines()[0] if ran.ok and ran.out.strip() else ""
    return line or None


def config_file(binary: str) -> Path | None:
    """The config file OpenClaw reads (`openclaw config file`)."""
    ran = run(binary, "config", "file")
    lines = [ln.strip() for ln in ran.out.splitlines() if ln.strip()]
    return Path(lines[-1]).expanduser() if ran.ok and lines else None


def config_get(binary: str, path: str) -> tuple[bool, Any]:
    """(set, value) of a config path: JSON when it is, else the raw scalar text."""
    ran = run(binary, "config", "get", path)
    if not ran.ok:
        return False, None
    text = ran.out.strip()
    try:
        return True, json.loads(text)
    except ValueError:
        return True, text


def patch(binary: str, changes: dict[str, Any]) -> Ran:
    """One validated write of `changes` (merged into OpenClaw's config)."""
    return run(binary, "config", "patch", "--stdin", stdin=json.dumps(changes))


def validate(binary: str) -> Ran:
    return run(binary, "config", "validate")
