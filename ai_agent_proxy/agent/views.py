"""The short views an agent is shown (`next`, MCP, the runner's prompt, a refused reply):
a conversation's waiting messages, each with who wrote, what they sent, how long it has
waited and their words; not OpenClaw's 50 KB system prompt. Pure: the caller reads the
rows (conversations.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..ids import inbox_file_name
from ..printable import printable
from .conversations import Conversation, Message

WORDS_SHOWN = 2000  # characters of each message's words; the rest is in its file (--full)


def message_view(message: Message, inbox: Path, now_s: float) -> dict[str, Any]:
    """A message's fields, by name (each entry of `next --json`'s `messages`)."""
    words = message.words
    left_out = max(0, len(words) - WORDS_SHOWN)
    return {
        "request_id": message.request_id,
        "received_at": datetime.fromtimestamp(message.received_ms / 1000, tz=timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "inbox_file": str(inbox / inbox_file_name(message.request_id, message.received_ms)),
        "written": message.written,
        "message_id": message.message_id,
        "sender": json.loads(message.sender) if message.sender else None,
        "modality": message.modality,
        "attachments": json.loads(message.attachments) if message.attachments else [],
        "waiting_s": round(max(0.0, now_s - message.received_ms / 1000), 1),
        "words": words[:WORDS_SHOWN] if left_out else words,
        "words_left_out": left_out,
    }


def conversation_view(chat: Conversation, inbox: Path, now_s: float) -> dict[str, Any]:
    """`next --json`: the conversation as one object."""
    return {
        "context_id": chat.context_id,
        "messages": [message_view(m, inbox, now_s) for m in chat.messages],
        "left_out": chat.left_out,
        **({"more_left_out": True} if chat.more_left_out else {}),
        "answered_before": chat.answered_before,
        "taken_by": chat.taken_by,
        "lease_s": None if chat.lease_s is None else round(chat.lease_s, 1),
    }


def render_conversation(view: dict[str, Any]) -> str:
    """`key: value` lines about the conversation, then each message: its lines, a blank
    line and the person's words (a stranger's text: control characters escaped, as
    everywhere the CLI prints chat text)."""
    messages = view["messages"]
    context = view["context_id"]
    head = [f"context_id: {printable(context, one_line=True)}"]
    more = " or more" if view.get("more_left_out") else ""
    count = f"{len(messages) + view['left_out']:,}{more} message" + (
        "s" if len(messages) + view["left_out"] != 1 else ""
    )
    head.append(f"waiting: {count}, the oldest for {duration(messages[0]['waiting_s'])}"
                if messages else "waiting: none")  # fmt: skip
    if view["left_out"]:
        head.append(f"left_out: {view['left_out']:,}{more} older waiting (the {len(messages)}"
                    " newest shown; history --unanswered lists all)")  # fmt: skip
    if view["answered_before"] and context:
        head.append(
            f"answered_before: {view['answered_before']} (history --context-id "
            f"{printable(context, one_line=True)})"
        )
    if view["taken_by"]:
        head.append(f"taken_by: {printable(view['taken_by'], one_line=True)}"
                    f" (lease {duration(view['lease_s'] or 0)})")  # fmt: skip
    blocks = ["\n".join(head)]
    blocks += [render_message(m, i, len(messages)) for i, m in enumerate(messages, 1)]
    return "\n\n".join(blocks) + "\n"


def render_message(view: dict[str, Any], number: int, of: int) -> str:
    lines = [
        f"[{number}/{of}] request_id: {view['request_id']}",
        f"time: {view['received_at']} (waiting {duration(view['waiting_s'])})",
        f"file: {printable(view['inbox_file'], one_line=True)}"
        + ("" if view["written"] else " (being written)"),
    ]
    if view["sender"]:
        lines.append(f"sender: {printable(who(view['sender']), one_line=True)}")
    if view["modality"]:
        lines.append(f"modality: {printable(view['modality'], one_line=True)}")
    for a in view["attachments"]:
        mime = f" ({a['mime']})" if a.get("mime") else ""
        lines.append(f"attachment: {printable(a['path'] + mime, one_line=True)}")
    words = printable(view["words"]) if view["words"] else "(no words)"
    if view["words_left_out"]:
        words += f"\n[... {view['words_left_out']:,} more characters: next --full shows all]"
    return "\n".join(lines) + "\n\n" + words


def render_newer(request_id: str, views: list[dict[str, Any]]) -> str:
    """What a refused reply prints: the newer messages, in the `next` format."""
    lines = [
        f"newer messages of this conversation wait ({len(views)}): reply to the newest"
        f" ({views[-1]['request_id']}) to answer them all, or add --anyway to answer up to"
        f" {request_id} only (the newer ones then stay waiting)."
    ]
    return "\n\n".join(lines + [render_message(v, i, len(views)) for i, v in
                               enumerate(views, 1)]) + "\n"  # fmt: skip


def who(sender: dict[str, str]) -> str:
    name = sender.get("name") or sender.get("username") or sender.get("id") or "?"
    extra = [f"@{sender['username']}"] if sender.get("username") else []
    extra += [f"id {sender['id']}"] if sender.get("id") else []
    return f"{name} ({', '.join(extra)})" if extra else name


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
