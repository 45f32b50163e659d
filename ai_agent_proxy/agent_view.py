"""The short view of a request for an agent (`next`): who wrote, from where, what they sent,
how long it has waited, and their words; not OpenClaw's 50 KB system prompt. Pure: the
caller reads the row and the counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .printable import printable
from .rows import PendingRow

WORDS_SHOWN = 2000  # characters of the person's words; the rest is in the file (--full)


def agent_view(row: PendingRow, inbox_path: Path, waited_s: float, earlier: int) -> dict[str, Any]:
    """The fields of the view, by name (also what `next --json` prints)."""
    words = row.latest_user_prompt
    left_out = max(0, len(words) - WORDS_SHOWN)
    return {
        "request_id": row.id,
        "inbox_file": str(inbox_path),
        "context_id": row.context_id,
        "sender": json.loads(row.sender) if row.sender else None,
        "modality": row.modality,
        "attachments": json.loads(row.attachments) if row.attachments else [],
        "waiting_s": round(max(0.0, waited_s), 1),
        "earlier_messages": earlier,
        "words": words[:WORDS_SHOWN] if left_out else words,
        "words_left_out": left_out,
    }


def render_text(view: dict[str, Any]) -> str:
    """`key: value` lines, then a blank line and the person's words (stranger's text:
    control characters escaped, as everywhere the CLI prints chat text)."""
    lines = [
        f"request_id: {view['request_id']}",
        f"file: {printable(view['inbox_file'], one_line=True)}",
        f"context_id: {printable(view['context_id'], one_line=True)}",
    ]
    if view["sender"]:
        lines.append(f"sender: {printable(_who(view['sender']), one_line=True)}")
    if view["modality"]:
        lines.append(f"modality: {printable(view['modality'], one_line=True)}")
    for a in view["attachments"]:
        mime = f" ({a['mime']})" if a.get("mime") else ""
        lines.append(f"attachment: {printable(a['path'] + mime, one_line=True)}")
    lines.append(f"waiting: {_duration(view['waiting_s'])}")
    if view["earlier_messages"] and view["context_id"]:
        lines.append(
            f"earlier: {view['earlier_messages']} in this conversation "
            f"(history --context-id {printable(view['context_id'], one_line=True)})"
        )
    words = printable(view["words"]) if view["words"] else "(no words)"
    if view["words_left_out"]:
        words += f"\n[... {view['words_left_out']:,} more characters: next --full shows all]"
    return "\n".join(lines) + "\n\n" + words + "\n"


def _who(sender: dict[str, str]) -> str:
    name = sender.get("name") or sender.get("username") or sender.get("id") or "?"
    extra = [f"@{sender['username']}"] if sender.get("username") else []
    extra += [f"id {sender['id']}"] if sender.get("id") else []
    return f"{name} ({', '.join(extra)})" if extra else name


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
