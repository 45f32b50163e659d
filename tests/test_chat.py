"""The enqueue path end to end: real server, official openai SDK, real inbox files."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from ai_agent_proxy.context import RETRY_NOTICE

from .conftest import FIXTURE_CONTEXTS, HTTP, Server, fixture_body

TURN1 = "openclaw-2026.9-telegram-dm-turn1.json"
TURN2 = "openclaw-2026.9-telegram-dm-turn2.json"
GROUP = "openclaw-2026.9-telegram-group.json"
CLI = "openclaw-2026.9-cli-local.json"
SKILL = (
    Path(__file__).parents[1] / "ai_agent_proxy" / "skills" / "openclaw-message-cli" / "SKILL.md"
)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.key or "unused")


def send_with_sdk(server: Server, name: str, stream: bool) -> str:
    """Send a fixture through the openai SDK; return the assistant text it got."""
    body = fixture_body(name)
    kwargs = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
    kwargs.pop("max_completion_tokens", None)
    c = client(server)
    if not stream:
        kwargs.pop("stream_options", None)
        answer = c.chat.completions.create(model=body["model"], messages=body["messages"], **kwargs)
        assert answer.object == "chat.completion"
        assert answer.choices[0].finish_reason == "stop"
        assert answer.id.startswith("chatcmpl-")
        return answer.choices[0].message.content or ""
    chunks = list(
        c.chat.completions.create(
            model=body["model"], messages=body["messages"], stream=True, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_each_fixture_through_the_sdk(make_server, stream: bool) -> None:
    server = make_server("--reply", "working on it")
    order = [TURN1, TURN2, GROUP, CLI]
    for name in order:
        assert send_with_sdk(server, name, stream) == "working on it"
    names = server.wait_files(len(order))
    payloads = server.inbox_payloads()
    for name, payload in zip(order, payloads, strict=True):
        context_id, prompt = FIXTURE_CONTEXTS[name]
        assert payload["context_id"] == context_id
        assert payload["latest-user-prompt"] == prompt
        assert payload["instruction"] == "use openclaw-message-cli-skill to reply"
        assert Path(payload["openclaw_message_cli_skill_path"]).name == "SKILL.md"
        assert Path(payload["openclaw_message_cli_skill_path"]).is_file()
    turn1, turn2, group, cli = payloads
    # First request of a context: the whole body plus enrichment.
    assert turn1["messages"] == fixture_body(TURN1)["messages"]
    assert (turn1["channel"], turn1["target"]) == ("telegram", "123456789")
    # Later request of the same context: compact.
    assert set(turn2) == {
        "context_id", "channel", "target", "latest-user-prompt", "request_id",
        "instruction", "openclaw_message_cli_skill_path", "message_id", "sender",
    }  # fmt: skip
    assert turn2["message_id"] == "12"
    assert turn2["sender"] == {"id": "123456789", "name": "Alice Tester", "username": "alice_t"}
    assert names[1].endswith(f"-{turn2['request_id']}.json")
    # A new context and no context at all: full.
    assert group["tools"] == fixture_body(GROUP)["tools"]
    assert "messages" in cli and "channel" not in cli


def test_an_agents_repeated_prompt_and_tools_come_out_exactly(server: Server) -> None:
    """The server and the writer parse a body that starts and ends like an earlier one
    (system prompt, tool list) reusing what they parsed from it: files and stored bodies
    must be the same as for a body parsed in full."""
    sent = []
    for n in range(4):
        body = fixture_body(CLI)
        body["messages"][-1]["content"] = f'turn {n}: ü \\ " {{}}'
        raw = json.dumps(body, ensure_ascii=False).encode()  # the fixture's own spacing
        assert server.post_chat(raw).status_code == 200
        sent.append((body, raw))
    server.wait_files(len(sent))
    rows = server.rows()
    for (body, raw), row, payload in zip(sent, rows, server.inbox_payloads(), strict=True):
        assert server.body(row["id"]) == raw
        assert {k: payload[k] for k in body} == body
    # the pieces were stored once: the system prompt and the tool list are one segment each
    shared = server.rows("SELECT count(*) AS n FROM segments WHERE length(data) > 4096")
    assert shared[0]["n"] == 2


@pytest.mark.process  # the writer process's own log line, on the server's stderr
def test_inbox_file_format(server: Server) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓ 你好"}], "z": 1, "a": 2}
    assert server.post_chat(body).status_code == 200
    (name,) = server.wait_files(1)
    stem, _, request_id = name.removesuffix(".json").partition("-")
    assert len(stem) == 14 and stem.isdigit()
    assert len(request_id) == 32 and int(request_id, 16)
    raw = (server.inbox / name).read_bytes()
    payload = json.loads(raw)
    expected = json.dumps(payload, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    assert raw.decode("utf-8") == expected
    assert "héllo ✓ 你好".encode() in raw
    assert (server.inbox / name).stat().st_mode & 0o777 == 0o600
    log = server.log()
    assert f"chat_completion request inbox file_size={len(raw)} inbox_path=" in log


def test_names_sort_by_arrival(server: Server) -> None:
    prompts = [f"message {i}" for i in range(30)]
    for p in prompts:
        assert server.post_chat({"messages": [{"role": "user", "content": p}]}).status_code == 200
    server.wait_files(30)
    assert [p["latest-user-prompt"] for p in server.inbox_payloads()] == prompts


def test_openclaw_retry_of_a_turn_makes_no_second_file(make_server) -> None:
    # Empty REPLY (the default): exactly the case where OpenClaw retries.
    server = make_server()
    turn = fixture_body(TURN2)
    retry = json.loads(json.dumps(turn))
    retry["messages"].append({"role": "user", "content": RETRY_NOTICE + ". Answer now."})
    assert server.post_chat(turn).status_code == 200
    assert server.post_chat(retry).status_code == 200
    assert server.post_chat(fixture_body(GROUP)).status_code == 200
    server.wait_files(2)
    rows = server.rows()
    assert [r["state"] for r in rows] == ["written", "duplicate", "written"]
    assert rows[1]["duplicate_of"] == rows[0]["id"]
    assert json.loads(server.body(rows[1]["id"])) == retry  # stored all the same


def test_identical_body_within_window_is_a_client_retry(make_server) -> None:
    server = make_server("--dedup-window", "60")
    body = {"channel": "api", "user_id": "u1", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        assert server.post_chat(body).status_code == 200
    other = {**body, "messages": [{"role": "user", "content": "hi again"}]}
    assert server.post_chat(other).status_code == 200
    server.wait_files(2)
    assert [r["state"] for r in server.rows()] == ["written", "duplicate", "duplicate", "written"]


def test_identical_body_after_window_is_new(make_server) -> None:
    server = make_server("--dedup-window", "0")
    body = {"channel": "api", "messages": [{"role": "user", "content": "again"}]}
    for _ in range(2):
        assert server.post_chat(body).status_code == 200
    server.wait_files(2)
    kinds = [(r["state"], r["payload_kind"]) for r in server.rows()]
    assert kinds == [("written", "full"), ("written", "compact")]


def test_stream_without_usage_option(server: Server) -> None:
    r = server.post_chat({"stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["choices"] for c in chunks)  # no usage chunk unless asked for
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_empty_reply_by_default(server: Server) -> None:
    r = server.post_chat({"messages": [{"role": "user", "content": "x"}]})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert r.json()["model"] == "local-agent"


def test_models(make_server) -> None:
    server = make_server("--model-id", "my-agent")
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["my-agent"]
    assert client(server).models.retrieve("my-agent").id == "my-agent"
    with pytest.raises(openai.NotFoundError) as err:
        client(server).models.retrieve("gpt-9")
    assert err.value.body["type"] == "not_found_error"
    assert server.get("/v1/models/gpt-9").json()["status"] == "error"


def test_healthz_reveals_nothing(make_server) -> None:
    server = make_server(key="s3cret-key-123456")
    r = HTTP.get(server.base_url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


STEER_FIRST = "openclaw-2026.9-telegram-steer-first.json"
STEER_SECOND = "openclaw-2026.9-telegram-steer-second.json"
PHOTO = "openclaw-2026.9-telegram-photo.json"
VOICE = "openclaw-2026.9-telegram-voice.json"


def with_person_text(body: dict, text: str) -> dict:
    """`body` with the text of its person's last message replaced (envelope kept)."""
    body = json.loads(json.dumps(body))
    for message in reversed(body["messages"]):
        content = message["content"]
        if message["role"] == "user" and isinstance(content, str):
            head, sep, _ = content.partition("```\n\n")
            message["content"] = head + sep + text
            return body
    raise AssertionError("no person's message")


