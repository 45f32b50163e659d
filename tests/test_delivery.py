"""Replies through OpenClaw's gateway (agent/delivery.py): `send` over its WebSocket with the
reply's id as the idempotency key, against a stand-in gateway speaking the real one's
frames (tests/gateway.py); the `openclaw` CLI (a stand-in on PATH that logs its calls) only
when the gateway could not be reached before anything was sent."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ai_agent_proxy.agent.delivery import find_gateway
from ai_agent_proxy.config import load_settings
from ai_agent_proxy.errors import ConfigError

from .conftest import Server
from .gateway import TOKEN, StandInGateway
from .test_replies import calls, ids, reply_process, run
from .test_replies import loop as loop  # the fixture


@pytest.fixture
def gateway() -> Any:
    stand_in = StandInGateway()
    yield stand_in
    stand_in.stop()


def via(env: dict[str, str], gateway: StandInGateway, token: str = TOKEN) -> dict[str, str]:
    return {**env, "AI_AGENT_PROXY_OPENCLAW_GATEWAY_URL": gateway.url,
            "AI_AGENT_PROXY_OPENCLAW_GATEWAY_TOKEN": token}  # fmt: skip


def replies(server: Server) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: dict(r) for r in server.rows("SELECT * FROM replies")}


def everything_said(server: Server, *texts: str) -> str:
    """All a person or program could read afterwards: outputs, the DB, the logs."""
    rows = json.dumps([dict(r) for r in server.rows("SELECT * FROM replies")])
    return "\n".join([*texts, rows, server.log()])


def test_a_reply_goes_through_the_gateway_once_keyed_by_its_id(loop, gateway) -> None:
    server, log, env = loop
    first, second, _ = ids(server)
    r = run(server, via(env, gateway), "reply", second, "--message", "Done: 4711.", "--reply-to")
    assert r.returncode == 0, r.stderr
    assert "through the gateway" in r.stderr and f"replied to {second} and 1 earlier" in r.stderr
    (sent,) = gateway.sends()
    assert sent == {"to": "123456789", "channel": "telegram", "message": "Done: 4711.",
                    "idempotencyKey": second, "replyToId": "12"}  # fmt: skip
    connect = next(f for f in gateway.frames if f["method"] == "connect")["params"]
    assert connect["client"] == {**connect["client"], "id": "cli", "mode": "cli"}
    assert (connect["role"], connect["scopes"], connect["minProtocol"]) == (
        "operator", ["operator.write"], 4,
    )  # fmt: skip
    rows = replies(server)
    assert (rows[second]["state"], rows[second]["transport"], rows[second]["delivered_id"]) == (
        "sent", "gateway", "601",
    )  # fmt: skip
    assert rows[first]["covered_by"] == second and rows[first]["state"] == "sent"
    assert calls(log) == []  # the CLI was not used
    again = run(server, via(env, gateway), "reply", second, "--message", "twice?")
    assert again.returncode == 1 and "answered already" in again.stderr
    assert len(gateway.sends()) == 1
    shown = json.loads(run(server, env, "history", "show", second, "--format", "json").stdout)
    assert shown["reply"]["transport"] == "gateway" and shown["reply"]["delivered_id"] == "601"
    stats = json.loads(run(server, env, "history", "stats", "--format", "json").stdout)
    assert stats["reply_delivery_ms"]["gateway"]["count"] == 1
    assert TOKEN not in everything_said(server, r.stdout, r.stderr, json.dumps(shown))
    metrics = server.get("/metrics").text
    assert 'aiap_reply_delivery_seconds{quantile="0.5",transport="gateway"}' in metrics


@pytest.mark.parametrize("mode", ["drop-after", "drop-before"])
def test_a_connection_lost_mid_send_sends_the_same_key_again_and_delivers_once(
    loop, gateway, mode: str
) -> None:
    server, log, env = loop
    target = ids(server)[2]
    gateway.mode = mode
    r = run(server, via(env, gateway), "reply", target, "--message", "hi")
    assert r.returncode == 0, r.stderr
    keys = [s["idempotencyKey"] for s in gateway.sends()]
    assert keys == [target, target] and gateway.connections == 2  # again, on a new connection
    assert len(gateway.delivered) == 1 and calls(log) == []
    assert replies(server)[target]["state"] == "sent"


def test_a_send_the_gateway_never_answers_may_have_been_sent_so_only_the_gateway_retries(
    loop, gateway, monkeypatch
) -> None:
    from ai_agent_proxy.agent import delivery

    server, log, env = loop
    target = ids(server)[2]
    monkeypatch.setattr(delivery, "SEND_TIMEOUT_S", 0.3)
    gateway.mode = "silent"
    r = run(server, via(env, gateway), "reply", target, "--message", "hi")
    assert r.returncode == 1 and "it may have delivered it" in r.stderr
    row = replies(server)[target]
    assert (row["state"], row["maybe_sent"], row["transport"]) == ("failed", 1, "gateway")
    # the gateway is gone now: the CLI must not send what the gateway may have sent
    gateway.stop()
    r = run(server, via(env, gateway), "reply", target, "--message", "hi")
    assert r.returncode == 1 and "only the gateway may send it" in r.stderr
    assert calls(log) == []


def test_queued_by_the_gateway_is_answered_and_never_sent_again(loop, gateway) -> None:
    server, log, env = loop
    target = ids(server)[2]
    gateway.mode = "queued"
    r = run(server, via(env, gateway), "reply", target, "--message", "hi")
    assert r.returncode == 0, r.stderr
    assert "queued by the gateway" in r.stderr
    row = replies(server)[target]
    assert row["state"] == "queued" and "OUTBOUND_DELIVERY_QUEUED" in row["output"]
    assert "Telegram recipient must be a numeric chat ID" in row["output"]
    again = run(server, via(env, gateway), "reply", target, "--message", "hi")
    assert again.returncode == 1 and "answered already (queued)" in again.stderr
    unanswered = run(server, env, "history", "--unanswered", "--format", "json").stdout
    assert target not in unanswered and calls(log) == []


@pytest.mark.parametrize(
    ("mode", "says"),
    [("unsupported-channel", "INVALID_REQUEST: unsupported channel"),
     ("missing-scope", "FORBIDDEN MISSING_SCOPE missing scope operator.write")],
)  # fmt: skip
def test_a_send_the_gateway_refuses_is_one_line_and_not_sent_by_the_cli(
    loop, gateway, mode: str, says: str
) -> None:
    server, log, env = loop
    target = ids(server)[2]
    gateway.mode = mode
    r = run(server, via(env, gateway), "reply", target, "--message", "hi")
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "{" not in r.stderr  # no raw frame
    assert replies(server)[target]["state"] == "failed" and calls(log) == []
    gateway.mode = "ok"  # a later reply tries again
    assert run(server, via(env, gateway), "reply", target, "--message", "hi").returncode == 0
    assert len(gateway.delivered) == 1


def test_the_cli_is_used_when_the_gateway_cannot_be_reached_and_says_why(loop, gateway) -> None:
    server, log, env = loop
    first, second, third = ids(server)
    # a wrong token: the gateway lets nobody in, nothing was sent: the CLI, saying so
    r = run(server, via(env, gateway, "not-the-token"), "reply", third, "--message", "a")
    assert r.returncode == 0, r.stderr
    assert "with the openclaw CLI" in r.stderr and "AUTH_TOKEN_MISMATCH" in r.stderr
    assert "not-the-token" not in everything_said(server, r.stdout, r.stderr)
    assert len(calls(log)) == 1 and gateway.sends() == []
    # the gateway stopped: refused connection, the CLI
    gateway.stop()
    r = run(server, via(env, gateway), "reply", first, "--message", "b", "--anyway")
    assert r.returncode == 0 and "cannot reach the gateway" in r.stderr, r.stderr
    row = replies(server)[first]
    assert row["transport"] == "cli" and "through the openclaw CLI; the gateway" in row["output"]
    # no gateway anywhere (no settings, no OpenClaw config): the CLI, as before
    r = run(server, env, "reply", second, "--message", "c")
    assert r.returncode == 0 and "with the openclaw CLI" in r.stderr
    assert len(calls(log)) == 3


def test_five_replies_at_once_to_one_request_send_once(loop, gateway) -> None:
    server, log, env = loop
    target = ids(server)[2]
    procs = [reply_process(server, via(env, gateway), target, f"m{i}") for i in range(5)]
    codes = sorted(p.wait(60) for p in procs)
    assert codes == [0, 1, 1, 1, 1]
    assert len(gateway.sends()) == 1 and len(gateway.delivered) == 1 and calls(log) == []


def test_the_gateway_is_found_in_openclaws_own_config(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "openclaw.json"
    config.write_text(
        "{\n  // JSON5, as OpenClaw writes it\n  gateway: { mode: 'local', bind: 'loopback',"
        " port: 18999, auth: { mode: 'token', token: '${GW_TOKEN}' } },\n}\n"
    )
    monkeypatch.setenv("GW_TOKEN", "from-the-environment")
    settings = load_settings(None, {})
    monkeypatch.setenv("OPENCLAW_CONFIG_PATH", str(config))
    found = find_gateway(settings)
    assert found is not None and (found.url, found.token) == (
        "ws://127.0.0.1:18999", "from-the-environment",
    )  # fmt: skip
    monkeypatch.delenv("OPENCLAW_CONFIG_PATH")
    monkeypatch.setenv("OPENCLAW_STATE_DIR", str(tmp_path))  # the same file, found there
    assert find_gateway(settings) == found
    # our settings win; a remote gateway without TLS is refused, with TLS taken
    mine = load_settings(None, {"openclaw_gateway_url": "ws://localhost:1234",
                                "openclaw_gateway_token": "mine"})  # fmt: skip
    assert (find_gateway(mine).url, find_gateway(mine).token) == ("ws://localhost:1234", "mine")
    with pytest.raises(ConfigError, match="must be wss:// for a gateway that is not on this"):
        load_settings(None, {"openclaw_gateway_url": "ws://10.0.0.5:18789"})
    assert load_settings(None, {"openclaw_gateway_url": "https://gw.example:443"}) is not None
    monkeypatch.setenv("OPENCLAW_GATEWAY_URL", "ws://192.168.1.9:18789")
    with pytest.raises(ConfigError, match="OPENCLAW_GATEWAY_URL"):
        find_gateway(settings)
    monkeypatch.delenv("OPENCLAW_GATEWAY_URL")
    monkeypatch.setenv("OPENCLAW_STATE_DIR", str(tmp_path / "none"))
    assert find_gateway(settings) is None  # no config: the CLI
    summary = load_settings(None, {"openclaw_gateway_token": "mine-123"}).summary()
    assert summary["OPENCLAW_GATEWAY_TOKEN"] == "****"


def test_a_remote_gateway_and_odd_values_in_openclaws_config(tmp_path: Path, monkeypatch) -> None:
    """gateway.mode "remote" (OpenClaw's CLI talking to a gateway elsewhere): its
    remote.url and remote.token (or password), `${VAR}` read from the environment given;
    values that are not text, or blank, or a `${VAR}` not set, are as if absent."""
    config = tmp_path / "openclaw.json"
    settings = load_settings(None, {})

    def found(gateway: dict[str, Any], **env: str) -> tuple[str, str | None] | None:
        config.write_text(json.dumps({"gateway": gateway}))
        g = find_gateway(settings, {"OPENCLAW_CONFIG_PATH": str(config), **env})
        return None if g is None else (g.url, g.token)

    remote = {"url": "wss://gw.example:443", "token": "${GW}"}
    assert found({"mode": "remote", "remote": remote}, GW="t1") == ("wss://gw.example:443", "t1")
    assert found({"mode": "remote", "remote": remote}) == ("wss://gw.example:443", None)
    password = {"url": " wss://gw.example ", "password": "pw}"}  # ("pw}" is no ${VAR})
    assert found({"mode": "remote", "remote": password}) == ("wss://gw.example", "pw}")
    assert found({"mode": "remote", "remote": {"url": "${U}"}}, U="wss://u.example") == (
        "wss://u.example", None,
    )  # fmt: skip
    assert found({"mode": "remote", "remote": {"url": "${U}"}}) is None  # not set: no URL
    # a local gateway beside a remote section: its own port and auth
    local = {"mode": "local", "port": 18790, "auth": {"token": "own"}, "remote": remote}
    assert found(local, GW="t1") == ("ws://127.0.0.1:18790", "own")
    for odd in (123, "   ", "", None, ["t"]):
        assert found({"auth": {"token": odd}}) == ("ws://127.0.0.1:18789", None), odd
    assert found({"auth": {"token": "${GW"}}) == ("ws://127.0.0.1:18789", "${GW")
    assert found({"port": "18790"}) is None  # a port that is not a number: no gateway
    # the environment given is the one read (not this process's)
    monkeypatch.setenv("OPENCLAW_GATEWAY_URL", "ws://127.0.0.1:1")
    assert find_gateway(settings, {"OPENCLAW_STATE_DIR": str(tmp_path / "none")}) is None
    assert find_gateway(settings).url == "ws://127.0.0.1:1"  # (none given: this process's)


def test_a_proxy_in_the_environment_is_not_used_for_a_local_gateway(loop, gateway) -> None:
    server, log, env = loop
    *_, newest = ids(server)
    dead = "http://127.0.0.1:9"  # a proxy nobody answers on
    proxied = {**via(env, gateway), **{k: dead for k in ("HTTP_PROXY", "HTTPS_PROXY",
                                                         "ALL_PROXY", "https_proxy")}}  # fmt: skip
    r = run(server, proxied, "reply", newest, "--message", "direct")
    assert r.returncode == 0 and "through the gateway" in r.stderr, r.stderr
    assert [s["message"] for s in gateway.sends()] == ["direct"] and calls(log) == []


def test_the_mcp_server_and_the_runner_keep_one_connection(loop, gateway) -> None:
    from ai_agent_proxy.agent import replies as agent_replies
    from ai_agent_proxy.agent.delivery import Deliverer

    server, log, _ = loop
    first, second, third = ids(server)
    settings = load_settings(None, {"db": str(server.db), "inbox": str(server.inbox),
                                    "openclaw_gateway_url": gateway.url,
                                    "openclaw_gateway_token": TOKEN})  # fmt: skip
    errors: list[BaseException] = []

    def answer(rid: str, deliverer: Deliverer) -> None:
        try:
            with agent_replies.session(server.db) as (_, conn):
                agent_replies.reply(conn, settings, rid, f"to {rid}", anyway=True,
                                    deliverer=deliverer)  # fmt: skip
        except BaseException as exc:  # said below
            errors.append(exc)

    with Deliverer(settings) as kept:
        threads = [threading.Thread(target=answer, args=(rid, kept)) for rid in (first, third)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        answer(second, kept)
    assert errors == [] and gateway.connections == 1 and len(gateway.delivered) == 3
    assert calls(log) == []
