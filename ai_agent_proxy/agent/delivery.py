"""Delivering a reply to the chat, and saying what happened: one job, two transports.

- The gateway's own RPC (`send` over its WebSocket, docs/gateway/protocol in OpenClaw's
  package): the reply's id is the `idempotencyKey`, so a send repeated after a lost answer,
  a crash or a lease takeover is delivered once by the gateway (it answers a repeated key
  with the first send's result). A long-lived caller (the MCP server, the runner) keeps
  one connection open; a one-shot `reply` opens one. Measured against the real gateway:
  tens of milliseconds, where `openclaw message send` takes about 5 s to start.
- The `openclaw` CLI, as before: used when no gateway is configured, or when it could not
  be reached (or refused us) before anything was sent (the CLI takes no idempotency key,
  so it is never used once a `send` may have reached the gateway).

The gateway is found as OpenClaw's CLI finds it: OPENCLAW_GATEWAY_URL / _TOKEN (our
settings, or OpenClaw's own environment), else `gateway.port` and `gateway.auth.token` of
its JSON5 config (OPENCLAW_CONFIG_PATH, $OPENCLAW_STATE_DIR/openclaw.json,
~/.openclaw/openclaw.json). The token is a secret: masked like KEY, never logged, stored or
shown. Only a loopback gateway may be spoken to without TLS.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import openclaw_cli
from ..config import Settings, check_gateway_url, is_loopback_host
from ..errors import ConfigError
from ..printable import printable
from ..redaction import Redactor

PROTOCOL = 4  # the gateway protocol version spoken (minProtocol = maxProtocol)
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 30.0  # the gateway's answer to a `send` (a channel's retries included)
CLI_TIMEOUT_S = 120.0
DEFAULT_PORT = 18789
QUEUED_CODES = ("OUTBOUND_DELIVERY_QUEUED",)  # accepted, delivered later: never resend
_FOUND_CONFIG = "OpenClaw's config"


class Verdict(str, enum.Enum):
    SENT = "sent"
    QUEUED = "queued"  # the gateway keeps it and delivers it later: do not resend
    FAILED = "failed"


@dataclass(frozen=True)
class Address:
    """Where a reply goes: the channel, the chat (target), the message it answers."""

    channel: str
    target: str
    reply_to: str | None = None


@dataclass(frozen=True)
class Delivered:
    """What a delivery did. `detail` is one line for people (secrets already masked);
    `may_have_sent`: a failed send that may still have reached the chat (a `send` the
    gateway got but did not answer), never to be repeated by a path without the key."""

    verdict: Verdict
    transport: str  # "gateway" or "cli"
    detail: str
    message_id: str | None = None
    exit_status: int | None = None  # the CLI's
    may_have_sent: bool = False
    fell_back: str | None = None  # why the gateway was not used, when the CLI was

    @property
    def ok(self) -> bool:
        return self.verdict is not Verdict.FAILED


@dataclass(frozen=True)
class GatewayConfig:
    url: str
    token: str | None
    source: str  # where it was found (for doctor and errors)


# -- finding the gateway -----------------------------------------------------------------


def openclaw_config_path(env: dict[str, str] | None = None) -> Path:
    """OpenClaw's config file, where its CLI looks for it."""
    env = dict(os.environ if env is None else env)
    if env.get("OPENCLAW_CONFIG_PATH"):
        return Path(env["OPENCLAW_CONFIG_PATH"]).expanduser()
    state = env.get("OPENCLAW_STATE_DIR")
    base = Path(state).expanduser() if state else Path.home() / ".openclaw"
    return base / "openclaw.json"


