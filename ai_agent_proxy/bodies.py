"""Raw request bodies: parsing, and cutting into content-addressed segments that join
back byte for byte. Pure: no I/O.

Cuts fall where a chat message starts (`{"role":`) and where `"tools":` starts, so the
system prompt, each earlier message and the tool list are segments that repeat verbatim from
one request of a conversation to the next and are stored once. Joining the segments always
gives back the exact bytes, wherever the cuts fall.

An agent's bodies all start with the same large head (its system prompt) and end with the
same tail (its tools); `BodyParser` remembers recent ones so that a body with them is cut
only past the head, and parsed without parsing them again. Its argument is in its docstring.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

MIN_SEGMENT = 192  # smaller pieces cost more to reference than they save
PIECE_MIN = 4096  # first and last segments at least this long are looked for in later bodies
# ... and at most this long: a system prompt is far smaller, and one odd huge body must not
# stay in memory after its request.
PIECE_MAX = 1024 * 1024
PIECES_KEPT = 8  # one per agent (system prompt, tools) sending at the same time
SHARED_VALUE_MIN = 1024  # a piece's large value is parsed once if at least this long
SHARE_REPEATED_PIECES = True  # False: parse every body in full (see BodyParser)


MAX_DEPTH = 254  # levels of arrays and objects: what orjson renders; chat bodies use ~12
# From this size on a document is parsed by the standard library: as fast there, and a
# quarter of the memory (orjson took 185 MiB at its peak for a 15 MiB body, json 46 MiB).
LARGE_DOCUMENT = 1 << 20


class TooDeep(ValueError):
    """Valid JSON, nested deeper than MAX_DEPTH: refused all the same."""


def loads(raw: bytes) -> Any:
    """Parse a JSON document, strictly: what JSON allows, nothing else. orjson first; the
    standard library for what orjson refuses but JSON allows (lone surrogate escapes, as
    when a JS client cuts an emoji in half), and for documents of LARGE_DOCUMENT bytes or
    more. NaN, Infinity and numbers beyond a double's range are not JSON and raise
    ValueError. (Depth: see check_depth.)"""
    if len(raw) >= LARGE_DOCUMENT:
        try:
            return json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)
        except RecursionError:  # (about 990 levels: past MAX_DEPTH in any case)
            raise TooDeep(f"nested deeper than {MAX_DEPTH} levels") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise TooDeep(f"nested deeper than {MAX_DEPTH} levels") from None
        return json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)


def check_depth(value: Any, large: bool = False) -> None:
    """Raise ValueError if `value` nests deeper than MAX_DEPTH, the limit every reader and
    renderer here honours (orjson renders 254 levels; Python's json reads about 990).
    Serialising with orjson is the cheapest exact test; a `large` value is walked instead
    (a serialised copy of it would be as large)."""
    if large:
        if _depth(value) > MAX_DEPTH:
            raise TooDeep(f"nested deeper than {MAX_DEPTH} levels")
        return
    try:
        orjson.dumps(value)
        return
    except TypeError as exc:  # orjson.JSONEncodeError
        if "Recursion limit" in str(exc):
            raise TooDeep(f"nested deeper than {MAX_DEPTH} levels") from None
    # orjson stopped at something else first (a lone surrogate, a huge integer): measure.
    if _depth(value) > MAX_DEPTH:
        raise TooDeep(f"nested deeper than {MAX_DEPTH} levels")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node)
    return deepest


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError(f"number {text[:40]} is beyond the range of a double")
    return value


_INF = float("inf")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(value: Any, *, indent: bool = False, sort_keys: bool = False) -> bytes:
    """JSON bytes (UTF-8, not ASCII-escaped) for anything `loads` returns, faithfully: also
    for strings holding lone surrogates, written as their `\\udXXX` escape (valid UTF-8,
    the same value when read back), and integers beyond 64 bits."""
    option = (orjson.OPT_INDENT_2 if indent else 0) | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(value, option=option)
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate, a huge integer
        pass
    text = json.dumps(
        value, ensure_ascii=False, indent=2 if indent else None, sort_keys=sort_keys,
        separators=None if indent else (",", ":"),
    )  # fmt: skip
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8")


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
    (bytes.find runs at memory speed; a regex over a whole body costs far more.)"""
    cuts = _find_all(raw, b'"tools"')
    for i in _find_all(raw, b'"role"'):
        brace = raw.rfind(b"{", max(0, i - 8), i)
        if brace != -1 and not raw[brace + 1 : i].strip():
            cuts.append(brace)
    cuts.sort()
    return cuts


def split_body(
    raw: bytes, known_heads: Iterable[bytes] = (), known_tails: Iterable[bytes] = ()
) -> list[bytes]:
    """Cut `raw` into segments. A body that starts with one of `known_heads` (large first
    segments of earlier bodies: an agent's system prompt) keeps it as its first segment,
    one that ends with one of `known_tails` (its tools) as its last, and only the rest is
    scanned, as scanning is most of the cost of a large body."""
    head = next((h for h in known_heads if _starts(raw, h)), b"")
    tail = next((t for t in known_tails if _ends(raw, t) and len(head) + len(t) < len(raw)), b"")
    if not head and not tail:
        return _split(raw)
    return [p for p in (head, *_split(raw[len(head) : len(raw) - len(tail)]), tail) if p]


def _starts(raw: bytes, head: bytes) -> bool:
    return len(raw) > len(head) and raw.startswith(head)


def _ends(raw: bytes, tail: bytes) -> bool:
    return len(raw) > len(tail) and raw.endswith(tail)


def _split(raw: bytes) -> list[bytes]:
    parts: list[bytes] = []
    start = 0
    for cut in cut_points(raw):
        # The tool list is cut off even after a short last message: it repeats, that doesn't.
        if cut - start >= MIN_SEGMENT or (cut > start and raw.startswith(b'"tools"', cut)):
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


class PieceState(Enum):
    NEW = "new"  # seen in one body: its value is parsed with the rest
    SHARED = "shared"  # skeleton ready: later bodies get the value parsed once
    UNSHARED = "unshared"  # looked at, nothing worth sharing (or unsafe): parsed in full


@dataclass
class _Piece:
    """A large piece that starts (a head) or ends (a tail) bodies verbatim."""

    raw: bytes
    state: PieceState = PieceState.NEW
    # SHARED only: the piece with its large value swapped for a sentinel string, where the
    # value lands in a parsed body, the value, and a bound on the nesting the piece adds.
    skeleton: bytes = b""
    path: Path = ()
    sentinel: str = field(default_factory=lambda: "aiap-piece-" + secrets.token_hex(8))
    value: Any = None
    depth: int = 0


@dataclass(frozen=True)
class ParsedBody:
    value: Any  # what loads(raw) gives (sharing values with other bodies: see BodyParser)
    segments: list[bytes]  # raw cut for storage (split_body), joined back byte for byte


class BodyParser:
    """Parses request bodies (and cuts them into segments), skipping the work on the large
    pieces that recent bodies start or end with: the head is an agent's system prompt up to
    the next message, the tail its tool list to the end (one of each per agent, newest
    first). The app owns one; the writer process another; the outbox never sees it.

    Most of parsing an OpenClaw body is making Python objects of those two pieces. A
    body with a known head or tail is parsed with the piece's large value (the head's
    longest string, the tail's first value) swapped for a short sentinel string, which is
    then replaced by the value parsed from an earlier body. Why the result equals a full
    parse: JSON tokens are found left to right, so a string token inside an identical head
    is the same token with the same value whatever follows; the tail is one key and its
    value, then the rest of the top-level object, so in any valid body ending with it the
    value lands at the same top-level key. This is checked once per piece when it is
    prepared (the sketch must equal the full parse), the sentinel is checked in place on
    every parse, and anything unexpected (a sentinel not where it was, invalid JSON) falls
    back to a full parse, which also gives error messages their positions in the real body.

    Shared values: the values swapped back in are the same objects in every body parsed
    with them. Nothing below a body's top level is ever changed: the two places that build
    new bodies (inbox.build_payload, relay.prepare_body) copy the top level and never write
    below it. `enabled=False` turns the sharing off (every body parsed in full)."""

    def __init__(self, enabled: bool = SHARE_REPEATED_PIECES) -> None:
        self.enabled = enabled
        self._heads: list[_Piece] = []
        self._tails: list[_Piece] = []

    @property
    def heads(self) -> list[bytes]:
        """The heads known now, newest first."""
        return [h.raw for h in self._heads]

    def read(self, raw: bytes) -> ParsedBody:
        """Parse and cut a request body; raise ValueError if it is not JSON the proxy
        accepts (see loads and check_depth). Its pieces are remembered for later bodies."""
        value, depth_bound = self._parse(raw)
        if depth_bound is None or depth_bound > MAX_DEPTH:
            # the exact test, when the cheap bound does not settle it
            check_depth(value, large=len(raw) >= LARGE_DOCUMENT)
        segments = self.split(raw)
        self.remember(segments)
        return ParsedBody(value, segments)

    def split(self, raw: bytes) -> list[bytes]:
        """split_body, past the known heads and tails."""
        if not self.enabled:
            return split_body(raw)
        return split_body(raw, (h.raw for h in self._heads), (t.raw for t in self._tails))

    def remember(self, segments: Sequence[bytes]) -> None:
        """`segments`: the split_body of a body that parsed as JSON."""
        if not self.enabled:
            return
        _remember(self._heads, segments[0])
        if len(segments) > 1 and segments[-1].startswith(b'"'):
            _remember(self._tails, segments[-1])

    def parse(self, raw: bytes, *, learn: bool = False) -> Any:
        """`loads(raw)`, skipping the parse of known heads' and tails' large values. With
        `learn`, a valid body's pieces are remembered (for a caller that does not split
        bodies and `remember` itself: the writer process)."""
        value, _ = self._parse(raw)
        if learn and self.enabled:
            self.remember(self.split(raw))
        return value

    def _parse(self, raw: bytes) -> tuple[Any, int | None]:
        """(the body, a bound on its nesting depth, or None when none is known cheaply)."""
        if not self.enabled or len(raw) >= LARGE_DOCUMENT:  # (sharing copies the body twice)
            return loads(raw), None
        head = next((h for h in self._heads if _starts(raw, h.raw)), None)
        tail = next((t for t in self._tails if _ends(raw, t.raw)), None)
        if head and tail and len(head.raw) + len(tail.raw) > len(raw):
            tail = None  # they overlap
        if (head and head.state is PieceState.NEW) or (tail and tail.state is PieceState.NEW):
            body = loads(raw)
            if head and head.state is PieceState.NEW:
                _prepare(head, body, _longest_string(head.raw), lambda s: s + raw[len(head.raw) :])
            if tail and tail.state is PieceState.NEW:
                _prepare(tail, body, _first_value(tail.raw), lambda s: raw[: -len(tail.raw)] + s)
            return body, None
        head = head if head and head.state is PieceState.SHARED else None
        tail = tail if tail and tail.state is PieceState.SHARED else None
        if head is None and tail is None:
            return loads(raw), None
        fresh = raw[len(head.raw) if head else 0 : len(raw) - len(tail.raw) if tail else None]
        doc = b"".join((head.skeleton if head else b"", fresh, tail.skeleton if tail else b""))
        try:
            body = loads(doc)
            for piece in (head, tail):
                if piece and not _put_back(body, piece):
                    return loads(raw), None
        except (ValueError, RecursionError, LookupError, TypeError):
            return loads(raw), None
        # Nesting: what the fresh bytes can open, plus what the shared pieces add.
        bound = fresh.count(b"[") + fresh.count(b"{")
        return body, bound + sum(p.depth for p in (head, tail) if p)


def _put_back(body: Any, piece: _Piece) -> bool:
    """Replace the piece's sentinel in `body` by its value; False if it is not there."""
    parent = _at(body, piece.path[:-1])
    if parent[piece.path[-1]] != piece.sentinel:
        return False
    parent[piece.path[-1]] = piece.value
    return True


def _remember(pieces: list[_Piece], raw: bytes) -> None:
    if not PIECE_MIN <= len(raw) <= PIECE_MAX or (pieces and pieces[0].raw is raw):
        return
    for i, known in enumerate(pieces):
        if known.raw == raw:
            pieces.insert(0, pieces.pop(i))
            return
    pieces.insert(0, _Piece(raw))
    del pieces[PIECES_KEPT:]


def _prepare(
    piece: _Piece, body: Any, span: tuple[int, int] | None, wrap: Callable[[bytes], bytes]
) -> None:
    """Learn from `body` (the parsed body with this piece) how to parse later ones:
    `span` is where the large value is in the piece, `wrap` puts a piece in the body."""
    piece.state = PieceState.UNSHARED
    if span is None or span[1] - span[0] < SHARED_VALUE_MIN:
        return
    skeleton = piece.raw[: span[0]] + orjson.dumps(piece.sentinel) + piece.raw[span[1] :]
    try:
        sketch = loads(wrap(skeleton))
        paths = list(_paths_to(sketch, piece.sentinel, ()))
    except (ValueError, RecursionError):  # (a body too deep to search is parsed in full)
        return
    if len(paths) != 1:
        return
    path = paths[0]
    _at(sketch, path[:-1])[path[-1]] = value = _at(body, path)
    if sketch == body:  # checked once per piece, for the very unlikely
        piece.skeleton, piece.path, piece.value = skeleton, path, value
        # the skeleton's own brackets, and the value's depth below its place
        piece.depth = skeleton.count(b"[") + skeleton.count(b"{") + _depth(value)
        piece.state = PieceState.SHARED


def _string_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each string token in `data`, a piece of a JSON document that starts
    outside a string, quotes included. Outside strings there are no quotes, and inside one
    every quote is escaped, so the unescaped quotes pair up into the string tokens."""
    quotes = []
    at = data.find(b'"')
    while at != -1:
        before = at
        while before > 0 and data[before - 1] == 0x5C:  # backslash
            before -= 1
        if (at - before) % 2 == 0:
            quotes.append(at)
        at = data.find(b'"', at + 1)
    if len(quotes) % 2:
        return []
    return [(a, b + 1) for a, b in zip(quotes[::2], quotes[1::2], strict=True)]


def _longest_string(head: bytes) -> tuple[int, int] | None:
    return max(_string_spans(head), key=lambda s: s[1] - s[0], default=None)


def _first_value(tail: bytes) -> tuple[int, int] | None:
    """Where the value of the key that `tail` starts with is (`"tools": [...]`)."""
    try:
        text = tail.decode()
        key = _KEY.match(text)
        if key is None:
            return None
        _, end = json.JSONDecoder().raw_decode(text, key.end())
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return None
    return len(text[: key.end()].encode()), len(text[:end].encode())


_KEY = re.compile(r'"(?:[^"\\]|\\.)*"\s*:\s*')


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