def test_real_openclaw_traffic_steer_retry_queued_and_media(make_server) -> None:
    """One conversation as OpenClaw sends it: a steered follow-up is a new message with its
    own file; OpenClaw's empty-answer retry of it is not; a re-send in OpenClaw's queued
    wrapper gives the person's exact words; compact files carry the message keys."""
    server = make_server()
    first, second = fixture_body(STEER_FIRST), fixture_body(STEER_SECOND)
    retry = json.loads(json.dumps(second))
    retry["messages"].append({"role": "user", "content": RETRY_NOTICE + ". Answer now."})
    queued = with_person_text(
        first,
        "[Queued user message from a previous active turn; preserved as context only. "
        "Continue with the active prompt below.]\nare you there?\n\nContinue the current task "
        "from the existing transcript, preserving completed work. If an action was interrupted,"
        " inspect its state before deciding whether to retry it. Do not restart the task or "
        "repeat completed actions.",
    )
    document = with_person_text(
        fixture_body(PHOTO),
        "[media attached: /home/alice/.openclaw/media/inbound/q3.pdf (application/pdf)"
        ' "Q3 report.pdf"]\nsummarise please',
    )
    real_queued = fixture_body("openclaw-2026.9-telegram-queued-resend.json")
    for body in (first, second, retry, queued, fixture_body(PHOTO), fixture_body(VOICE),
                 document, real_queued):  # fmt: skip
        assert server.post_chat(body).status_code == 200
    server.wait_files(7)
    rows = server.rows()
    assert [r["state"] for r in rows] == ["written"] * 2 + ["duplicate"] + ["written"] * 5
    assert rows[2]["duplicate_of"] == rows[1]["id"]  # the retry of the steered message
    steer_a, steer_b, again, photo, voice, doc, resent = server.inbox_payloads()
    assert resent["latest-user-prompt"] == "while you were down: book a table"
    assert resent["message_id"] == "2003"
    assert steer_a["latest-user-prompt"] == "Steer test A: tell me a story"
    assert steer_b["latest-user-prompt"] == "Steer test B: make it about cats"
    assert "request_id" in steer_b and steer_b["message_id"] == "1301"  # compact
    assert steer_b["sender"] == {"id": "333456789", "name": "Alice Tester", "username": "alice_t"}
    assert again["latest-user-prompt"] == "are you there?"
    media = "/home/alice/.openclaw/workspace/media/inbound/"
    assert photo["modality"] == "image" and photo["message_id"] == "11"
    assert photo["latest-user-prompt"] == "What is in this picture? (photo caption)"
    assert photo["attachments"][0]["path"].startswith(media) and "messages" in photo  # full
    # the voice note: no words, one file, compact, same keys
    assert (voice["latest-user-prompt"], voice["modality"]) == ("", "voice")
    assert [a["mime"] for a in voice["attachments"]] == ["audio/ogg"]
    assert "messages" not in doc and doc["request_id"]
    assert doc["attachments"] == [
        {
            "path": "/home/alice/.openclaw/media/inbound/q3.pdf",
            "mime": "application/pdf",
            "name": "Q3 report.pdf",
        }
    ]
    assert doc["latest-user-prompt"] == "summarise please"
