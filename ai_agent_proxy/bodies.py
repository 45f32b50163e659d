"""Pure functions that cut a raw request body into content-addressed segments and join
them back, byte for byte.

Cuts fall where a chat message starts (`{"role":`) and where `"tools":` starts, so the
system prompt, each earlier message and the tool list are segments that repeat verbatim from
one request of a conversation to the next and are stored once. Joining the segments always
gives back the exact bytes, wherever the cuts fall.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Mapping, Sequence

MIN_SEGMENT = 192  # smaller pieces cost more to reference than they save


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


def split_body(raw: bytes, known_heads: Sequence[bytes] = ()) -> list[bytes]:
    """Cut `raw` into segments. A body that starts with one of `known_heads` (large first
    segments of earlier bodies: an agent's system prompt) keeps it as its first segment
    and only the rest is scanned, as scanning is most of the cost of a 60 KB body."""
    for head in known_heads:
        if len(raw) > len(head) and raw.startswith(head):
            return [head, *_split(raw[len(head) :])]
    return _split(raw)


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
