"""Pure helpers on the hot path: body segments and the pre-rendered local answers."""

from __future__ import annotations

import json
import re

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ai_agent_proxy import wire
from ai_agent_proxy.bodies import split_body

from .conftest import FIXTURES

BODIES = [p.read_bytes() for p in sorted(FIXTURES.glob("*.json"))]


@given(st.binary(max_size=3000), st.lists(st.binary(max_size=300), max_size=3), st.booleans())
def test_segments_join_back_to_the_body(raw: bytes, heads: list[bytes], head_of_raw: bool) -> None:
    if head_of_raw:
        heads.append(raw[: len(raw) // 2])
    parts = split_body(raw, heads)
    assert b"".join(parts) == raw
    assert all(parts[1:])  # no empty segment after the first


def test_a_known_head_gives_the_same_segments_as_a_full_scan() -> None:
    for body in BODIES:
        parts = split_body(body)
        assert len(parts[0]) > 40_000  # the system prompt
        # another request of the same agent: same system prompt, different turn
        at = body.rindex(b'"content": "') + len(b'"content": "')
        other = body[:at] + b"x" + body[at:]
        assert split_body(other, [parts[0]]) == split_body(other)
        assert split_body(other, [parts[0]])[0] is parts[0]


def _normalized(answer: bytes) -> bytes:
    answer = re.sub(rb'"id":"chatcmpl-[0-9a-f]{24}"', b'"id":"X"', answer)
    return re.sub(rb'"created":\d+,', b'"created":0,', answer)


MODELS = ["local-agent", 'quote " and "id":"chatcmpl-template"', '"created":0,', "ü" * 20]


def test_pre_rendered_answers_equal_fresh_ones() -> None:
    for model in MODELS:
        for reply in ["", "working on it", '"created":0, "id":"chatcmpl-template"']:
            fresh = wire._render_chat_completion(model, reply, "chatcmpl-" + "0" * 24, 1)
            answer = wire.chat_completion(model, reply)
            assert _normalized(answer) == _normalized(fresh)
            parsed = orjson.loads(answer)
            assert (parsed["model"], parsed["choices"][0]["message"]["content"]) == (model, reply)
            assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", parsed["id"])
            assert abs(parsed["created"] - json.loads(fresh)["created"]) > 1_000_000  # now
            for usage in (True, False):
                fresh = wire._render_stream(model, reply, usage, "chatcmpl-" + "0" * 24, 1)
                stream = wire.chat_completion_stream(model, reply, usage)
                assert _normalized(stream) == _normalized(fresh)
    # two answers never share an id
    assert wire.chat_completion("m", "r") != wire.chat_completion("m", "r")
