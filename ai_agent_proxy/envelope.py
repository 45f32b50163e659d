"""Pure, linear-time readers of the wrapping OpenClaw puts around a person's words: time
stamps, fenced ```json blocks, the metadata envelopes made of them (`Conversation info:
...` and a block), the closing `Runtime: ...` line.

Chat text is written by strangers and Python's `re` has no time limit: a pattern with
overlapping quantifiers (`\\s*\\n.*?\\n\\s*````, tried again at every line) took 20 s on 4 KB of
newlines, on the event loop. So nothing here backtracks over the text: a regex only looks
at a bounded window (a stamp, a header) or runs without a pattern after it (`\\s*`), and
every search moves forward with str.find, so each character is looked at a bounded number
of times (tests/test_context.py times 16 KB against 64 KB of pathological text).

The grammar, as the regexes it replaces had it on every real body:
- a fenced block: "```json", whitespace holding a newline, the content, a newline,
  whitespace, "```" (the content ends at the first newline that such a close follows);
- an envelope: one or more of: a header line (a letter, then "info" or "metadata" as a
  word within its first 82 characters, to the end of the line), a fenced block on the next
  line, whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

OPEN = "```json"
CLOSE = "```"
# "[Tue 2026-11-24 21:20 UTC]": only brackets holding a clock time are a stamp. Bounded.
STAMP = re.compile(r"\[[^\]\n]{0,60}\d{1,2}:\d{2}[^\]\n]{0,40}\]")
# "Conversation info: ⟦openclaw:ctx⟧", "Sender metadata": a header line's start. Bounded.
_HEADER = re.compile(r"[A-Z][^\n`]{0,80}(?:info|metadata)\b")
_HEADER_ANY_CASE = re.compile(_HEADER.pattern, re.I)
# A stamped envelope's start, as one pattern run in C (Python per candidate line was ~4 µs,
# 0.2 s for 1 MiB of them): a stamp opening a line, whitespace, a header line, the opening
# ``` on the next. Linear: each line is one attempt's stamp or header line at most, and the
# backtracking of `\s*` and `[^\n]*` stays inside their own run and line.
_STAMPED_START = re.compile(
    r"^" + STAMP.pattern + r"\s*" + _HEADER.pattern + r"[^\n]*\n(?=" + OPEN + ")", re.M
)
_SPACE = re.compile(r"\s*")  # nothing after it: matches without backtracking
_INLINE_SPACE = re.compile(r"[^\S\n]*")  # whitespace but newlines
RUNTIME = "Runtime: "


class Block(NamedTuple):
    content_start: int
    content_end: int
    end: int  # just after the closing ```


def space_end(text: str, pos: int) -> int:
    """The end of the whitespace starting at `pos`."""
    return _SPACE.match(text, pos).end()  # type: ignore[union-attr]


class Fences:
    """The fenced blocks of one text. Searches for a closing fence are remembered: asked
    again from further on (the next opening), the last answer still holds up to its own
    newline, so a text of many openings and no close is searched once, not once each."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._asked_from = -1
        self._answer: tuple[int, int] | None = None

    def closing(self, start: int) -> tuple[int, int] | None:
        """(the newline that begins the earliest closing fence at or after `start`, the
        end of its ```), or None."""
        asked, answer = self._asked_from, self._answer
        if 0 <= asked <= start and (answer is None or start <= answer[0]):
            return answer
        text = self.text
        found = None
        newline = text.find("\n", start)
        while newline != -1:
            after = space_end(text, newline + 1)
            if text.startswith(CLOSE, after):
                found = (newline, after + len(CLOSE))
                break
            # every newline inside that whitespace leads to the same `after`: skip them
            newline = text.find("\n", after)
        self._asked_from, self._answer = start, found
        return found

    def block_at(self, pos: int) -> Block | None:
        """The fenced block whose ```json is at `pos`, or None."""
        text = self.text
        if not text.startswith(OPEN, pos):
            return None
        newline = _INLINE_SPACE.match(text, pos + len(OPEN)).end()  # type: ignore[union-attr]
        if not text.startswith("\n", newline):
            return None
        closing = self.closing(newline + 1)
        if closing is None:
            return None
        return Block(newline + 1, closing[0], closing[1])

    def blocks(self, limit: int) -> Iterator[str]:
        """The content of the first `limit` blocks, left to right (not overlapping)."""
        text = self.text
        pos = text.find(OPEN)
        while pos != -1 and limit > 0:
            if self.closing(pos) is None:
                return  # no block can close: none at all from here on
            block = self.block_at(pos)
            if block is None:
                pos = text.find(OPEN, pos + 1)
                continue
            limit -= 1
            yield text[block.content_start : block.content_end]
            pos = text.find(OPEN, block.end)


