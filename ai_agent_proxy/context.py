"""Pure functions that read who a request is from and what the person said.

Works on OpenClaw 2026.9 bodies (identity in an internal-context part of the last user
message and an ``openclaw.inbound_meta.v2`` block in the system prompt), on older OpenClaw
bodies (``| channel=...`` in the system prompt, a fenced JSON sender block in the user
message) and on plain OpenAI bodies. Nothing here does I/O and nothing here raises.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

from .envelope import (
    ends_text,
    fenced_blocks,
    header_block,
    space_end,
    strip_leading_envelope,
    strip_runtime_line,
    strip_stamped_envelopes,
)

INTERNAL_BEGIN = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"
RETRY_NOTICE = "The previous attempt did not produce a user-visible answer"
QUEUED_NOTICE = (
    "[Queued user message from a previous active turn; preserved as context only. "
    "Continue with the active prompt below.]"
)
EARLIER_NOTICE = (
    "[Earlier unanswered user message. Address this request alongside the current input; "
    "follow the latest user instruction if they conflict.]"
)
CONTINUE_NOTICE = (
    "Continue the current task from the existing transcript, preserving completed work. If an "
    "action was interrupted, inspect its state before deciding whether to retry it. Do not "
    "restart the task or repeat completed actions."
)


# OpenClaw's own words around the person's (the contract, section 3), one entry each:
# (name, a literal every match contains, what removes it). Removing every match leaves the
# person's words. Anchored where OpenClaw puts them, so the same sentence inside a person's
# text is left alone. The retry notice is not here: it is a message (or part) of its own,
# known by its place in the turn (_read_turn), never cut out of a person's text. Each
# remover is linear in the text (envelope.py says why that matters).
def _regex_remover(pattern: re.Pattern[str]) -> Callable[[str], str]:
    return functools.partial(pattern.sub, "")


def _strip_closing_continue(text: str) -> str:
    """The "Continue the current task ..." paragraph (or its tool-failure variant, with
    " If a tool ..." to the end of its line) when it closes the text: at its start or after
    a blank line, nothing but whitespace after it."""
    at = text.find(CONTINUE_NOTICE)
    while at != -1:
        starts = at == 0 or text.startswith("\n\n", at - 2)
        if starts and ends_text(text, at + len(CONTINUE_NOTICE), " If a tool"):
            return text[: max(0, at - 2)]
        at = text.find(CONTINUE_NOTICE, at + 1)
    return text


NOTICES: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    # A message re-sent after a failed turn starts with this line ...
    ("queued", QUEUED_NOTICE, _regex_remover(
        re.compile(r"\A\s*" + re.escape(QUEUED_NOTICE) + r"[ \t]*\n?"))),
    ("earlier", EARLIER_NOTICE, _regex_remover(
        re.compile(r"\A\s*" + re.escape(EARLIER_NOTICE) + r"[ \t]*\n?"))),
    # ... and, when nobody wrote since, ends with this paragraph (or its tool-failure variant).
    ("continue", CONTINUE_NOTICE, _strip_closing_continue),
    (
        "attachment-not-analyzed",
        " attachment not analyzed:",
        _regex_remover(re.compile(
            r"^[ \t]*\[(?:Image|Audio|Video|File|Document) attachment not analyzed:[^\n]*\]"
            r"[ \t]*(?:\n|\Z)",
            re.M,
        )),
    ),
)  # fmt: skip


def strip_notices(text: str) -> str:
    """`text` without OpenClaw's notices; the same object when it holds none."""
    for _, literal, remove in NOTICES:
        if literal in text:
            text = remove(text)
    return text


_CHANNEL_FIELDS = ("channel", "context_id", "thread_id", "thread", "conversation_id", "chat_id")
_TARGET_FIELDS = ("target", "user_id", "recipient", "to")
_SENDER_FIELDS = ("sender_id", "id", "e164", "target", "user_id", "recipient", "to")

