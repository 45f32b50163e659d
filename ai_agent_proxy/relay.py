"""Backend LLM relay over one pooled httpx client: plain and streaming (SSE passthrough).

The relay only talks to the backend and reports what happened (`RelayOutcome`); the app
decides what the client sees and the outbox records the outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import orjson

from .bodies import dumps
from .config import Settings
from .errors import BackendError

log = logging.getLogger("ai_agent_proxy.relay")

CONNECT_TIMEOUT_S = 10.0


@dataclass
class RelayOutcome:
    """What one backend call produced; `error` set means the client got the fallback."""

    status: int | None = None
    reply: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    latency_ms: float | None = None

    def fail(self, error: str) -> None:
        self.error = error
        self.reply = None

    def done(self) -> None:
        self.latency_ms = round((time.monotonic() - self.started) * 1000, 1)


def backend_instruction(settings: Settings, context_id: str | None) -> str:
    return f"{settings.backend_instruction}\n\ncontext_id: {context_id or 'none'}"


def prepare_body(body: dict[str, Any], instruction: str, model: str | None) -> dict[str, Any]:
    """The body sent to the backend: our system message first, model replaced if asked."""
    out = dict(body)
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    out["messages"] = [{"role": "system", "content": instruction}, *messages]
    if model:
        out["model"] = model
    return out


def reply_from_completion(data: Any) -> tuple[str, dict[str, Any] | None]:
    """Assistant text and usage of a chat.completion; raises ValueError if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ValueError("backend answer is not a chat.completion")
    texts = []
    for choice in data["choices"]:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            texts.append(message["content"])
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    return "".join(texts), usage


class SSEReader:
    """Joins the deltas of an SSE chat stream as bytes pass through, without altering them."""

    def __init__(self) -> None:
        self._buffer = b""
        self.parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.finished = False  # a finish_reason or [DONE] was seen

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.finished = True
                continue
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            if isinstance(event.get("usage"), dict):
                self.usage = event["usage"]
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    self.parts.append(delta["content"])
                if choice.get("finish_reason"):
                    self.finished = True

    @property
    def text(self) -> str:
        return "".join(self.parts)


class LineRedactor:
    """A backend stream passed on with the secrets masked, line by line: a key cut across
    two chunks is still found (keys hold no newline). What follows the last newline waits
    for the next chunk; SSE events end with one, so nothing waits in practice."""

    HOLD_MAX = 1 << 16  # a backend that never sends a newline is passed on anyway

    def __init__(self, redact: Callable[[bytes], bytes]) -> None:
        self._redact = redact
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        cut = data.rfind(b"\n") + 1 if len(data) <= self.HOLD_MAX else len(data)
        self._held = data[cut:]
        return self._redact(data[:cut])

    def flush(self) -> bytes:
        data, self._held = self._held, b""
        return self._redact(data)


class Relay:
    def __init__(self, settings: Settings) -> None:
        assert settings.url
        self.settings = settings
        self.redact = settings.redact
        headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # A query in URL (`?api-version=...`) goes after each path, not into the base path.
        base = urlsplit(settings.url)
        self.client = httpx.AsyncClient(
            base_url=urlunsplit(base._replace(query="", path=base.path + "/")),
            params=parse_qsl(base.query, keep_blank_values=True),
            headers=headers,
            timeout=httpx.Timeout(
                settings.backend_timeout, connect=min(CONNECT_TIMEOUT_S, settings.backend_timeout)
            ),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def redact_bytes(self, data: bytes) -> bytes:
        """`data` with the configured secrets masked: backends echo keys (in errors, in
        answers), and what they send is passed on to the client."""
        return self.redact.in_bytes(data)

    async def close(self) -> None:
        await self.client.aclose()

    def describe(self, exc: BaseException) -> str:
        name = type(exc).__name__
        detail = str(exc) or name
        return self.redact(f"{name}: {detail}" if detail != name else name)

    async def complete(self, body: dict[str, Any], outcome: RelayOutcome) -> bytes:
        """Non-streaming call; returns the backend's JSON bytes. Raises BackendError."""
        try:
            resp = await self.client.post("chat/completions", **_json_content(body))
        except httpx.HTTPError as exc:
            raise BackendError(self.describe(exc)) from None
        outcome.status = resp.status_code
        if not resp.is_success:
            raise BackendError(self._status_error(resp.status_code, resp.content))
        self.read_completion(resp.content, outcome)
        return self.redact_bytes(resp.content)

    def read_completion(self, content: bytes, outcome: RelayOutcome) -> None:
        """Take the reply and usage of a chat.completion body; BackendError if it is not one."""
        try:
            outcome.reply, outcome.usage = reply_from_completion(orjson.loads(content))
        except ValueError as exc:
            raise BackendError(self.redact(f"unusable backend answer: {exc}")) from None

    async def open_stream(self, body: dict[str, Any], outcome: RelayOutcome) -> httpx.Response:
        """Start a streaming call; the caller must `aclose()` the response. Raises
        BackendError before any byte is passed on, so the client can get the fallback."""
        request = self.client.build_request("POST", "chat/completions", **_json_content(body))
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise BackendError(self.describe(exc)) from None
        outcome.status = resp.status_code
        if not resp.is_success:
            try:
                content = await resp.aread()
            except httpx.HTTPError:
                content = b""
            await resp.aclose()
            raise BackendError(self._status_error(resp.status_code, content))
        return resp

    async def models(self) -> list[dict[str, Any]] | None:
        """The backend's model list, or None if it cannot be had."""
        try:
            resp = await self.client.get("models", timeout=min(10.0, self.settings.backend_timeout))
            data = orjson.loads(self.redact_bytes(resp.content)) if resp.is_success else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("backend_models_failed error=%s", self.describe(exc))
            return None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return [m for m in data["data"] if isinstance(m, dict) and "id" in m]
        log.warning("backend_models_failed error=unexpected answer status=%s", resp.status_code)
        return None

    def _status_error(self, status: int, content: bytes) -> str:
        snippet = content[:300].decode("utf-8", "replace").replace("\n", " ")
        return self.redact(f"backend answered HTTP {status}: {snippet}")


def _json_content(body: dict[str, Any]) -> dict[str, Any]:
    """The body as httpx arguments, rendered as faithfully as it was accepted (any depth the
    parser takes, lone surrogates as escapes), which httpx's own json= does not do."""
    return {"content": dumps(body), "headers": {"content-type": "application/json"}}


async def iterate(resp: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in resp.aiter_bytes():
        if chunk:
            yield chunk
