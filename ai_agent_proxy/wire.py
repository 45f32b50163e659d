"""Pydantic models of the OpenAI wire format the proxy speaks, and their encodings."""

from __future__ import annotations

import functools
import random
import time
from typing import Any, Literal

from pydantic import BaseModel, model_serializer


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorBody(BaseModel):
    status: Literal["error"] = "error"
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: Message
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage = Usage()


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI omits absent delta fields rather than sending nulls.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ai-agent-proxy"


def error_body(status: int, message: str, type_: str) -> bytes:
    return (
        ErrorBody(error=ErrorDetail(message=message, type=type_, code=status))
        .model_dump_json()
        .encode()
    )


def completion_id() -> str:
    # Unique, not secret: `random` spares the event loop a system call per answer.
    return f"chatcmpl-{random.getrandbits(96):024x}"


# Answers differ only in id and time, so the local ones are rendered once per (model,
# reply) and filled in. The markers below appear only as our own keys: a quote inside any
# string value is escaped.
_ID_MARK = "chatcmpl-template"
_CACHED_TEXT = 1024  # longer models or replies (a backend's) are rendered each time


def _fill(template: bytes) -> bytes:
    return template.replace(
        b'"id":"' + _ID_MARK.encode() + b'"', b'"id":"' + completion_id().encode() + b'"'
    ).replace(b'"created":0,', b'"created":%d,' % int(time.time()))


def chat_completion(model: str, content: str) -> bytes:
    if len(model) + len(content) < _CACHED_TEXT:
        return _fill(_chat_completion_template(model, content))
    return _render_chat_completion(model, content, completion_id(), int(time.time()))


@functools.lru_cache(maxsize=128)
def _chat_completion_template(model: str, content: str) -> bytes:
    return _render_chat_completion(model, content, _ID_MARK, 0)


def _render_chat_completion(model: str, content: str, id_: str, created: int) -> bytes:
    return (
        ChatCompletion(
            id=id_,
            created=created,
            model=model,
            choices=[Choice(message=Message(content=content))],
        )
        .model_dump_json()
        .encode()
    )


def sse_event(data: BaseModel | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else data.model_dump_json().encode()
    return b"data: " + payload + b"\n\n"


def chat_completion_stream(model: str, content: str, include_usage: bool) -> bytes:
    """The whole SSE body for a locally answered streaming request."""
    if len(model) + len(content) < _CACHED_TEXT:
        return _fill(_stream_template(model, content, include_usage))
    return _render_stream(model, content, include_usage, completion_id(), int(time.time()))


@functools.lru_cache(maxsize=128)
def _stream_template(model: str, content: str, include_usage: bool) -> bytes:
    return _render_stream(model, content, include_usage, _ID_MARK, 0)


def _render_stream(model: str, content: str, include_usage: bool, cid: str, created: int) -> bytes:

    def chunk(delta: Delta, finish: Literal["stop"] | None = None) -> bytes:
        return sse_event(
            ChatCompletionChunk(
                id=cid,
                created=created,
                model=model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            )
        )

    parts = [chunk(Delta(role="assistant", content=""))]
    if content:
        parts.append(chunk(Delta(content=content)))
    parts.append(chunk(Delta(), "stop"))
    if include_usage:
        parts.append(
            sse_event(
                ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=Usage())
            )
        )
    parts.append(sse_event("[DONE]"))
    return b"".join(parts)


def stream_close(model: str, notice: str = "") -> bytes:
    """Ends a relayed stream the backend broke off: the notice (if any) as a last delta, a
    finish_reason, then [DONE]."""
    cid, created = completion_id(), int(time.time())

    def chunk(delta: Delta, finish: Literal["stop"] | None = None) -> bytes:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return sse_event(
            ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])
        )

    notice_chunk = chunk(Delta(content=notice)) if notice else b""
    return notice_chunk + chunk(Delta(), "stop") + sse_event("[DONE]")