# A message holds one or two blocks (OpenClaw's envelope, an older sender block), a system
# prompt a few; reading any number of them was ~3 µs each (0.3 s for 1 MiB of `{}` blocks).
BLOCKS_READ = 64


def fenced_blocks(text: str, limit: int = BLOCKS_READ) -> Iterator[str]:
    """The content of each ```json block in `text` (the first `limit` of them)."""
    return Fences(text).blocks(limit) if OPEN in text else iter(())


def envelope_end(text: str, pos: int, fences: Fences, *, any_case: bool = False) -> int | None:
    """Where the envelopes starting at `pos` end (with the whitespace after them), or None
    when none starts there."""
    header = _HEADER_ANY_CASE if any_case else _HEADER
    end = None
    while (match := header.match(text, pos)) is not None:
        eol = text.find("\n", match.end())
        block = None if eol == -1 else fences.block_at(eol + 1)
        if block is None:
            break
        pos = end = space_end(text, block.end)
    return end


def strip_leading_envelope(text: str) -> str:
    """`text` without a stamp at its start, then the envelopes there (any case)."""
    stamp = STAMP.match(text)
    if stamp is not None:
        text = text[space_end(text, stamp.end()) :]
    end = envelope_end(text, 0, Fences(text), any_case=True) if OPEN in text else None
    return text if end is None else text[end:]


# OpenClaw wraps each message once; a queued or merged one keeps a few. Stripping any number
# was ~10 µs each (0.25 s for 1 MiB of them); past this many the rest stays text.
ENVELOPES_STRIPPED = 64


def strip_stamped_envelopes(text: str) -> str:
    """`text` without each stamped envelope that starts a line (a stamp, whitespace, one or
    more envelopes), the first ENVELOPES_STRIPPED of them: what a queued re-send keeps of
    its own wrapping."""
    if OPEN not in text:
        return text
    fences, kept, last, pos = Fences(text), [], 0, 0
    while (
        len(kept) < ENVELOPES_STRIPPED and (start := _STAMPED_START.search(text, pos)) is not None
    ):
        if fences.closing(start.end()) is None:
            break  # no block can close: no envelope from here on
        stamp_end = STAMP.match(text, start.start()).end()  # type: ignore[union-attr]
        end = envelope_end(text, space_end(text, stamp_end), fences)
        if end is None:  # (cannot be: the search found a header and an opening)
            pos = start.end()
            continue
        kept.append(text[last : start.start()])
        last = pos = end  # (`^` holds at `end` when the whitespace it took ends a line)
    return "".join(kept) + text[last:] if kept else text


def strip_runtime_line(text: str) -> str:
    """`text` without OpenClaw's `Runtime: ...` line when it is the last line with words
    (and the newline before it, and the whitespace after)."""
    words_end = len(text.rstrip())
    line = text.rfind("\n", 0, words_end) + 1
    if not text.startswith(RUNTIME, line):
        return text
    return text[: max(0, line - 1)]


def ends_text(text: str, start: int, rest_of_line: str = "") -> bool:
    """Whether text[start:] is only whitespace, or `rest_of_line` followed by anything but a
    newline, then whitespace: what is left after a closing paragraph of OpenClaw's."""
    words_end = len(text.rstrip())
    if start >= words_end:
        return True
    return bool(rest_of_line) and text.startswith(rest_of_line, start) and (
        text.rfind("\n", 0, words_end) < start
    )  # fmt: skip


def header_block(text: str, header: str) -> str | None:
    """The content of the block that follows a first line starting with the word(s)
    `header`, or None: `Conversation info: ...\\n```json\\n{...}\\n````."""
    if not text.startswith(header):
        return None
    after = len(header)
    if after < len(text) and (text[after].isalnum() or text[after] == "_"):
        return None  # (`\\b`: "Conversation informal" is not it)
    eol = text.find("\n", after)
    block = None if eol == -1 else Fences(text).block_at(eol + 1)
    return None if block is None else text[block.content_start : block.content_end]
