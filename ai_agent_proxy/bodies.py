"""Raw request bodies: parsing, and cutting into content-addressed segments that join
back byte for byte. Pure: no I/O.

Cuts fall where a chat message starts (`{"role":`) and where `"tools":` starts, so the
system prompt, each earlier message and the tool list are segments that repeat verbatim from
one request of a conversation to the next and are stored once. Joining the segments always
gives back the exact bytes, wherever the cuts fall.

An agent's bodies all start with the same ~50 KB head (its system prompt); `KnownHeads`
remembers recent heads so that a body starting with one is cut, and parsed, only past it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

MIN_SEGMENT = 192  # smaller pieces cost more to reference than they save
HEAD_MIN = 4096  # first segments at least this long are looked for in later bodies
HEADS_KEPT = 8  # one per agent (system prompt) sending at the same time
SHARED_STRING_MIN = 1024  # a head's longest string is parsed once if at least this long


def loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits that the stdlib (and JSON) allow.
        return json.loads(raw)


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _find_all(raw: bytes, needle: bytes) -> list[int]:
    found, i = [], raw.find(needle)
    while i != -1:
        found.append(i)
        i = raw.find(needle, i + len(needle))
    return found


def cut_points(raw: bytes) -> list[int]:
    """Offsets of `{` opening a `{"role": ...}` object, and of the `"tools"` key.
    (bytes.find runs at memory speed; a regex over 60 KB costs ten times more.)"""
    cuts = _find_all(raw, b'"tools"')
    for i in _find_all(raw, b'"role"'):
        brace = raw.rfind(b"{", max(0, i - 8), i)
        if brace != -1 and not raw[brace + 1 : i].strip():
            cuts.append(brace)
    cuts.sort()
    return cuts


def split_body(raw: bytes, known_heads: Iterable[bytes] = ()) -> list[bytes]:
    """Cut `raw` into segments. A body that starts with one of `known_heads` (large first
    segments of earlier bodies: an agent's system prompt) keeps it as its first segment
    and only the rest is scanned, as scanning is most of the cost of a 60 KB body."""
    for head in known_heads:
        if _starts(raw, head):
            return [head, *_split(raw[len(head) :])]
    return _split(raw)


def _starts(raw: bytes, head: bytes) -> bool:
    return len(raw) > len(head) and raw.startswith(head)


def _split(raw: bytes) -> list[bytes]:
    parts: list[bytes] = []
    start = 0
    for cut in cut_points(raw):
        if cut - start >= MIN_SEGMENT:
            parts.append(raw[start:cut])
            start = cut
    parts.append(raw[start:])
    return parts


def pack_ids(ids: Sequence[int]) -> bytes:
    packed = array("I", ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    ids = array("I")
    ids.frombytes(blob)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids.tolist()


def join_segments(ids: Sequence[int], data: Mapping[int, bytes]) -> bytes:
    return b"".join(data[i] for i in ids)


Path = tuple[str | int, ...]


@dataclass
class _Head:
    raw: bytes
    # Set by `_prepare` on the second body with this head: the head with its longest
    # string replaced by a sentinel, where that string lands in a parsed body, its value.
    prepared: bool = False
    skeleton: bytes | None = None
    path: Path = ()
    sentinel: str = field(default_factory=lambda: "aiap-head-" + secrets.token_hex(8))
    value: Any = None


class KnownHeads:
    """Large first segments of recent bodies, newest first (one per agent sending).

    Parsing a 60 KB OpenClaw body costs ~100 us, most of it turning the 49 KB system prompt
    into a Python string. A body that starts with a known head is parsed with the head's
    longest string swapped for a short sentinel, which is then replaced by the string
    parsed from an earlier body. Same result: the bytes before and after differ only inside
    one string token, and JSON tokens are found left to right, so the head's string is the
    same token with the same value in every body that starts with the head. Anything
    unexpected (the sentinel not where it was, invalid JSON) falls back to a full parse,
    which also gives the error message positions in the real body."""

    def __init__(self) -> None:
        self._heads: list[_Head] = []

    def __iter__(self) -> Iterator[bytes]:
        return (h.raw for h in self._heads)

    def remember(self, head: bytes) -> None:
        """`head`: the first segment of a body that parsed as JSON."""
        if len(head) < HEAD_MIN or (self._heads and self._heads[0].raw is head):
            return
        for i, known in enumerate(self._heads):
            if known.raw == head:
                self._heads.insert(0, self._heads.pop(i))
                return
        self._heads.insert(0, _Head(head))
        del self._heads[HEADS_KEPT:]

    def parse(self, raw: bytes) -> Any:
        """`loads(raw)`, skipping the parse of a known head's longest string."""
        head = next((h for h in self._heads if _starts(raw, h.raw)), None)
        if head is None:
            return loads(raw)
        if not head.prepared:
            return _prepare(head, raw)
        if head.skeleton is None:
            return loads(raw)
        try:
            body = loads(head.skeleton + raw[len(head.raw) :])
            parent = _at(body, head.path[:-1])
            if parent[head.path[-1]] == head.sentinel:
                parent[head.path[-1]] = head.value
                return body
        except (ValueError, RecursionError, LookupError, TypeError):
            pass
        return loads(raw)


def _prepare(head: _Head, raw: bytes) -> Any:
    """Parse `raw` in full, and learn from it how to parse later bodies with this head."""
    head.prepared = True
    body = loads(raw)
    span = _longest_string(head.raw)
    if span is None or span[1] - span[0] < SHARED_STRING_MIN:
        return body
    start, end = span
    skeleton = head.raw[: start + 1] + head.sentinel.encode() + head.raw[end:]
    try:
        sketch = loads(skeleton + raw[len(head.raw) :])
    except (ValueError, RecursionError):
        return body
    paths = list(_paths_to(sketch, head.sentinel, ()))
    if len(paths) != 1:
        return body
    path = paths[0]
    _at(sketch, path[:-1])[path[-1]] = value = _at(body, path)
    if sketch == body:  # checked once per head, for the very unlikely
        head.skeleton, head.path, head.value = skeleton, path, value
    return body


def _longest_string(head: bytes) -> tuple[int, int] | None:
    """Offsets of the quotes around the longest string in `head`, a prefix of a JSON
    document. Outside strings there are no quotes, and inside one every quote is escaped,
    so the unescaped quotes pair up into the string tokens."""
    quotes = []
    at = head.find(b'"')
    while at != -1:
        before = at
        while before > 0 and head[before - 1] == 0x5C:  # backslash
            before -= 1
        if (at - before) % 2 == 0:
            quotes.append(at)
        at = head.find(b'"', at + 1)
    if not quotes or len(quotes) % 2:
        return None
    return max(zip(quotes[::2], quotes[1::2], strict=True), key=lambda q: q[1] - q[0])


def _paths_to(node: Any, value: str, path: Path) -> Iterator[Path]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _paths_to(child, value, (*path, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _paths_to(child, value, (*path, i))
    elif node == value:
        yield path


def _at(node: Any, path: Path) -> Any:
    for key in path:
        node = node[key]
    return node
