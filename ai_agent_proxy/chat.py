"""What the client hears once its request is committed: the local answer (REPLY, as JSON
or as a complete SSE stream), or the backend's answer relayed as it arrives, with its
outcome recorded on the row whatever happens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
import orjson
from sanic import Request
from sanic.response import HTTPResponse, raw

from . import wire
from .config import Settings
from .errors import BackendError, OutboxError
from .outbox.store import Outbox
from .relay import (
    LineRedactor,
    Relay,
    RelayOutcome,
    SSEReader,
    backend_instruction,
    iterate,
    prepare_body,
)

log = logging.getLogger("ai_agent_proxy")

JSON = "application/json"
SSE = "text/event-stream"
SSE_HEADERS = {"cache-control": "no-cache"}


def json_response(body: bytes, status: int = 200) -> HTTPResponse:
    return raw(body, status=status, content_type=JSON)


@dataclass(frozen=True)
class Answer:
    """How to answer one chat request locally: model name, stream or not, usage chunk."""

    model: str
    stream: bool
    include_usage: bool
    reply: str

    @classmethod
    def for_body(cls, body: dict[str, Any], settings: Settings) -> Answer:
        model = body.get("model")
        options = body.get("stream_options")
        return cls(
            model=model if isinstance(model, str) else settings.model_id,
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            reply=settings.reply,
        )

    def fallback(self) -> HTTPResponse:
        """The local answer: REPLY (default empty) as JSON or as a complete SSE stream."""
        if self.stream:
            return raw(
                wire.chat_completion_stream(self.model, self.reply, self.include_usage),
                content_type=SSE,
                headers=SSE_HEADERS,
            )
        return json_response(wire.chat_completion(self.model, self.reply))


async def relay_chat(
    request: Request,
    relay: Relay,
    body: dict[str, Any],
    context_id: str | None,
    request_id: str,
    answer: Answer,
) -> HTTPResponse | None:
    """Forward to the backend, answer the client, record the outcome whatever happens."""
    ctx = request.app.ctx
    settings: Settings = ctx.settings
    instruction = backend_instruction(settings, context_id)
    prepared = prepare_body(body, instruction, settings.backend_model)
    outcome = RelayOutcome()
    try:
        if answer.stream:
            return await relay_stream(request, relay, prepared, outcome, answer)
        try:
            return json_response(await relay.complete(prepared, outcome))
        except BackendError as exc:
            outcome.fail(str(exc))
            return answer.fallback()
    except asyncio.CancelledError:
        if outcome.reply is None:  # a client leaving after the finish keeps the reply
            outcome.fail("client disconnected before the backend answer was complete")
        raise
    finally:
        outcome.done()
        if outcome.error:
            log.warning("backend_forward_failed request_id=%s error=%s", request_id, outcome.error)
        # Shielded: a client that hangs up must not stop the outcome being recorded.
        await asyncio.shield(
            record_outcome(ctx.outbox, request_id, instruction, outcome, relay.redact)
        )


async def relay_stream(
    request: Request,
    relay: Relay,
    prepared: dict[str, Any],
    outcome: RelayOutcome,
    answer: Answer,
) -> HTTPResponse | None:
    try:
        resp = await relay.open_stream(prepared, outcome)
    except BackendError as exc:
        outcome.fail(str(exc))
        return answer.fallback()
    try:
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            # The backend ignored "stream": answer its completion as a stream ourselves.
            relay.read_completion(await resp.aread(), outcome)
            return replace(answer, reply=relay.redact(outcome.reply or "")).fallback()
        response = await request.respond(content_type=SSE, headers=SSE_HEADERS)
        reader, passed_on = SSEReader(), LineRedactor(relay.redact_bytes)
        try:
            async for chunk in iterate(resp):
                reader.feed(chunk)
                if reader.finished:  # complete: keep it even if the client hangs up now
                    outcome.reply, outcome.usage = reader.text, reader.usage
                if out := passed_on.feed(chunk):
                    await response.send(out)
            if rest := passed_on.flush():
                await response.send(rest)
            if not reader.finished:
                raise BackendError("backend stream ended before a finish_reason")
            outcome.reply, outcome.usage = reader.text, reader.usage
        except (httpx.HTTPError, BackendError) as exc:
            # The person has seen part of an answer: say it was cut off (so it does not pass
            # for a whole one), close the stream cleanly, and record what they were shown.
            notice = cutoff_text(reader.text, request.app.ctx.settings.cutoff_notice)
            outcome.error = relay.describe(exc) if isinstance(exc, httpx.HTTPError) else str(exc)
            outcome.reply, outcome.usage = reader.text + notice, reader.usage
            # (a line the backend left unfinished is not passed on: it would spoil the next)
            await response.send(wire.stream_close(answer.model, notice))
        await response.eof()
        return None
    except BackendError as exc:
        outcome.fail(str(exc))
        return answer.fallback()
    finally:
        await resp.aclose()


def cutoff_text(received: str, notice: str) -> str:
    """What ends a relayed answer the backend broke off: the notice, on its own paragraph."""
    if not notice:
        return ""
    return f"\n\n{notice}" if received else notice


async def record_outcome(
    outbox: Outbox,
    request_id: str,
    instruction: str,
    outcome: RelayOutcome,
    redact: Callable[[str], str],
) -> None:
    """Outbox what the backend did. Backends echo keys, in errors and in answers alike: all
    of it is redacted before it is stored (and so before any inbox file has it)."""
    usage = redact(orjson.dumps(outcome.usage).decode()) if outcome.usage else None
    reply = None if outcome.reply is None else redact(outcome.reply)
    error = None if outcome.error is None else redact(outcome.error)
    for attempt in range(3):
        try:
            await outbox.finish_backend(
                request_id,
                {
                    "instruction": instruction,
                    "reply": reply,
                    "status": outcome.status,
                    "error": error,
                    "latency_ms": outcome.latency_ms,
                    "usage": usage,
                },
            )
            break
        except OutboxError as exc:
            # The flusher delivers the row anyway once the wait is deemed stale.
            log.error("backend_outcome_not_recorded request_id=%s error=%s", request_id, exc)
            await asyncio.sleep(0.2 * (attempt + 1))