def read_openclaw_config(path: Path) -> dict[str, Any] | None:
    """OpenClaw's JSON5 config, or None when there is none (or it cannot be read)."""
    import json5

    try:
        value = json5.loads(path.read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _env_ref(value: Any, env: dict[str, str]) -> str | None:
    """A config string, with OpenClaw's `${VAR}` form read from the environment."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if value.startswith("${") and value.endswith("}"):
        return env.get(value[2:-1]) or None
    return value


def find_gateway(settings: Settings, env: dict[str, str] | None = None) -> GatewayConfig | None:
    """The gateway to deliver through, or None (then the CLI). ConfigError for a URL that
    would send the token over the network in clear."""
    env = dict(os.environ if env is None else env)
    url = settings.openclaw_gateway_url or env.get("OPENCLAW_GATEWAY_URL") or None
    token = settings.openclaw_gateway_token or env.get("OPENCLAW_GATEWAY_TOKEN") or None
    source = "OPENCLAW_GATEWAY_URL" if url else ""
    # OpenClaw's config fills in what our settings leave out (read even when they say all:
    # once per process, a small file)
    path = openclaw_config_path(env)
    config = read_openclaw_config(path)
    gateway = (config.get("gateway") or {}) if config is not None else None
    if isinstance(gateway, dict):  # (no gateway section: its defaults)
        auth = gateway.get("auth") if isinstance(gateway.get("auth"), dict) else {}
        remote = gateway.get("remote") if isinstance(gateway.get("remote"), dict) else {}
        if gateway.get("mode") == "remote" and remote:
            url = url or _env_ref(remote.get("url"), env)
            token = token or _env_ref(remote.get("token") or remote.get("password"), env)
        else:
            port = gateway.get("port", DEFAULT_PORT)
            if url is None and isinstance(port, int) and 0 < port < 65536:
                url = f"ws://127.0.0.1:{port}"
            token = token or _env_ref(auth.get("token") or auth.get("password"), env)
        source = source or f"{_FOUND_CONFIG} {path}"
    if url is None:
        return None
    try:
        url = check_gateway_url(url)
    except ValueError as exc:
        raise ConfigError(f"config error: the gateway URL {url!r} ({source}) {exc}") from None
    return GatewayConfig(url, token, source)


# -- the gateway's WebSocket RPC ---------------------------------------------------------


class GatewayUnreachable(Exception):
    """The gateway could not be reached, or refused us, before any `send` was written."""


class _Lost(Exception):
    """The connection ended after a `send` was written, before its answer."""


class Gateway:
    """One connection to the gateway, opened on first use and kept (thread-safe: one
    request at a time); `send` delivers a message once per key."""

    def __init__(self, config: GatewayConfig, redact: Callable[[str], str]) -> None:
        self.config = config
        self.redact = redact
        self._ws: Any = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.connects = 0  # connections opened (a kept one is reused)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def connect(self) -> None:
        """Open the connection and log in now (doctor's check); GatewayUnreachable."""
        with self._lock:
            if self._ws is None:
                self._connect()

    def _drop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None

    def _connect(self) -> None:
        """Open the connection and log in (the `connect` request with the token, as
        OpenClaw's CLI does). GatewayUnreachable if it cannot."""
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        url = self.config.url
        local = is_loopback_host(urlsplit(url).hostname or "")
        try:  # (a proxy of the environment is for the world, not this machine)
            opened = connect(url, open_timeout=CONNECT_TIMEOUT_S, close_timeout=1,
                             max_size=16 << 20, **({"proxy": None} if local else {}))  # fmt: skip
            ws = opened.__enter__()  # kept open until close(): the connection's context
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise GatewayUnreachable(f"cannot reach the gateway at {url}: {_why(exc)}") from None
        try:
            params = {
                "minProtocol": PROTOCOL, "maxProtocol": PROTOCOL,
                "client": {"id": "cli", "version": _version(), "platform": _platform(),
                           "mode": "cli"},
                "role": "operator", "scopes": ["operator.write"], "caps": [],
            }  # fmt: skip
            if self.config.token:
                params["auth"] = {"token": self.config.token}
            answer = self._request(ws, "connect", params, CONNECT_TIMEOUT_S)
        except (_Lost, OSError, TimeoutError, WebSocketException) as exc:
            with contextlib.suppress(Exception):
                ws.close()
            why = f"the gateway at {url} did not let us in: {_why(exc)}"
            raise GatewayUnreachable(why) from None
        if not answer.get("ok"):
            with contextlib.suppress(Exception):
                ws.close()
            raise GatewayUnreachable(f"the gateway at {url} refused us: {self._error(answer)}")
        self._ws = ws
        self.connects += 1

    def _request(self, ws: Any, method: str, params: dict[str, Any], timeout: float) -> Any:
        """Write a request frame and read frames until its answer (events are skipped).
        _Lost when the connection ends first; TimeoutError past `timeout`."""
        from websockets.exceptions import ConnectionClosed

        rid = f"aiap-{next(self._ids)}"
        ws.send(json.dumps({"type": "req", "id": rid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} in {timeout:g} s")
            try:
                frame = json.loads(ws.recv(timeout=left))
            except ConnectionClosed as exc:
                raise _Lost(f"the connection closed ({_why(exc)})") from None
            except ValueError:
                continue  # not JSON: not ours
            if isinstance(frame, dict) and frame.get("type") == "res" and frame.get("id") == rid:
                return frame

    def send(self, address: Address, text: str, key: str) -> Delivered:
        """Deliver `text` once for `key` (the reply's id). A connection lost after the
        request was written is opened again and the same key sent again: the gateway
        answers a repeated key with the first send's result. GatewayUnreachable when it
        could not be reached (or refused us) before anything was written."""
        from websockets.exceptions import ConnectionClosed, WebSocketException

        params = {"to": address.target, "channel": address.channel, "message": text,
                  "idempotencyKey": key}  # fmt: skip
        if address.reply_to:
            params["replyToId"] = address.reply_to
        written = False
        with self._lock:
            for attempt in range(2):
                if self._ws is None:
                    try:
                        self._connect()
                    except GatewayUnreachable:
                        if not written:
                            raise
                        return self._unsure("the connection was lost and could not be opened again")
                try:
                    answer = self._request(self._ws, "send", params, SEND_TIMEOUT_S)
                except ConnectionClosed:  # a kept connection the gateway had closed
                    self._drop()
                    continue
                except (_Lost, OSError, WebSocketException) as exc:
                    written = True
                    self._drop()
                    if attempt == 0:
                        continue  # the same key again: delivered at most once
                    return self._unsure(_why(exc))
                except TimeoutError as exc:
                    self._drop()
                    return self._unsure(str(exc))
                return self._verdict(answer)
        if not written:
            raise GatewayUnreachable(f"the gateway at {self.config.url} closed the connection")
        return self._unsure("the connection was lost twice")

    def _verdict(self, answer: dict[str, Any]) -> Delivered:
        if answer.get("ok"):
            payload = answer.get("payload") if isinstance(answer.get("payload"), dict) else {}
            message_id = payload.get("messageId")
            return Delivered(Verdict.SENT, "gateway", "delivered by the gateway",
                             None if message_id is None else str(message_id))  # fmt: skip
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        details = error.get("details") if isinstance(error.get("details"), dict) else {}
        said = self._error(answer)
        if details.get("code") in QUEUED_CODES or error.get("code") in QUEUED_CODES:
            return Delivered(Verdict.QUEUED, "gateway", f"queued by the gateway: {said}")
        return Delivered(Verdict.FAILED, "gateway", f"the gateway refused it: {said}")

    def _unsure(self, why: str) -> Delivered:
        return Delivered(
            Verdict.FAILED, "gateway",
            f"no answer from the gateway ({why}); it may have delivered it: a later reply"
            " sends it again with the same key, which the gateway delivers at most once",
            may_have_sent=True,
        )  # fmt: skip

    def _error(self, answer: dict[str, Any]) -> str:
        """The gateway's error in one line: its code, details' code and message."""
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        details = error.get("details") if isinstance(error.get("details"), dict) else {}
        parts = [str(error.get("code") or "error")]
        if details.get("code"):
            parts.append(str(details["code"]))
        if details.get("missingScope"):
            parts.append(f"missing scope {details['missingScope']}")
        text = f"{' '.join(parts)}: {error.get('message') or 'no message'}"
        return printable(self.redact(text), one_line=True)[:500]


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _version() -> str:
    from .. import __version__

    return str(__version__)


def _platform() -> str:
    import sys

    return {"darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform)


# -- the CLI -------------------------------------------------------------------------------


def send_with_cli(openclaw: str, address: Address, text: str) -> tuple[int, str]:
    """`openclaw message send`: (exit status, its output)."""
    args = ["message", "send", "--channel", address.channel, "--target", address.target,
            "--message", text]  # fmt: skip
    if address.reply_to:
        args += ["--reply-to", address.reply_to]
    done = openclaw_cli.run(openclaw, *args, timeout=CLI_TIMEOUT_S)
    return done.code, (done.out + done.err).strip()


# -- what `reply` uses -----------------------------------------------------------------------


class Deliverer:
    """Delivers replies: through the gateway when one is configured (its connection kept
    for the deliverer's life), else, or when the gateway could not be reached before
    anything was sent, through the `openclaw` CLI. Close it when done."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        config = find_gateway(settings)
        self.redact = Redactor.for_settings(settings.key, settings.api_key, settings.url,
                                            settings.openclaw_gateway_token,
                                            config.token if config else None)  # fmt: skip
        self.gateway = None if config is None else Gateway(config, self.redact)

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.close()

    def __enter__(self) -> Deliverer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def deliver(
        self, address: Address, text: str, key: str, gateway_only: bool = False
    ) -> Delivered:
        """Deliver `text` for reply `key`. `gateway_only`: an earlier attempt of this reply
        may have reached the gateway, so only the gateway (which knows the key) may try,
        when there is one."""
        fell_back = "no gateway configured (OPENCLAW_GATEWAY_URL, or OpenClaw's config)"
        if self.gateway is not None:
            try:
                return self.gateway.send(address, text, key)
            except GatewayUnreachable as exc:
                fell_back = str(exc)
            if gateway_only:
                return Delivered(
                    Verdict.FAILED, "gateway",
                    f"not sent: {fell_back}; an earlier attempt of this reply may have"
                    " reached the gateway, so only the gateway may send it (it knows its key)",
                )  # fmt: skip
        status, output = send_with_cli(self.settings.openclaw_bin, address, text)
        verdict = Verdict.SENT if status == 0 else Verdict.FAILED
        return Delivered(verdict, "cli", self.redact(output), exit_status=status,
                         fell_back=printable(self.redact(fell_back), one_line=True))  # fmt: skip