_CHANNEL_LINE = re.compile(r"\|\s*channel=([^\s|]+)")
# `[media attached: <path> (<mime>) "<name>"]`, also numbered (`media attached 1/2:`) and
# with a `| <path or url>` tail; `[media attached: 2 files]` only announces the lines.
_MEDIA_HEAD = re.compile(r"[ \t]*\[media attached(?: \d+/\d+)?: ")
MEDIA_LINE_MAX = 4096  # OpenClaw's line is a path, a type and a name; a longer one is text
_MEDIA_INNER = re.compile(
    r'^(?P<path>.+?)(?: \((?P<mime>[\w.+-]+/[\w.+-]+)[^()]*\))?(?: "(?P<name>[^"]*)")?'
    r"(?: \| [^|]*)?$"
)
_MEDIA_COUNT = re.compile(r"^\d+ files?$")
# OpenClaw saves a handful of files per message (a Telegram album holds 10); lines past this
# many stay text (each is looked up on disk: 47,000 of them in 1 MiB took 0.26 s).
ATTACHMENTS_MAX = 64
# OpenClaw's retry notice as it sends it: its own message (or part), an optional time stamp,
# then the sentence. Never wrapped as a person's message.
_RETRY = re.compile(
    r"\A\s*(?:\[[^\]\n]{0,60}\d{1,2}:\d{2}[^\]\n]{0,40}\]\s*)?" + re.escape(RETRY_NOTICE)
)
# OpenClaw's internal context quotes each data block as a JSON string literal on a line of
# its own; the one that names the chat begins with this header (the "Conversation context"
# that may follow it quotes chat text: not read).
_INFO_HEADER = "Conversation info"
_INFO_LITERAL = '"' + _INFO_HEADER
# OpenClaw's internal context holds one such block; each one read costs a decode (~6 µs:
# 1 MiB of them took 0.2 s), so only the first few are.
DATA_BLOCKS_READ = 16
_SENDER_KEYS = ("id", "name", "username", "e164")
_DECODER = json.JSONDecoder()
_NEWLINES = re.compile(r"\n*")


@dataclass(frozen=True)
class Attachment:
    """One file OpenClaw saved for the person's message (a `[media attached: ...]` line)."""

    path: str
    mime: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"path": self.path}
        if self.mime:
            out["mime"] = self.mime
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class RequestContext:
    channel: str | None = None
    target: str | None = None
    message_id: str | None = None
    latest_user_prompt: str = ""
    sender: dict[str, str] | None = None  # id, name, username (e164) as OpenClaw gives them
    attachments: tuple[Attachment, ...] = ()
    modality: str | None = None  # OpenClaw's source_modality: text, image, voice, document
    retry: bool = False  # OpenClaw's retry notice is in this turn: it re-sends an earlier one

    @property
    def context_id(self) -> str | None:
        if self.channel and self.target:
            return f"{self.channel}:{self.target}"
        return self.channel or None

    def stored(self) -> dict[str, Any]:
        """The message's fields as the DB keeps them (rows.Message: sender and attachments
        as JSON text)."""
        attachments = [a.as_dict() for a in self.attachments]
        return {
            "context_id": self.context_id,
            "channel": self.channel,
            "target": self.target,
            "message_id": self.message_id,
            "latest_user_prompt": self.latest_user_prompt,
            "sender": orjson.dumps(self.sender).decode() if self.sender else None,
            "attachments": orjson.dumps(attachments).decode() if attachments else None,
            "modality": self.modality,
        }


@dataclass(frozen=True)
class MediaStore:
    """OpenClaw's inbound media folder: `<root>/.../media/inbound/...` (root: the MEDIA_DIR
    setting, OpenClaw's `~/.openclaw`). `resolve` turns a path into the one it names
    (os.path.realpath follows symlinks: the server's; the default only normalises `..`)."""

    root: str
    resolve: Callable[[str], str] = os.path.normpath
    _written_root: str = field(init=False, repr=False)
    _resolved_root: str = field(init=False, repr=False)

    def __post_init__(self) -> None:  # the root's two forms, once (not per request)
        object.__setattr__(self, "_written_root", os.path.normpath(self.root))
        object.__setattr__(self, "_resolved_root", self.resolve(self.root))

    def holds(self, path: str) -> bool:
        """Whether `path` names a file in the store: an absolute path inside it, or a
        `media://inbound/` name that stays inside (media_name_stays_in)."""
        if path.startswith(MEDIA_SCHEME):
            return media_name_stays_in(path)
        if not path.startswith("/") or ".." in path.split("/") or _has_controls(path):
            return False  # (a NUL made realpath raise: the whole message lost its chat)
        # Inside as written (no `..`, no /proc/self/root/...) and as resolved (no symlink out).
        return _in_inbound(os.path.normpath(path), self._written_root) and _in_inbound(
            self.resolve(path), self._resolved_root
        )


