"""Settings: defaults < config file < AI_AGENT_PROXY_* environment < command-line flags.

Every value remembers where it came from, so a bad one stops start-up with a single line
naming the key, the value and its source (exit code 2).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .redaction import Redactor, mask_url

ENV_PREFIX = "AI_AGENT_PROXY_"
DEFAULT_CONFIG_FILE = ".ai-agent-proxy.conf"
SECRET_KEYS = frozenset({"KEY", "API_KEY", "OPENCLAW_GATEWAY_TOKEN"})
SKILL_PATH = Path(__file__).parent / "skills" / "openclaw-message-cli" / "SKILL.md"

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


# Settings in seconds (retention in days): (lowest, highest) allowed. NaN, infinities and
# values no operator means (a timeout of a century) are refused at start.
SECONDS: dict[str, tuple[float, float]] = {
    "header_timeout": (0.001, 3600),
    "body_timeout": (0.001, 86400),
    "backend_timeout": (0.001, 86400),
    "dedup_window": (0, 86400),
    "retention_days": (0, 36500),
}


def check_seconds(value: float, low: float, high: float) -> None:
    """ValueError unless `value` is a finite number within [low, high]."""
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if not low <= value <= high:
        raise ValueError(f"must be from {low:g} to {high:g}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.I)
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float, low: float = 0, high: float = 7 * 86400) -> float:
    """Seconds from `30s`, `15m`, `1h`, `2d` or plain seconds (`90`, `0.5`); ValueError
    (one line) unless it is a finite number of seconds within [low, high]."""
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use 30s, 15m, 1h, 2d or seconds")
    seconds = float(match.group(1)) * _DURATION_UNIT_S[(match.group(2) or "s").lower()]
    check_seconds(seconds, low, high)
    return seconds


def check_backend_url(url: str) -> str:
    """The backend URL, checked: http(s), a host, no user info; no trailing slash."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in url:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # httpx would send them as Basic auth to the backend, and they would be one more
        # secret in every URL shown: the backend's key goes in API_KEY.
        raise ValueError("must not hold a user name or password: give the backend key as API_KEY")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def check_gateway_url(url: str) -> str:
    """OpenClaw's gateway URL: ws:// to this machine, or wss:// (http(s):// read as the
    same); ValueError otherwise (its token would cross the network in clear)."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("must be a ws:// or wss:// URL with a host")
    if scheme == "ws" and not is_loopback_host(parts.hostname):
        raise ValueError(
            "must be wss:// for a gateway that is not on this machine (its token would cross"
            " the network in clear)"
        )
    return parts._replace(scheme=scheme).geturl()


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _setting(default: Any, description: str) -> Any:
    """A setting: its default and the one line of help the CLI shows for its flag."""
    return Field(default, description=description)


class Settings(BaseModel):
    """Validated configuration. Field names are the config keys in lower case."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    host: str = _setting("127.0.0.1", "Address to bind.")
    port: int = _setting(7011, "Port.")
    key: str | None = _setting(None, "Bearer key clients must send.")
    worker: int = _setting(1, "Worker processes.")
    inbox: Path = _setting(Path("~/.openclaw/workspace/inbox"), "Inbox directory.")
    db: Path | None = _setting(None, "SQLite outbox file (default: one per inbox).")
    url: str | None = _setting(None, "Backend LLM base URL.")
    api_key: str | None = _setting(None, "Backend LLM API key.")
    backend_model: str | None = _setting(None, "Model name sent to the backend.")
    backend_instruction: str = _setting(
        "You are replying on behalf of a local agent. Answer briefly; "
        "the agent will follow up with the full answer.",
        "System instruction prepended for the backend.",
    )
    instruction: str = _setting(
        "use openclaw-message-cli-skill to reply", "`instruction` written into inbox files."
    )
    openclaw_message_cli_skill_path: Path = _setting(
        SKILL_PATH, "Skill path written into inbox files."
    )
    model_id: str = _setting("local-agent", "Local model id.")
    reply: str = _setting("", "Assistant text answered.")
    cutoff_notice: str = _setting(
        "[The answer was cut off here. Please ask again.]",
        "Shown to the person after the part of a relayed answer they got when the backend"
        " broke off mid-stream (empty: nothing extra).",
    )
    max_body: int = _setting(16 * 1024 * 1024, "Largest body in bytes (or 16MiB, 512KB).")
    body_memory: int = _setting(
        256 * 1024 * 1024,
        "Bytes of large bodies (1 MiB and more) received and read at once; past it a large"
        " body waits, then gets 503 with Retry-After (or 256MiB, 1GiB).",
    )
    max_connections: int = _setting(
        1000, "Open connections per worker (also kept below the open-files limit)."
    )
    header_timeout: float = _setting(
        10.0, "Seconds a request's headers may take to arrive, however slowly they trickle."
    )
    # 60 KB at ~1 KB/s, a poor mobile link; a larger body may take longer at BODY_MIN_RATE.
    body_timeout: float = _setting(60.0, "Seconds a request's body may take to arrive.")
    body_min_rate: int = _setting(4096, "Bytes/s a body must keep up after BODY_TIMEOUT.")
    backend_timeout: float = _setting(120.0, "Backend timeout in seconds.")
    dedup_window: float = _setting(
        60.0,
        "Seconds an identical body of the same conversation counts as a client's re-send"
        " (and a local session's turn with OpenClaw's retry notice as its retry).",
    )
    retention_days: float = _setting(0.0, "Prune delivered rows older than this (0: keep).")
    debug: bool = _setting(False, "Debug logging (and the access log).")
    openclaw_bin: str = _setting(
        "openclaw", "The openclaw CLI replies fall back to (path or name)."
    )
    openclaw_gateway_url: str | None = _setting(
        None,
        "OpenClaw's gateway that replies are sent through (default: from OpenClaw's config;"
        " ws:// only on this machine, else wss://).",
    )
    openclaw_gateway_token: str | None = _setting(
        None, "The gateway's token (default: gateway.auth.token of OpenClaw's config)."
    )
    # `~/.openclaw` holds OpenClaw's state; its inbound media store is below it.
    media_dir: Path = _setting(
        Path("~/.openclaw"),
        "OpenClaw's folder holding media/inbound: only a media line naming a file inside"
        " it is an attachment.",
    )

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError("must be a port number 0-65535")
        return v

    @field_validator("max_connections")
    @classmethod
    def _max_connections(cls, v: int) -> int:
        if not 16 <= v <= 1_000_000:
            raise ValueError("must be a whole number of connections, 16-1000000")
        return v

    @field_validator("worker")
    @classmethod
    def _worker(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError("must be a whole number of worker processes, 1-64")
        return v

    @field_validator("max_body", "body_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _SIZE.match(v)
            if not m:
                raise ValueError("must be a size in bytes, e.g. 16777216 or 16MiB")
            unit = (m.group(2) or "b").lower()[0]
            v = int(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
        if isinstance(v, int) and v < 1024:
            raise ValueError("must be at least 1024 bytes")
        return v

    @field_validator(*SECONDS)
    @classmethod
    def _seconds(cls, v: float, info: Any) -> float:
        low, high = SECONDS[info.field_name]
        check_seconds(v, low, high)
        return v

    @field_validator("body_min_rate")
    @classmethod
    def _rate(cls, v: int) -> int:
        if not 1 <= v <= 1 << 30:
            raise ValueError("must be a whole number of bytes per second, 1-1073741824")
        return v

    @field_validator("key", "api_key", "openclaw_gateway_token")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        # Sent in an HTTP header: anything else fails there, not here (a non-ASCII API_KEY
        # once made httpx fail inside start-up and the server hang, deaf to SIGTERM).
        if v is not None and not all("!" <= c <= "~" for c in v):
            raise ValueError("must be printable ASCII without spaces (it is sent in a header)")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        return check_backend_url(v)

    @field_validator("openclaw_gateway_url")
    @classmethod
    def _gateway_url(cls, v: str | None) -> str | None:
        return None if v is None else check_gateway_url(v)

    @field_validator("inbox", "db", "openclaw_message_cli_skill_path", "media_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else cls.expand_path(v)

    @staticmethod
    def expand_path(value: str | Path) -> Path:
        return Path(os.path.expanduser(str(value))).absolute()

    @property
    def db_path(self) -> Path:
        """By default one DB per inbox, under the user's state directory: two proxies with
        different inboxes never share (and cross-deliver) one outbox, and the agent's
        workspace (often a git repository) gets no database file in it."""
        if self.db is not None:
            return self.db
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        key = hashlib.sha256(str(self.inbox).encode()).hexdigest()[:12]
        return state / "ai-agent-proxy" / f"{self.inbox.name}-{key}" / "outbox.db"

    @property
    def redact(self) -> Redactor:
        """The redaction of this configuration's secrets (redaction.py)."""
        return Redactor.for_settings(self.key, self.api_key, self.url, self.openclaw_gateway_token)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def summary(self) -> dict[str, str]:
        """Start-up summary with secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name.upper() in SECRET_KEYS:
                shown = mask(value)
            elif name == "url":
                shown = mask_url(value)
            else:
                shown = "" if value is None else str(value)
            out[name.upper()] = shown
        out["DB"] = str(self.db_path)
        return out


def mask(secret: str | None) -> str:
    """How a secret is shown: whether it is set, nothing of it."""
    return "****" if secret else "(not set)"


KEYS: tuple[str, ...] = tuple(name.upper() for name in Settings.model_fields)


@dataclass(frozen=True)
class Source:
    value: str
    origin: str  # "default", "config file PATH:LINE", "environment NAME", "flag --x"


def parse_config_file(text: str, path: str) -> dict[str, Source]:
    """Parse KEY=VALUE lines with # comments and optional quotes."""
    out: dict[str, Source] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        if "=" not in line:
            raise ConfigError(f"config error: {path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.upper()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if key not in KEYS:
            raise ConfigError(
                f"config error: unknown key {key} in config file {path}:{lineno} "
                f"(known: {', '.join(KEYS)})"
            )
        out[key] = Source(value, f"config file {path}:{lineno}")
    return out


def settings_file(config_path: str | None) -> Path | None:
    """The settings file `load_settings` reads for `config_path` (-f), if there is one."""
    path = Path(os.path.expanduser(config_path or DEFAULT_CONFIG_FILE))
    return path if path.is_file() else None


def exposed_secrets(path: Path | None) -> str | None:
    """A warning when the settings file holds KEY or API_KEY and others may read it."""
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
        held = parse_config_file(path.read_text(encoding="utf-8-sig"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None  # (load_settings says what is wrong with it)
    secrets = sorted(k for k in SECRET_KEYS if held.get(k, Source("", "")).value)
    if not secrets or not mode & 0o077:
        return None
    return (
        f"settings file {path} holds {' and '.join(secrets)} and others may read it"
        f" (mode {mode & 0o777:o}): chmod 600 {path}"
    )


def load_settings(
    config_path: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every source and validate. Raises ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    sources: dict[str, Source] = {}

    explicit = config_path is not None
    path = Path(os.path.expanduser(config_path or DEFAULT_CONFIG_FILE))
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")  # (an editor's BOM is no key's)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config error: cannot read config file {path}: {exc}") from None
        sources.update(parse_config_file(text, str(path)))
    elif explicit:
        raise ConfigError(f"config error: config file {path} does not exist")

    for key in KEYS:
        name = ENV_PREFIX + key
        if name in environ:
            sources[key] = Source(environ[name], f"environment {name}")

    for key, value in (flags or {}).items():
        if value is not None:
            flag = "--" + key.lower().replace("_", "-")
            sources[key.upper()] = Source(str(value), f"flag {flag}")

    return _validate(sources)


def _validate(sources: dict[str, Source]) -> Settings:
    data: dict[str, Any] = {}
    for key, src in sources.items():
        value: Any = src.value
        # An empty value means "unset" (e.g. URL= in a file); only REPLY may be empty text.
        if value == "" and key not in ("REPLY", "CUTOFF_NOTICE"):  # "" means something
            continue
        data[key.lower()] = value
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]).upper() if err["loc"] else "?"
        src = sources.get(key)
        if key in SECRET_KEYS and src:
            shown = mask(src.value)
        elif key == "URL" and src:
            shown = repr(mask_url(src.value))
        else:
            shown = repr(src.value if src else None)
        reason = str(err["msg"]).removeprefix("Value error, ")
        origin = src.origin if src else "default"
        raise ConfigError(f"config error: {key}={shown} (from {origin}): {reason}") from None
