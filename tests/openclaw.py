"""OpenClaw bodies for tests: the captured ones (tests/fixtures, from the real 2026.9.6
gateway), and named changes of them. A new OpenClaw case starts from a captured body and
one of these helpers, never from a dict written from memory: each helper changes a body the
way the gateway itself does (see the pairs it was read from).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"

CLI_LOCAL = "openclaw-2026.9-cli-local.json"
TURN1 = "openclaw-2026.9-telegram-dm-turn1.json"
TURN2 = "openclaw-2026.9-telegram-dm-turn2.json"
GROUP = "openclaw-2026.9-telegram-group.json"
EMPTY_TURN = "openclaw-2026.9-telegram-empty-answer-turn.json"
EMPTY_RETRY = "openclaw-2026.9-telegram-empty-answer-retry.json"
STEER_FIRST = "openclaw-2026.9-telegram-steer-first.json"
STEER_SECOND = "openclaw-2026.9-telegram-steer-second.json"
PHOTO = "openclaw-2026.9-telegram-photo.json"
PHOTO_INPUT = "openclaw-2026.9-telegram-photo-image-input.json"
VOICE = "openclaw-2026.9-telegram-voice.json"
QUEUED = "openclaw-2026.9-telegram-queued-resend.json"
QUEUED_EMPTY = "openclaw-2026.9-telegram-queued-empty-turn.json"
QUEUED_RETRY = "openclaw-2026.9-telegram-queued-empty-retry.json"
# One person writes three times within two seconds (the gateway's own bursts, 2026-12-06):
# REPLY empty, each message its own turn and its retry; steered into a running turn under
# the first message's id; merged into one turn inside Telegram's 300 ms intake window.
BURST_EMPTY = [f"openclaw-2026.9-telegram-burst-empty-{i}.json" for i in range(1, 7)]
BURST_STEERED = [f"openclaw-2026.9-telegram-burst-steered-{i}.json" for i in range(1, 4)]
BURST_TIGHT = "openclaw-2026.9-telegram-burst-tight.json"
BURST_WORDS = ["hi, are you there", "one more thing: the invoice is wrong", "it is invoice 4711"]

INTERNAL_BEGIN = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"
_WRAPPER = re.compile(r"\A\[[^\]]*\] Conversation info: [^\n]*\n```json\n[^\n]*\n```\n\n")


# A stand-in for the `openclaw` CLI: logs its argv (as JSON lines) to $FAKE_OPENCLAW_LOG,
# fails while "$FAKE_OPENCLAW_LOG.fail" exists, sleeps $FAKE_OPENCLAW_SLEEP first.
FAKE_OPENCLAW = (
    f"#!{sys.executable}\n"
    + """import json, os, sys, time
