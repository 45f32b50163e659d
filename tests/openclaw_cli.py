"""A stand-in for OpenClaw's CLI, for `setup` and `doctor`: a small real program on PATH that
keeps a real JSON config file (OPENCLAW_CONFIG_PATH, else $OPENCLAW_STATE_DIR/openclaw.json)
and does what OpenClaw 2026.9.6 does with it (SPEC section 9): `config patch --stdin`
merges objects, replaces arrays and scalars, deletes on null, validates, then writes
("Applied N config update(s)." and its hint, as OpenClaw words them: "No gateway restart
needed." when nothing changed, "Restart the gateway to apply." with FAKE_OPENCLAW_RESTART
set, else "Change will apply without restarting the gateway.");
invalid, it says "Config validation failed: ..." and exits 1, the file untouched; `config
get PATH` prints a scalar raw and JSON otherwise, every apiKey as __OPENCLAW_REDACTED__,
exit 1 when unset; `config file`; `config validate`; `--version`; `message send` (logged).

On demand: a file `<config>.invalid` makes every validation fail with its text. Each call's
argv (never its standard input) is appended to $FAKE_OPENCLAW_LOG.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

SOURCE = r"""
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
log = os.environ.get("FAKE_OPENCLAW_LOG")
if log:
    with open(log, "a") as out:
        out.write(json.dumps(args) + "\n")
state = os.environ.get("OPENCLAW_STATE_DIR") or os.path.expanduser("~/.openclaw")
path = Path(os.environ.get("OPENCLAW_CONFIG_PATH") or Path(state) / "openclaw.json")
SCOPES = ("main", "per-peer", "per-channel-peer", "per-account-channel-peer")


def load():
    return json.loads(path.read_text()) if path.exists() else {}


def problems(config):
    flag = Path(str(path) + ".invalid")
    if flag.exists():
        return [flag.read_text().strip() or "invalid on demand"]
    out = []
    scope = (config.get("session") or {}).get("dmScope")
    if scope is not None and scope not in SCOPES:
        out.append("session.dmScope: Invalid option: expected one of " + "|".join(SCOPES))
    for name, p in ((config.get("models") or {}).get("providers") or {}).items():
        if not isinstance(p.get("baseUrl"), str):
            out.append(f"models.providers.{name}.baseUrl: expected string")
    return out


def merge(into, patch, counted):
    for key, value in patch.items():
        if value is None:
            into.pop(key, None); counted[0] += 1
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value, counted)
        elif isinstance(value, dict):
            into[key] = {}; merge(into[key], value, counted)
        else:
            into[key] = value; counted[0] += 1


def redacted(value):
    if isinstance(value, dict):
        return {k: ("__OPENCLAW_REDACTED__" if k == "apiKey" else redacted(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


if args[:1] == ["--version"]:
    print("OpenClaw 2026.9.6 (stand-in)")
elif args[:2] == ["config", "file"]:
    print(path)
elif args[:2] == ["config", "get"]:
    value = load()
    for part in args[2].split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        print(f"Config path is valid but unset: {args[2]}.", file=sys.stderr)
        sys.exit(1)
    value = redacted(value)
    print(value if isinstance(value, str) else json.dumps(value, indent=2))
elif args[:3] == ["config", "patch", "--stdin"]:
    config, counted = load(), [0]
    before = json.dumps(config, sort_keys=True)
    merge(config, json.loads(sys.stdin.read()), counted)
    found = problems(config)
    if found:
        print("Config validation failed: " + "; ".join(found), file=sys.stderr)
        sys.exit(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    if json.dumps(config, sort_keys=True) == before:
        hint = "No gateway restart needed."
    elif os.environ.get("FAKE_OPENCLAW_RESTART"):
        hint = "Restart the gateway to apply."
    else:
        hint = "Change will apply without restarting the gateway."
    print(f"Applied {counted[0]} config update(s). {hint}")
elif args[:2] == ["config", "validate"]:
    found = problems(load())
    if found:
        print("Config validation failed: " + "; ".join(found), file=sys.stderr)
        sys.exit(1)
    print(f"Config valid: {path}")
elif args[:2] == ["message", "send"]:
    print("Sent via Telegram. Message ID: 4242")
else:
    print(f"unknown command: {' '.join(args)}", file=sys.stderr)
    sys.exit(1)
"""


def install(bin_dir: Path, name: str = "openclaw") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n" + SOURCE)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def config(state: Path) -> dict[str, Any]:
    path = state / "openclaw.json"
    return json.loads(path.read_text()) if path.exists() else {}


def environment(bin_dir: Path, state: Path, log: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AI_AGENT_PROXY_", "OPENCLAW_"))
    }
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OPENCLAW_STATE_DIR=str(state),
               FAKE_OPENCLAW_LOG=str(log))  # fmt: skip
    return env