MEDIA_SCHEME = "media://inbound/"
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _has_controls(text: str) -> bool:
    return _CONTROLS.search(text) is not None


def media_name_stays_in(name: str) -> bool:
    """A `media://inbound/<name>` that names a file inside the folder, once decoded:
    `%2e%2e` is `..`, and an empty segment (`//etc/passwd`) or a control character in it
    is no name of OpenClaw's."""
    rest = unquote(name[len(MEDIA_SCHEME) :])
    return bool(rest) and not _has_controls(rest) and all(
        part not in ("", ".", "..") for part in rest.replace("\\", "/").split("/")
    )  # fmt: skip


def _in_inbound(path: str, root: str) -> bool:
    """`path` is a file below a `media/inbound` folder somewhere inside `root`."""
    inside = os.path.relpath(path, root).split(os.sep)
    if inside[0] == ".." or len(inside) < 3:
        return False
    return any(a == "media" and b == "inbound" for a, b in itertools.pairwise(inside[:-1]))


def extract_context(body: Any, media: MediaStore | None = None) -> RequestContext:
    """Everything the proxy needs to know about a request body. Never raises. Without
    `media`, a media line names an attachment by its shape alone (split_media)."""
    try:
        return _extract(body, media)
    except Exception:  # extraction is best effort; a weird body must still be recorded
        return RequestContext()


def _extract(body: Any, media: MediaStore | None) -> RequestContext:
    if not isinstance(body, dict):
        return RequestContext()
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if not isinstance(body.get("messages"), list):
        messages = []

    channel = _first_string(body, _CHANNEL_FIELDS)
    target = _first_string(body, _TARGET_FIELDS)
    message_id = modality = None
    sender: dict[str, str] | None = None

    # OpenClaw 2026.9: its internal-context message carries chat_id, message_id and sender.
    internal = _internal_index(messages)
    info = _internal_conversation_info(messages, internal)
    if info:
        chat_id = _str(info.get("chat_id"))
        message_id = _str(info.get("message_id"))
        sender = _sender(info.get("sender"))
        modality = _str(info.get("source_modality"))
        if chat_id:
            head, sep, tail = chat_id.partition(":")
            if sep and head and tail:
                channel = channel or head
                target = target or tail
            else:
                target = target or chat_id
    if not channel:
        channel = _inbound_meta_channel(messages) or _channel_line(messages)

    # Older OpenClaw: sender identity in the person's newest message's JSON block.
    text, retry = _read_turn(messages, internal)
    prompt, attachments = "", ()
    if text is not None:
        if not target:
            target = _sender_target(text)
        if sender is None:
            sender = next((_sender(o.get("sender")) for o in _fenced_objects(text)), None)
        prompt = clean_user_text(text)
        try:  # (a media line never costs the message its chat)
            prompt, attachments = split_media(prompt, media)
        except (ValueError, OSError):
            attachments = ()
    return RequestContext(
        storable(channel),
        storable(target),
        storable(message_id),
        storable(prompt) or "",
        {k: storable(v) or "" for k, v in sender.items()} if sender else None,
        tuple(Attachment(*(storable(f) for f in (a.path, a.mime, a.name))) for a in attachments),
        storable(modality and modality[:32]),
        retry,
    )


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str | None) -> str | None:
    """`text` with lone surrogates (a JS client cutting an emoji in half) as U+FFFD: what
    the proxy derives from a body is stored and written as UTF-8, which cannot hold them.
    (The body itself is kept byte for byte, escapes and all.)"""
    if text is None or text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def clean_user_text(text: str) -> str:
    """The person's words: without OpenClaw's envelope (time stamp, metadata JSON blocks,
    trailing Runtime line) and without its notices (NOTICES)."""
    text = _strip_envelope(text)
    # Envelopes and notices nest (a queued message keeps its envelope): peel until stable.
    for _ in range(4):
        stripped = strip_notices(text)
        if stripped is text:
            break
        text = _strip_envelope(stripped)
    return strip_stamped_envelopes(text).strip()


def _strip_envelope(text: str) -> str:
    return strip_runtime_line(strip_leading_envelope(text.strip()))


