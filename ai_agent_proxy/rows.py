"""Pure data about outbox rows: what a request becomes (NewRequest) and what the flusher
turns into an inbox file (PendingRow). No I/O and no DB import, so the inbox writer process
and the payload code use them without the outbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from .ids import inbox_file_name


class State(str, Enum):
    """Where a row is on its way to the inbox. The only place these words are spelled."""

    AWAITING_BACKEND = "awaiting_backend"  # committed; the backend call is under way
    PENDING = "pending"  # to be written to the inbox
    WRITTEN = "written"  # its inbox file is in place
    DUPLICATE = "duplicate"  # a repeat of an earlier row: stored, no file
    UNDELIVERABLE = "undeliverable"  # could not be made into a file after a few tries

    @property
    def shown(self) -> str:
        """The spelling people type and read (`history --state awaiting-backend`)."""
        return self.value.replace("_", "-")

    @classmethod
    def from_shown(cls, text: str) -> State:
        return cls(text.replace("-", "_"))


class ReplyState(str, Enum):
    """The agent's reply to a request (table `replies`)."""

    SENDING = "sending"  # claimed; the send is under way (or its process died)
    SENT = "sent"
    QUEUED = "queued"  # the gateway accepted it for later delivery: answered, never resent
    FAILED = "failed"  # the send failed: a later `reply` may try again
    DONE = "done"  # the agent decided no answer is needed


class PayloadKind(str, Enum):
    FULL = "full"  # the body and the proxy's keys
    COMPACT = "compact"  # the proxy's keys only: the body is in the DB


@dataclass(frozen=True, kw_only=True)
class Message:
    """What a request's body says about its message (context.RequestContext.stored): the
    one list of body-derived fields. Each is a column of `requests` of the same name, a key
    of the inbox file (inbox.build_payload) and a field of `history`'s records. A new one:
    a field here, its column in a migration, and where context.py reads it."""

    context_id: str | None = None
    channel: str | None = None
    target: str | None = None
    message_id: str | None = None
    latest_user_prompt: str = ""
    sender: str | None = None  # JSON text, as stored
    attachments: str | None = None  # JSON text, as stored
    modality: str | None = None

    def message(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in MESSAGE_FIELDS}


MESSAGE_FIELDS = tuple(f.name for f in fields(Message))
JSON_FIELDS = ("sender", "attachments")  # of those, the ones stored as JSON text


@dataclass(frozen=True, kw_only=True)
class NewRequest(Message):
    id: str
    received_ms: int
    body: bytes
    segments: Sequence[bytes] = ()  # the body cut for storage (bodies.split_body)
    retry: bool = False  # OpenClaw's retry notice was in the body (context.RequestContext)
    awaiting_backend: bool = False


@dataclass(frozen=True, kw_only=True)
class PendingRow(Message):
    """What the flusher (and replay) need to turn a row into an inbox file."""

    seq: int
    id: str
    received_ms: int
    body: bytes  # empty unless the payload carries it (body_needed)
    payload_kind: str
    backend_instruction: str | None = None
    backend_reply: str | None = None
    backend_error: str | None = None

    @property
    def inbox_file(self) -> str:
        return inbox_file_name(self.id, self.received_ms)

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any], body: bytes = b"", words: str | None = None
    ) -> PendingRow:
        """From a DB row (or any mapping) by column name; `body` joined by the caller, and
        `words` the person's whole words when the row keeps only their start."""
        fields_ = {name: row[name] for name in META_FIELDS}
        if words is not None:
            fields_["latest_user_prompt"] = words
        return cls(body=body, **fields_)

    @classmethod
    def handed(cls, req: NewRequest, seq: int, payload_kind: str) -> PendingRow:
        """The row of a request just committed, for the flusher (no DB read)."""
        return cls(
            seq=seq,
            id=req.id,
            received_ms=req.received_ms,
            body=req.body if body_needed(payload_kind) else b"",
            payload_kind=payload_kind,
            **req.message(),
        )

    def meta(self) -> dict[str, Any]:
        """Every field but the body, by name (the writer pipe carries bodies apart)."""
        return {name: getattr(self, name) for name in META_FIELDS}


META_FIELDS = tuple(f.name for f in fields(PendingRow) if f.name != "body")
# The columns a PendingRow is read from; the body comes from body_segments, long words from
# prompt_segment (outbox/queries.stored_prompt).
PENDING_COLUMNS = ", ".join((*META_FIELDS, "body_segments", "prompt_segment"))


def body_needed(payload_kind: str, full: bool = False) -> bool:
    """Only full payloads carry the body; compact rows never need it joined."""
    return full or payload_kind == PayloadKind.FULL
