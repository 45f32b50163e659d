"""The grammar of OpenClaw's wrapping (ai_agent_proxy/envelope.py), read in linear time:
what each reader takes and what it leaves, on the shapes the real gateway sends and on
the edges a stranger can type. (Their speed: tests/test_context.py.)"""

from __future__ import annotations

import pytest

from ai_agent_proxy import envelope as env
from ai_agent_proxy.context import (
    ATTACHMENTS_MAX,
    DATA_BLOCKS_READ,
    INTERNAL_BEGIN,
    _data_blocks,
    clean_user_text,
    split_media,
)

WRAPPED = (
    "[Tue 2026-11-24 21:21 UTC] Conversation info: ⟦openclaw:ctx⟧\n```json\n"
    '{"sender":{"id":"123456789","name":"Alice Tester"}}\n```\n\nsecond message'
)


def test_a_fenced_block_is_read_between_its_opening_line_and_the_first_close() -> None:
    assert list(env.fenced_blocks('a\n```json\n{"a": 1}\n```\nb')) == ['{"a": 1}']
    assert list(env.fenced_blocks("```json  \n  {}\n   ```")) == ["  {}"]
    # the content ends at the first newline a close follows, not at a later one
    assert list(env.fenced_blocks("```json\n1\n```\n2\n```")) == ["1"]
    assert list(env.fenced_blocks("```json\n\n```")) == [""]
    # the opening's line must end after whitespace; a close needs its own line
    assert list(env.fenced_blocks("```json {}\n```")) == []
    assert list(env.fenced_blocks("```json\n{} ```")) == []
    assert list(env.fenced_blocks("```json\n{}")) == []
    assert list(env.fenced_blocks("no block here")) == []


def test_blocks_follow_one_another_and_a_text_reads_only_the_first_ones() -> None:
    two = "```json\n1\n```\ntext\n```json\n2\n```"
    assert list(env.fenced_blocks(two)) == ["1", "2"]
    # an opening inside a block's content is content
    assert list(env.fenced_blocks("```json\n```json\n```")) == ["```json"]
    many = "```json\n{}\n```\n" * (env.BLOCKS_READ + 5)
    assert len(list(env.fenced_blocks(many))) == env.BLOCKS_READ
    assert len(list(env.fenced_blocks(many, limit=2))) == 2
    # an opening with no close: the ones after it are still read when they close
    assert list(env.fenced_blocks("```json x\n```json\n3\n```")) == ["3"]


def test_a_closing_search_asked_again_from_further_on_gives_the_right_close() -> None:
    text = "a\nb\n```c\n```"
    fences = env.Fences(text)
    assert fences.closing(0) == (3, 7)
    assert fences.closing(2) == (3, 7)  # remembered: nothing closes before 3
    assert fences.closing(3) == (3, 7)
    assert fences.closing(4) == (8, 12)  # past the remembered close: searched again
    assert fences.closing(9) is None
    assert fences.closing(10) is None
    assert fences.closing(0) == (3, 7)  # asked from before the last search: searched again
    # whitespace between the newline and the ```, newlines in it included
    assert env.Fences("x\n \n\t```").closing(0) == (1, 8)


def test_an_envelope_is_header_lines_each_with_a_block() -> None:
    text = "Conversation info: x\n```json\n{}\n```\n\nSender metadata\n```json\n{}\n```\n  words"
    fences = env.Fences(text)
    end = env.envelope_end(text, 0, fences)
    assert text[end:] == "words"
    # a header is a word "info" or "metadata" within the line's first 82 characters
    for header, found in (
        ("A info", True), ("Info about this", False), ("X" + "y" * 80 + " info", False),
        ("X" + "y" * 79 + "info", True), ("A informal note", False), ("a info", False),
        ("A metadata:", True), ("`A` info", False),
    ):  # fmt: skip
        text = f"{header}\n```json\n{{}}\n```\nw"
        assert (env.envelope_end(text, 0, env.Fences(text)) is not None) is found, header
    # the block must begin the very next line
    text = "A info\n\n```json\n{}\n```\nw"
    assert env.envelope_end(text, 0, env.Fences(text)) is None
    # any case when asked (the leading envelope)
    text = "conversation INFO\n```json\n{}\n```\nw"
    assert env.envelope_end(text, 0, env.Fences(text)) is None
    assert env.envelope_end(text, 0, env.Fences(text), any_case=True) == len(text) - 1


def test_the_leading_stamp_and_envelope_are_stripped() -> None:
    assert env.strip_leading_envelope(WRAPPED) == "second message"
    assert env.strip_leading_envelope("[21:21] hello") == "hello"
    assert env.strip_leading_envelope("[no time] hello") == "[no time] hello"
    assert env.strip_leading_envelope("conversation info\n```json\n{}\n```\nhi") == "hi"
    assert env.strip_leading_envelope("plain words") == "plain words"


