"""Bad input: the documented status and error object, nothing recorded, server still up."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from .conftest import HTTP, Server, wait_until
from .embedded import EmbeddedServer

KEY = "test-key-0123456789"
GOOD = {"messages": [{"role": "user", "content": "still serving?"}]}


def assert_error(r: httpx.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "error"
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["type"] == type_ and body["error"]["code"] == status
    assert body["error"]["message"]
    return body


def assert_nothing_recorded_and_still_serving(server: Server, before: int = 0) -> None:
    assert len(server.rows()) == before
    assert server.post_chat(GOOD).status_code == 200
    assert len(server.rows()) == before + 1
    server.wait_files(before + 1)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the many bad bodies (each test counts rows from where it starts)."""
    import os

    workdir = tmp_path_factory.mktemp("errors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    server = EmbeddedServer(workdir, workdir / "inbox", workdir / "outbox.db", [], env).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'"a string"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 5000 + b"]" * 5000, ""),
    ],
    ids=["broken", "empty", "binary", "array", "string", "null", "deep-nesting"],
)
def test_bad_json_is_400(shared_server: Server, body: bytes, needle: str) -> None:
    server = shared_server
    before, logged = len(server.rows()), server.log().count("invalid_json ")
    r = server.post_chat(body, headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_request_error")
    assert needle in err["error"]["message"]
    wait_until(lambda: server.log().count("invalid_json ") > logged, message=server.log)
    assert_nothing_recorded_and_still_serving(server, before)


def test_body_over_max_body_is_413(make_server) -> None:
    server = make_server("--max-body", "4096")
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(server.post_chat(big), 413, "request_too_large")
    assert_nothing_recorded_and_still_serving(server)


def test_wrong_key_is_401(make_server) -> None:
    server = make_server(key=KEY)
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": KEY},
                    {"authorization": "Basic " + KEY}):  # fmt: skip
        r = server.post_chat(GOOD, headers=headers)
        err = assert_error(r, 401, "authentication_error")
        assert KEY not in r.text and KEY not in str(err)
    for path in ("/v1/models", "/v1/models/local-agent", "/readyz", "/metrics", "/nope"):
        assert_error(HTTP.get(server.base_url + path), 401, "authentication_error")
    assert KEY not in server.log() and "nope" not in server.log().replace("/nope", "")
    # the operator hears of it once per address and minute, not once per request
    assert server.log().count("auth_failed remote=127.0.0.1 path=/v1/chat/completions") == 1
    assert server.log().count("auth_failed") == 1
    # the openai SDK sees an AuthenticationError
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="m", messages=GOOD["messages"])
    assert_nothing_recorded_and_still_serving(server)


def test_unknown_path_and_wrong_method(make_server) -> None:
    server = make_server(key=KEY)
    assert httpx.head(server.base_url + "/healthz").status_code == 200  # probes use HEAD
    assert "listening url=http://127.0.0.1:" in server.log()
    assert_error(server.get("/v2/everything"), 404, "not_found_error")
    r = HTTP.get(server.base_url + "/v1/chat/completions", headers=server.headers())
    assert_error(r, 405, "method_not_allowed")
    r = httpx.put(server.base_url + "/v1/models", headers=server.headers())
    assert_error(r, 405, "method_not_allowed")
    assert_nothing_recorded_and_still_serving(server)