time.sleep(float(os.environ.get("FAKE_OPENCLAW_SLEEP", "0")))
with open(os.environ["FAKE_OPENCLAW_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if os.path.exists(os.environ["FAKE_OPENCLAW_LOG"] + ".fail"):
    print("Error: Gateway not reachable (ws://127.0.0.1:18789)", file=sys.stderr)
    sys.exit(1)
print("Sent via Telegram. Message ID: 4242")
"""
)


def stand_in_openclaw(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """FAKE_OPENCLAW on PATH (in tmp_path/bin): (the log of its calls, the environment to
    run commands with: PATH, its log, no AI_AGENT_PROXY_* of the caller's)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "openclaw").write_text(FAKE_OPENCLAW)
    (bin_dir / "openclaw").chmod(0o755)
    log = tmp_path / "openclaw-calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_OPENCLAW_LOG=str(log))
    return log, env


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text("utf-8"))


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _internal_index(body: dict[str, Any]) -> int:
    """Index of OpenClaw's internal-context message (the newest)."""
    for i in range(len(body["messages"]) - 1, -1, -1):
        content = body["messages"][i]["content"]
        if isinstance(content, list) and content[0].get("text", "").startswith(INTERNAL_BEGIN):
            return i
    raise AssertionError("no internal-context message in this body")


def retry_notice() -> str:
    """The retry notice as the gateway sent it (empty-answer-retry, its own user message)."""
    retry, turn = load(EMPTY_RETRY)["messages"], load(EMPTY_TURN)["messages"]
    (extra,) = [m for m in retry if m not in turn]
    return str(extra["content"])


def retry_of(body: dict[str, Any]) -> dict[str, Any]:
    """OpenClaw's retry of a turn answered empty, as the gateway builds it (the DM pair):
    the notice as its own user message, before the internal-context message."""
    out = copy.deepcopy(body)
    out["messages"].insert(_internal_index(out), {"role": "user", "content": retry_notice()})
    return out


def retry_notice_after_internal(body: dict[str, Any]) -> dict[str, Any]:
    """A variant not seen from the gateway: the notice after the internal context."""
    out = copy.deepcopy(body)
    out["messages"].append({"role": "user", "content": retry_notice()})
    return out


def retry_notice_as_part(body: dict[str, Any]) -> dict[str, Any]:
    """A variant not seen from the gateway: the notice as a text part after the person's."""
    out = copy.deepcopy(body)
    i = _internal_index(out) - 1
    words = out["messages"][i]["content"]
    parts = words if isinstance(words, list) else [{"type": "text", "text": words}]
    out["messages"][i]["content"] = [*parts, {"type": "text", "text": retry_notice()}]
    return out


def person_index(body: dict[str, Any]) -> int:
    """The person's newest message: the one before the internal context, or after it when
    the person steered (steer-second)."""
    i = _internal_index(body)
    return i + 1 if i + 1 < len(body["messages"]) else i - 1


def _with_words(message: dict[str, Any], words: str) -> None:
    """Put `words` in a person's message, keeping OpenClaw's wrapper (the time stamp and
    `Conversation info` block before, a Runtime line after)."""
    content = message["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    wrapper = _WRAPPER.match(text)
    runtime = text.find("\n\nRuntime: ")
    new = (wrapper.group() if wrapper else "") + words + (text[runtime:] if runtime != -1 else "")
    if isinstance(content, str):
        message["content"] = new
    else:
        content[0]["text"] = new


def typed(body: dict[str, Any], words: str) -> dict[str, Any]:
    """The same turn with `words` as the person's text, wrapped as OpenClaw wraps it."""
    out = copy.deepcopy(body)
    _with_words(out["messages"][person_index(out)], words)
    return out


def steered(body: dict[str, Any], words: str) -> dict[str, Any]:
    """The person writes `words` while the turn's answer streams: OpenClaw steers them into
    the running turn as a wrapped user message after its internal context (steer pair)."""
    out = copy.deepcopy(body)
    message = copy.deepcopy(out["messages"][_internal_index(out) - 1])
    _with_words(message, words)
    out["messages"].append(message)
    return out


def with_info(body: dict[str, Any], **changes: str) -> dict[str, Any]:
    """The same turn with string fields of OpenClaw's `Conversation info` changed (chat_id,
    message_id, ...): a new message of the same chat, or another chat."""
    out = copy.deepcopy(body)
    part = out["messages"][_internal_index(out)]["content"][0]
    text = part["text"]
    for key, value in changes.items():
        assert isinstance(value, str), f"{key}: only string fields are changed"
        escaped = json.dumps(json.dumps(value))[1:-1]  # as it stands in the quoted block
        pattern = rf'(\\"{key}\\":)(\\"[^"\\]*\\"|[^,}}]+)'
        text, n = re.subn(pattern, lambda m, e=escaped: m.group(1) + e, text, count=1)
        assert n == 1, f"{key} not in the internal context"
    part["text"] = text
    return out


ALICE = {"id": "123456789", "name": "Alice Tester", "username": "alice_t"}
MEDIA = "/home/alice/.openclaw/workspace/media/inbound/"


def _alice(user_id: str) -> dict[str, str]:
    return {**ALICE, "id": user_id}


# What each captured body must give, from tests/fixtures/README.md: context_id,
# message_id, sender, latest-user-prompt, attachments (path, mime), modality.
EXPECTED: dict[str, dict[str, Any]] = {
    TURN1: dict(context_id="telegram:123456789", message_id="11", sender=ALICE,
                prompt="hello from telegram DM"),
    TURN2: dict(context_id="telegram:123456789", message_id="12", sender=ALICE,
                prompt="second message, normal mode"),
    GROUP: dict(context_id="telegram:-1001234567890", message_id="30",
                sender={"id": "987654321", "name": "Bob Groupie", "username": "bob_g"},
                prompt="@capture_test_bot hello from the group"),
    CLI_LOCAL: dict(context_id=None, message_id=None, sender=None, prompt="hello"),
    STEER_FIRST: dict(context_id="telegram:333456789", message_id="1301",
                      sender=_alice("333456789"), prompt="Steer test A: tell me a story"),
    STEER_SECOND: dict(context_id="telegram:333456789", message_id="1301",
                       sender=_alice("333456789"), prompt="Steer test B: make it about cats"),
    PHOTO: dict(context_id="telegram:5550001", message_id="11", sender=_alice("5550001"),
                prompt="What is in this picture? (photo caption)", modality="image",
                attachments=[{"path": MEDIA + "openclaw-staged-85c788cf-4934-409c-ab0a-"
                              "73665d6a02e4/input-1d1bb19f-f629-4b3e-adbf-85ab68d6c2e1.png",
                              "mime": "image/png"}]),
    PHOTO_INPUT: dict(context_id="telegram:5550101", message_id="11", sender=_alice("5550101"),
                      prompt="What is in this picture? (photo caption)", modality="image",
                      attachments=[{"path": MEDIA + "openclaw-staged-e954ea37-de57-47a5-8cc0-"
                                    "997d91bb42e2/input-35235160-1266-4650-839f-c5b0a7dc8c44.png",
                                    "mime": "image/png"}]),
    VOICE: dict(context_id="telegram:5550002", message_id="21", sender=_alice("5550002"),
                prompt="", modality="voice",
                attachments=[{"path": MEDIA + "openclaw-staged-a623c1b2-d4cc-4b03-a0eb-"
                              "2773dc210f43/input-02154e1c-8a24-4f95-8183-fb1a75f0a2ac.ogg",
                              "mime": "audio/ogg"}]),
    EMPTY_TURN: dict(context_id="telegram:123456789", message_id="20", sender=ALICE,
                     prompt="test empty reply"),
    EMPTY_RETRY: dict(context_id="telegram:123456789", message_id="20", sender=ALICE,
                      prompt="test empty reply"),
    QUEUED: dict(context_id="telegram:123456789", message_id="2003", sender=ALICE,
                 prompt="while you were down: book a table"),
    QUEUED_EMPTY: dict(context_id="telegram:123456789", message_id="862239", sender=ALICE,
                       prompt="while you were down: book a table"),
    # its retry: OpenClaw merged the turn's words into one message; no file of its own
    QUEUED_RETRY: dict(context_id="telegram:123456789", message_id="862239", sender=ALICE,
                       prompt="while you were down: book a table",
                       stored_prompt="hello from the real gateway, REPLY empty\n"
                                     "while you were down: book a table"),
}  # fmt: skip
for _i, _name in enumerate(BURST_EMPTY):  # turns 1, 3, 5; each retry re-assembles the words
    _turn = _i // 2
    EXPECTED[_name] = dict(context_id="telegram:511111111", message_id=f"510{_turn + 1}",
                           sender=_alice("511111111"), prompt=BURST_WORDS[_turn])  # fmt: skip
    if _i % 2:
        EXPECTED[_name]["stored_prompt"] = "\n".join(BURST_WORDS[: _turn + 1])
for _name, _words in zip(BURST_STEERED, BURST_WORDS, strict=True):  # all under the first id
    EXPECTED[_name] = dict(context_id="telegram:544444444", message_id="5401",
                           sender=_alice("544444444"), prompt=_words)  # fmt: skip
EXPECTED[BURST_TIGHT] = dict(context_id="telegram:555555555", message_id="5503",
                             sender=_alice("555555555"), prompt="\n".join(BURST_WORDS))  # fmt: skip
for _values in EXPECTED.values():
    _values.setdefault("attachments", None)
    _values.setdefault("modality", None)


# -- text a stranger writes to stall a reader ------------------------------------------------
# Chat text is written by strangers and Python's `re` has no time limit (one 4 KB message once
# held the event loop 20 s). Each shape is a run of something a reader of OpenClaw's wrapping
# looks for (ai_agent_proxy/envelope.py); tests/test_context.py times every reader on them,
# tools/bench.py reports the worst.
_CONTINUE = (
    "Continue the current task from the existing transcript, preserving completed work. If an "
    "action was interrupted, inspect its state before deciding whether to retry it. Do not "
    "restart the task or repeat completed actions."
)
_QUEUED = (
    "[Queued user message from a previous active turn; preserved as context only. Continue "
    "with the active prompt below.]"
)
_RETRY_NOTICE = "The previous attempt did not produce a user-visible answer"
# (what opens the shape, the unit repeated after it): a reader that backtracks or searches
# again from every position meets its worst case where something opens and never closes.
STAMPED = "hello\n[1:23] A info\n```json\n"
PATHOLOGICAL = {
    "newlines": ("", "\n"), "spaces": ("", " "), "newline-space": ("", "\n "),
    "backticks": ("", "`"), "fences": ("", "```"), "openings": ("", "```json\n"),
    "brackets": ("", "["), "closing-brackets": ("", "]"), "stamps": ("", "[1:23] "),
    "stamped-envelopes": ("", "[1:23] A info\n```json\n"),
    "stamped-then-newlines": (STAMPED, "\n"), "stamped-then-newline-space": (STAMPED, "\n "),
    "envelope-then-newlines": ("A info\n```json\n", "\n"),
    "opening-then-spaces": ("```json\n", " \n"),
    "escaped-quotes": ('"', '\\"'), "quotes": ("", '"'), "markers": ("", INTERNAL_BEGIN),
    "info-literals": ("", '\n"Conversation info\\n```json\\n'),
    "info-literal-then-newlines": ('"Conversation info\\n```json\\n', "\\n"),
    "runtime-lines": ("", "\nRuntime: "), "runtime-then-spaces": ("\nRuntime: ", " "),
    "continue": ("", "\n\n" + _CONTINUE + " If a tool "),
    "continue-then-spaces": ("\n\n" + _CONTINUE + " If a tool", " "),
    "media": ("", "[media attached: media://inbound/a.png (image/png)]\n"),
    "media-then-closing-brackets": ("[media attached: media://inbound/a", "] "),
    "media-unclosed": ("", "[media attached: /x (a/b"),
    "not-analyzed": ("", "[Image attachment not analyzed: ]] "),
    "pipes": ("", "| "), "channel-pipes": ("", "| channel"), "channel-then-spaces": ("|", " "),
    "retry": ("", _RETRY_NOTICE), "retry-spaces": ("", " "), "queued": ("", _QUEUED),
    "empty-blocks": ("", "```json\n{}\n```\n"),
}  # fmt: skip


def filled_with(shape: tuple[str, str], size: int) -> str:
    """`size` characters of the shape (its opening, then its unit repeated), then an `x`."""
    opening, unit = shape
    return opening + (unit * (size // len(unit) + 1))[: size - len(opening)] + "x"


def hostile_placements(text: str) -> dict[str, dict[str, Any]]:
    """`text` where a stranger (or a key holder) can put it in a captured turn: the
    person's message, OpenClaw's internal-context message, the system prompt."""
    internal = load(TURN2)
    internal["messages"][_internal_index(internal)]["content"][0]["text"] = (
        INTERNAL_BEGIN + "\n" + text
    )
    system = load(TURN2)
    system["messages"][0]["content"] = text
    return {"person": typed(load(TURN2), text), "internal": internal, "system": system}