def test_stamped_envelopes_are_stripped_where_a_line_begins() -> None:
    queued = "first\n" + WRAPPED + "\nthird"
    assert env.strip_stamped_envelopes(queued) == "first\nsecond message\nthird"
    inline = "first " + WRAPPED
    assert env.strip_stamped_envelopes(inline) == inline  # not at a line start: words
    twice = WRAPPED + "\n" + WRAPPED
    assert env.strip_stamped_envelopes(twice) == "second message\nsecond message"
    # right after the whitespace an envelope took, a line begins
    back_to_back = WRAPPED.replace("second message", "") + WRAPPED
    assert env.strip_stamped_envelopes(back_to_back) == "second message"
    no_close = "x\n[1:23] A info\n```json\n{}"
    assert env.strip_stamped_envelopes(no_close) == no_close
    many = "\n".join([WRAPPED] * (env.ENVELOPES_STRIPPED + 2))
    left = env.strip_stamped_envelopes(many)
    assert left.count("Conversation info") == 2
    assert left.startswith("second message\n" * env.ENVELOPES_STRIPPED)


def test_the_runtime_line_is_stripped_when_it_is_the_last_with_words() -> None:
    assert env.strip_runtime_line("hi\n\nRuntime: agent=main | x  \n \n") == "hi\n"
    assert env.strip_runtime_line("Runtime: only") == ""
    assert env.strip_runtime_line("hi\nRuntime: a\nmore") == "hi\nRuntime: a\nmore"
    assert env.strip_runtime_line("hi Runtime: a") == "hi Runtime: a"
    assert env.strip_runtime_line("hi\nRuntime:a") == "hi\nRuntime:a"


def test_what_closes_a_text() -> None:
    text = "x CLOSE If a tool failed  \n  "
    at = text.index(" If")
    assert env.ends_text(text, at, " If a tool")
    assert not env.ends_text(text, at)
    assert env.ends_text("x   \n", 1)
    assert not env.ends_text("x If a tool\nmore", 1, " If a tool")
    assert not env.ends_text("x If not", 1, " If a tool")


def test_a_header_block_needs_the_header_as_a_word() -> None:
    assert env.header_block('Conversation info: x\n```json\n{"a":1}\n```', "Conversation info")
    assert env.header_block("Conversation info\n```json\n{}\n```", "Conversation info") == "{}"
    assert env.header_block("Conversation informal\n```json\n{}\n```", "Conversation info") is None
    assert env.header_block("Conversation info_x\n```json\n{}\n```", "Conversation info") is None
    assert env.header_block("Conversation info", "Conversation info") is None
    assert env.header_block("Other info\n```json\n{}\n```", "Conversation info") is None
    assert env.header_block("Conversation info\n{}\n```", "Conversation info") is None


def test_only_data_blocks_that_open_a_line_are_read_and_only_the_first_few() -> None:
    literal = '"Conversation info: x\\n```json\\n{}\\n```"'
    assert list(_data_blocks(INTERNAL_BEGIN + "\n" + literal)) == [
        "Conversation info: x\n```json\n{}\n```"
    ]
    assert list(_data_blocks(literal + "\n")) != []
    assert list(_data_blocks("said: " + literal)) == []  # inside a line: not OpenClaw's
    assert list(_data_blocks('\n"Conversation info \\"unclosed\n' + literal)) == [
        "Conversation info: x\n```json\n{}\n```"
    ]
    many = ("\n" + literal) * (DATA_BLOCKS_READ + 3)
    assert len(list(_data_blocks(many))) == DATA_BLOCKS_READ


def test_a_message_names_at_most_so_many_attachments() -> None:
    line = "[media attached: media://inbound/a{}.png (image/png)]\n"
    text = "".join(line.format(i) for i in range(ATTACHMENTS_MAX + 2)) + "caption"
    words, found = split_media(text)
    assert len(found) == ATTACHMENTS_MAX
    assert words.startswith(line.format(ATTACHMENTS_MAX).strip()) and words.endswith("caption")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (WRAPPED, "second message"),
        ("[1:23] A info\n```json\n{}\n```\nhi\n\nRuntime: x | channel=telegram", "hi"),
        ("hi\n[1:23] A info\n```json\n{}\n```\nthere", "hi\nthere"),
        ("hi\n[1:23] A info\n```json\n" + "\n" * 4060 + "x", "hi\n[1:23] A info\n```json\n"
         + "\n" * 4060 + "x"),
    ],
)  # fmt: skip
def test_clean_user_text_on_envelopes(text: str, words: str) -> None:
    assert clean_user_text(text) == words