def split_media(text: str, media: MediaStore | None = None) -> tuple[str, tuple[Attachment, ...]]:
    """(text without OpenClaw's `[media attached: ...]` lines, the attachments they name).

    Anyone can type such a line, and an agent opens what `attachments` names, so only the
    lines OpenClaw writes count: those it puts before the person's words, naming a file in
    its inbound media store (`media`; without one, any `.../media/inbound/...` or
    `media://inbound/...` path without `..`). Any other such line is the person's text."""
    if "[media attached" not in text:
        return text, ()
    found: list[Attachment] = []
    at = space_end(text, 0)
    while len(found) < ATTACHMENTS_MAX and (line := _media_line(text, at)) is not None:
        inner, next_line = line
        parts = None if _MEDIA_COUNT.match(inner) else _MEDIA_INNER.match(inner)
        if parts is not None:
            path = parts["path"].strip()
            if not (media.holds(path) if media else _looks_inbound(path)):
                break
            found.append(Attachment(path, parts["mime"], parts["name"]))
        at = _NEWLINES.match(text, next_line).end()  # type: ignore[union-attr]
    return (text[at:].strip(), tuple(found)) if found else (text, ())


def _media_line(text: str, at: int) -> tuple[str, int] | None:
    """(what is inside the `[media attached: ...]` line that starts at `at`, where the
    next line starts), or None when no such line (of at most MEDIA_LINE_MAX characters)
    starts there. The inside runs to the line's last `]`, only spaces or tabs after it."""
    head = _MEDIA_HEAD.match(text, at)
    if head is None:
        return None
    eol = text.find("\n", head.end(), head.end() + MEDIA_LINE_MAX + 1)
    end = eol if eol != -1 else len(text)
    if end - head.end() > MEDIA_LINE_MAX:
        return None
    rest = text[head.end() : end].rstrip(" \t")
    if not rest.endswith("]"):
        return None
    return rest[:-1].strip(), min(end + 1, len(text))


def _looks_inbound(path: str) -> bool:
    if path.startswith(MEDIA_SCHEME):
        return media_name_stays_in(path)
    unified = path.replace("\\", "/")
    if ".." in unified.split("/") or _has_controls(unified):
        return False
    return "/media/inbound/" in unified


