"""`ai-agent-proxy setup`: the proxy hooked into OpenClaw in one command, safe to run twice.

1. The settings file (./.ai-agent-proxy.conf, or -f FILE): written if missing, 0600, with
   a random KEY and a holding REPLY (OpenClaw treats an empty answer as a failure); an
   existing file keeps every value, and only gets what it lacks.
2. OpenClaw's config, through its own CLI (openclaw_cli.py): the provider
   `models.providers.<name>` pointing at this server with KEY as its apiKey; with
   `default_model`, the agents' primary model; with `dm_scope`, one session per person's
   chat; then `openclaw config validate`. A failed validation leaves OpenClaw's file as it
   was, byte for byte. `dry_run` prints the patch (the key masked) and changes nothing.

The patch is built by a pure function; the key never reaches a command line or the output.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import openclaw_cli
from .config import DEFAULT_CONFIG_FILE, Settings, load_settings, parse_config_file
from .errors import SetupFailed

PROVIDER = "ai-agent-proxy"  # models.providers.<this>; the model is "<this>/<MODEL_ID>"
HOLDING_REPLY = "On it - I'll reply in a moment."
DM_SCOPE = "per-channel-peer"


@dataclass(frozen=True)
class Plan:
    settings_file: Path
    provider: str = PROVIDER
    default_model: bool = False
    dm_scope: bool = False
    dry_run: bool = False


def settings_lines(existing: dict[str, str]) -> list[str]:
    """The lines a settings file lacks: a random KEY, a holding REPLY."""
    lines = []
    if not existing.get("KEY"):
        lines.append(f'KEY="{secrets.token_urlsafe(24)}"')
    if "REPLY" not in existing:
        lines.append(f'REPLY="{HOLDING_REPLY}"')
    return lines


def ensure_settings_file(path: Path, dry_run: bool) -> Iterator[str]:
    """Write the settings file if missing (0600), add what it lacks, keep what it has."""
    existing: dict[str, str] = {}
    if path.is_file():
        text = path.read_text(encoding="utf-8-sig")
        existing = {k: v.value for k, v in parse_config_file(text, str(path)).items()}
    added = settings_lines(existing)
    names = ", ".join(line.split("=", 1)[0] for line in added)
    if dry_run:
        if not path.exists():
            yield f"would write {path} with {names}"
        else:
            yield f"would add {names} to {path}" if added else f"{path} has what it needs"
        return
    if not path.exists():
        header = "# Written by `ai-agent-proxy setup`: KEY is shared with OpenClaw's provider.\n"
        _write_private(path, header + "".join(f"{line}\n" for line in added))
        yield f"wrote {path} (mode 0600) with {names}"
        return
    if added:
        with path.open("a", encoding="utf-8") as out:
            text = path.read_text(encoding="utf-8")
            out.write(("" if text.endswith("\n") or not text else "\n") + "".join(
                f"{line}\n" for line in added))  # fmt: skip
        yield f"added {names} to {path} (its other values kept)"
    else:
        yield f"kept {path} as it is"
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
        yield f"made {path} readable by you only (it holds KEY)"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def base_url(settings: Settings) -> str:
    """Where OpenClaw reaches this server."""
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/v1"


def openclaw_patch(settings: Settings, plan: Plan) -> dict[str, Any]:
    """The change to OpenClaw's config (pure). `apiKey` is KEY (anything, when KEY is not
    set: OpenClaw sends it, the proxy does not check it)."""
    changes: dict[str, Any] = {
        "models": {"providers": {plan.provider: {
            "api": "openai-completions",
            "baseUrl": base_url(settings),
            "apiKey": settings.key or "no-key-set",
            "models": [{"id": settings.model_id, "name": "your agent, via ai-agent-proxy"}],
        }}},
    }  # fmt: skip
    if plan.default_model:
        changes["agents"] = {"defaults": {"model": {"primary": model_ref(settings, plan)}}}
    if plan.dm_scope:
        changes["session"] = {"dmScope": DM_SCOPE}
    return changes


def model_ref(settings: Settings, plan: Plan) -> str:
    return f"{plan.provider}/{settings.model_id}"


def masked(changes: dict[str, Any]) -> dict[str, Any]:
    """The patch as shown: every apiKey as ****."""
    return {
        k: ("****" if k == "apiKey" else masked(v) if isinstance(v, dict) else v)
        for k, v in changes.items()
    }


def setup(plan: Plan, openclaw: str | None = None) -> Iterator[str]:
    """Do the plan, saying each step; SetupFailed (one line) when a step fails."""
    import json

    yield from ensure_settings_file(plan.settings_file, plan.dry_run)
    settings = _settings_of(plan.settings_file)
    binary = openclaw or settings.openclaw_bin
    changes = openclaw_patch(settings, plan)
    if plan.dry_run:
        yield "would patch OpenClaw's config (openclaw config patch --stdin) with:"
        yield json.dumps(masked(changes), indent=2)
        yield "nothing was changed (--dry-run)"
        return
    if openclaw_cli.found(binary) is None:
        raise SetupFailed(
            f"the openclaw CLI ({binary}) is not on PATH: install OpenClaw, or set OPENCLAW_BIN"
        )
    path = openclaw_cli.config_file(binary)
    before = path.read_bytes() if path is not None and path.is_file() else None
    patched = openclaw_cli.patch(binary, changes)
    if not patched.ok:
        raise SetupFailed(f"OpenClaw refused the change, its config is unchanged: {patched.said}")
    checked = openclaw_cli.validate(binary)
    if not checked.ok:
        _put_back(path, before)
        raise SetupFailed(
            f"openclaw config validate failed after the change, so its config was put back as"
            f" it was: {checked.said}"
        )
    said = patched.said
    yield (
        f"OpenClaw's config ({path}): provider {plan.provider} -> {base_url(settings)}"
        + (f", the agents' model {model_ref(settings, plan)}" if plan.default_model else "")
        + (f", session.dmScope {DM_SCOPE}" if plan.dm_scope else "")
        + f" ({said})"
    )
    yield f"openclaw config validate: {checked.said}"
    # OpenClaw's hint after a patch: "No gateway restart needed.", "Change will apply
    # without restarting the gateway." or "Restart the gateway to apply." (or none known)
    if not re.search(r"(?i)no gateway restart needed|without restart", said):
        yield f"next: restart the gateway so it takes the change: {binary} gateway restart"


def _settings_of(path: Path) -> Settings:
    """The settings the server will run with: the file's (for a dry run of a file not
    written yet, what it would hold), the environment over them."""
    if path.is_file():
        return load_settings(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        would = Path(tmp) / "would.conf"
        would.write_text("".join(f"{line}\n" for line in settings_lines({})))
        return load_settings(str(would))


def _put_back(path: Path | None, before: bytes | None) -> None:
    """OpenClaw's file as it was before the patch (or gone, if there was none)."""
    if path is None:
        return
    if before is None:
        path.unlink(missing_ok=True)
        return
    temp = path.with_name(f".{path.name}.aiap-restore")
    temp.write_bytes(before)
    os.chmod(temp, path.stat().st_mode & 0o777 if path.exists() else 0o600)
    os.replace(temp, path)


def default_file(config: str | None) -> Path:
    return Path(os.path.expanduser(config or DEFAULT_CONFIG_FILE)).absolute()
