"""context.py: pure extraction of context_id, message_id and the person's latest text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_agent_proxy.context import RETRY_NOTICE, clean_user_text, extract_context

from .conftest import FIXTURE_CONTEXTS, fixture_body


@pytest.mark.parametrize(("name", "expected"), sorted(FIXTURE_CONTEXTS.items()))
def test_openclaw_2026_9_fixtures(name: str, expected: tuple[str | None, str]) -> None:
    ctx = extract_context(fixture_body(name))
    assert (ctx.context_id, ctx.latest_user_prompt) == expected


def test_fixture_message_ids_feed_retry_detection() -> None:
    assert (
        extract_context(fixture_body("openclaw-2026.9-telegram-dm-turn1.json")).message_id == "11"
    )
    assert (
        extract_context(fixture_body("openclaw-2026.9-telegram-dm-turn2.json")).message_id == "12"
    )
    assert extract_context(fixture_body("openclaw-2026.9-cli-local.json")).message_id is None


def openclaw_retry_of(body: dict[str, Any]) -> dict[str, Any]:
    """What OpenClaw sends after an empty answer: the same turn plus a notice."""
    retry = json.loads(json.dumps(body))
    retry["messages"].append(
        {"role": "user", "content": f"{RETRY_NOTICE}. Please answer the user's last message."}
    )
    return retry


def test_retry_notice_is_not_the_persons_text() -> None:
    body = openclaw_retry_of(fixture_body("openclaw-2026.9-telegram-dm-turn2.json"))
    ctx = extract_context(body)
    assert ctx.latest_user_prompt == "second message, normal mode"
    assert (ctx.context_id, ctx.message_id) == ("telegram:123456789", "12")


def test_older_openclaw_shape() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are helpful.\n| channel=whatsapp | agent=main"},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": "[Mon 2025-06-02 09:15 UTC] Conversation info (untrusted metadata):\n"
                '```json\n{"sender": {"e164": "+15550001111", "name": "Ann"}}\n```\n\n'
                "book a table for two\n\nRuntime: agent=main | channel=whatsapp",
            },
        ]
    }
    ctx = extract_context(body)
    assert ctx.context_id == "whatsapp:+15550001111"
    assert ctx.latest_user_prompt == "book a table for two"


def test_older_shape_sender_id_at_top_level() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "x | channel=discord"},
            {"role": "user", "content": '```json\n{"sender_id": "u-77"}\n```\nhey'},
        ]
    }
    assert extract_context(body).context_id == "discord:u-77"


def test_explicit_fields_win() -> None:
    body = {
        "thread_id": "  ",
        "conversation_id": "conv-9",
        "recipient": "bob",
        "messages": [{"role": "system", "content": "| channel=ignored"}],
    }
    assert extract_context(body).context_id == "conv-9:bob"


def test_channel_alone_and_none() -> None:
    assert extract_context({"channel": "slack", "messages": []}).context_id == "slack"
    assert extract_context({"messages": [{"role": "user", "content": "hi"}]}).context_id is None


def test_plain_openai_body_latest_user_text_from_parts() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at this"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                    {"type": "text", "text": "and this"},
                ],
            },
        ]
    }
    assert extract_context(body).latest_user_prompt == "look at this\nand this"


def test_plain_text_in_brackets_is_kept() -> None:
    assert clean_user_text("[draft] my plan: step 1") == "[draft] my plan: step 1"
    assert clean_user_text("[Tue 2026-11-24 21:17 UTC] hello") == "hello"


@pytest.mark.parametrize(
    "body",
    [
        None, [], "x", 1, {"messages": None}, {"messages": "str"}, {"messages": [None, 1, "x"]},
        {"messages": [{"role": "user", "content": [None, {"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": {"text": "dict"}}]},
        {"channel": 5, "target": ["x"], "messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> \"\\"}]},
        {"messages": [{"role": "user", "content": "```json\n[1,2]\n```\n```json\n{bad\n```"}]},
    ],
)  # fmt: skip
def test_odd_bodies_do_not_raise(body: Any) -> None:
    ctx = extract_context(body)
    assert isinstance(ctx.latest_user_prompt, str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", 3])},
    optional={
        "content": st.one_of(
            st.text(),
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})),
            json_values,
        )
    },
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=5)},
        optional={"channel": json_values, "target": json_values, "chat_id": json_values},
    )
)
def test_extraction_never_raises(body: dict[str, Any]) -> None:
    ctx = extract_context(body)
    assert ctx.context_id is None or isinstance(ctx.context_id, str)