def _sender(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    out = {k: v for k in _SENDER_KEYS if (v := _str(value.get(k))) is not None}
    return out or None


def _str(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _first_string(obj: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    for name in fields:
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _texts(message: dict[str, Any]) -> list[str]:
    """String content, or the text parts of a content list."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        p["text"]
        for p in content
        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
    ]


def _message_text(message: dict[str, Any]) -> str:
    return "\n".join(_texts(message))


def _internal_index(messages: list[dict[str, Any]]) -> int | None:
    """Where OpenClaw's own internal-context message is: the first user message whose first
    text part begins with the marker. The gateway sends one per request (every captured
    body has exactly one), after the person's message and before a steered one, and it
    wraps every person's message (`[<time>] Conversation info: ...`). So the marker typed
    inside a person's message, merged in as a later part, or opening a message that comes
    after OpenClaw's (not seen from the gateway) is somebody's text, never identity; and
    OpenClaw's message gaining a second part is still OpenClaw's."""
    for i, message in enumerate(messages):
        texts = _texts(message) if message.get("role") == "user" else []
        if texts and texts[0].startswith(INTERNAL_BEGIN, space_end(texts[0], 0)):
            return i
    return None


def _read_turn(messages: list[dict[str, Any]], internal: int | None) -> tuple[str | None, bool]:
    """(the text of the person's newest message, or None if there is none; whether
    OpenClaw's retry notice is in the current turn).

    The turn is the run of user messages after the last message of another role. In it,
    OpenClaw's internal-context message is never the person's, and a text (message or
    part) that is the retry notice is OpenClaw's when something of the person's came before
    it in the turn: the gateway puts it after the person's message, before its internal
    context. A person who types the sentence has it wrapped (a channel), or writes it first
    (`openclaw agent --local`): their words either way."""
    start = len(messages)
    while start and messages[start - 1].get("role") == "user":
        start -= 1
    newest: list[str] | None = None
    retry = False
    for i, message in enumerate(messages[start:], start):
        if i == internal:
            continue
        texts = []
        for text in _texts(message):
            if (newest is not None or texts) and _RETRY.match(text):
                retry = True
            else:
                texts.append(text)
        if texts or not _texts(message):  # a message of only notices is not the person's
            newest = texts
    if newest is None:  # no turn of the person's (e.g. the body ends with an answer)
        older = (
            m for i, m in reversed(list(enumerate(messages[:start])))
            if m.get("role") == "user" and i != internal
        )  # fmt: skip
        found = next(older, None)
        return (None if found is None else _message_text(found)), retry
    return "\n".join(newest), retry


def _fenced_objects(text: str) -> Iterator[dict[str, Any]]:
    for block in fenced_blocks(text):
        try:
            obj = json.loads(block)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            yield obj


def _internal_conversation_info(
    messages: list[dict[str, Any]], internal: int | None
) -> dict[str, Any] | None:
    """The `Conversation info` object of OpenClaw's internal-context message (at index
    `internal`), if it has one: only the first text part of that message is read, and in
    it only the data block that starts with that header, so chat text quoted elsewhere is
    never a source of identity."""
    if internal is None:
        return None
    for block in _data_blocks(_texts(messages[internal])[0]):
        content = header_block(block, _INFO_HEADER)
        if content is None:
            continue
        try:
            obj = json.loads(content)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and ("chat_id" in obj or "message_id" in obj):
            return obj
    return None


def _data_blocks(text: str) -> Iterator[str]:
    """The data blocks that begin with the `Conversation info` header, unquoted: literals
    that open a line. A JSON string holds no raw newline, so decoding one stops at its
    line's end at the latest, and no character is read twice (decoding at every quote
    read a line of escaped quotes once per quote: 80 KB took 2.7 s)."""
    at = 0 if text.startswith(_INFO_LITERAL) else _line_start(text, _INFO_LITERAL, 0)
    for _ in range(DATA_BLOCKS_READ):
        if at == -1:
            return
        eol = text.find("\n", at)
        line = text[at:] if eol == -1 else text[at:eol]
        try:  # (on the line alone: a decode error counts the newlines before it)
            value, _ = _DECODER.raw_decode(line)
        except ValueError:
            pass
        else:
            yield value  # (a string: decoding at a quote)
        at = -1 if eol == -1 else _line_start(text, _INFO_LITERAL, eol)


def _line_start(text: str, literal: str, pos: int) -> int:
    """The first occurrence of `literal` at or after `pos` that begins a line, or -1."""
    found = text.find("\n" + literal, max(0, pos - 1))
    return -1 if found == -1 else found + 1


def _same_text_memo(fn: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """Remember `fn`'s answer for the last few string objects. An agent's large system
    prompt is one and the same str from request to request (bodies.BodyParser), so it is
    searched once, not on every request; looking it up by identity costs no hashing."""
    memo: dict[int, tuple[str, str | None]] = {}

    def cached(text: str) -> str | None:
        hit = memo.get(id(text))
        if hit is not None and hit[0] is text:
            return hit[1]
        result = fn(text)
        if 4096 <= len(text) <= 1 << 20:  # a system prompt, not one odd 15 MiB message
            if len(memo) >= 16:
                memo.clear()
            memo[id(text)] = (text, result)  # holding `text` keeps its id from being reused
        return result

    return cached


def _first_found(messages: list[dict[str, Any]], find: Callable[[str], str | None]) -> str | None:
    for m in messages:
        found = find(_message_text(m))
        if found:
            return found
    return None


def _inbound_meta_channel(messages: list[dict[str, Any]]) -> str | None:
    prompts = [m for m in messages if m.get("role") in ("system", "developer")]
    return _first_found(prompts, _inbound_meta_channel_in)


@_same_text_memo
def _inbound_meta_channel_in(text: str) -> str | None:
    if "openclaw.inbound_meta" not in text:
        return None
    for obj in _fenced_objects(text):
        if str(obj.get("schema", "")).startswith("openclaw.inbound_meta"):
            channel = _str(obj.get("channel"))
            if channel:
                return channel
    return None


def _channel_line(messages: list[dict[str, Any]]) -> str | None:
    # System messages first (the older shape), then any message (2026.9 Runtime line).
    ordered = [m for m in messages if m.get("role") == "system"] + [
        m for m in messages if m.get("role") != "system"
    ]
    return _first_found(ordered, _channel_line_in)


@_same_text_memo
def _channel_line_in(text: str) -> str | None:
    match = _CHANNEL_LINE.search(text)
    return match.group(1) if match else None


def _sender_target(text: str) -> str | None:
    for obj in _fenced_objects(text):
        for candidate in (obj, obj.get("sender")):
            if isinstance(candidate, dict):
                value = _first_id(candidate)
                if value:
                    return value
    return None


def _first_id(obj: dict[str, Any]) -> str | None:
    for name in _SENDER_FIELDS:
        value = _str(obj.get(name))
        if value:
            return value
    return None
