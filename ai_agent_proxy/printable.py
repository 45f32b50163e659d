"""Text safe to print on a terminal or in a log: chat text is written by strangers, and an
escape sequence in it must not recolour, clear or reorder what an operator reads.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls but tab and newline, DEL, C1 controls, and the bidi embedding/override/isolate
# controls (U+202A-U+202E, U+2066-U+2069) and marks (U+200E, U+200F, U+061C). Zero-width
# joiners stay: emoji need them and they move nothing.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile(_UNSAFE.pattern[:-1] + "\t\n]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def printable(value: Any, *, one_line: bool = False) -> str:
    """`value` as text safe to print on a terminal: unsafe characters visibly escaped (and
    tabs and newlines too, for a one-line cell); None as '-'."""
    text = "-" if value is None else str(value)
    return (_UNSAFE_LINE if one_line else _UNSAFE).sub(_escape, text)


# In JSON: C1 controls, DEL, the bidi controls and marks, and the line/paragraph separators
# (U+2028/U+2029 end a line in JavaScript and in some viewers). JSON itself escapes C0.
_UNSAFE_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def json_safe(text: str) -> str:
    """JSON text with those characters as \\uXXXX escapes: the same JSON value, and safe to
    print (they can only occur inside strings, where any character may be escaped)."""
    return _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
