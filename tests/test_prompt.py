"""The runner's prompt (agent/runner/prompt.py), a pure function of a conversation's view:
rendered here on views of the shape `next --json` gives; the runner's tests show it reaching
a real run."""

from __future__ import annotations

import re
from typing import Any

from ai_agent_proxy.agent.runner.prompt import NO_REPLY, render


def message(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": f"r{n}", "received_at": f"2026-12-06T10:0{n}:00Z", "inbox_file": f"f{n}.json",
        "sender": None, "attachments": [], "words": f"words {n}", "words_left_out": 0, **fields,
    }  # fmt: skip


def view(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"context_id": "telegram:42", "messages": list(messages), "answered_before": 0,
            "left_out": 0, **fields}  # fmt: skip


def test_each_run_draws_its_own_tag_for_the_word_markers() -> None:
    first, second = (render(view(message(1)), send_output=True, session="s") for _ in range(2))
    tags = [re.findall(r"<<<WORDS ([0-9a-f]{8})>>>", p) for p in (first, second)]
    assert len(tags[0]) == len(tags[1]) == 1 and tags[0] != tags[1]
    assert f"<<<END WORDS {tags[0][0]}>>>" in first
    given = render(view(message(1)), send_output=True, session="s", tag="cafe0001")
    assert "<<<WORDS cafe0001>>>" in given


def test_what_is_said_of_earlier_answers() -> None:
    def said(**fields: Any) -> str:
        return render(view(message(1), **fields), send_output=True, session="s")

    assert "no earlier message of it was answered" in said()
    two = said(answered_before=2)
    assert "2 earlier message(s) of it were answered" in two
    assert "history --context-id telegram:42" in two
    local = said(context_id=None, answered_before=0)
    assert (
        "no earlier message of it was answered" in local and "(no chat: a local request)" in local
    )
    assert "3 older waiting messages are not shown" in said(left_out=3)


def test_sender_attachments_and_cut_words_are_named() -> None:
    alice = message(1, sender={"name": "Alice", "username": "al\x1bice", "id": "7"},
                    attachments=[{"path": "/m/a.jpg", "mime": "image/jpeg"}, {"path": "/m/b"}],
                    words="", words_left_out=0)  # fmt: skip
    plain = message(2, words="cut here", words_left_out=12345)
    prompt = render(view(alice, plain), send_output=False, session="s")
    first, second = prompt.split("[2/2]")
    assert "from Alice (@al\\x1bice, id 7)" in first  # a control character shown, not sent
    assert "from" not in second.split("\n")[0]  # no sender: nothing said of one
    assert "attachment: /m/a.jpg (image/jpeg)" in first and "attachment: /m/b\n" in first
    assert "(no words: see the attachments)" in first
    assert "cut here\n[... 12,345 more characters in the inbox file]" in second
    assert "reply r2 --message-file -" in prompt  # the newest is the one to answer
    assert NO_REPLY not in prompt  # (only where the runner sends the output)
