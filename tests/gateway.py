"""A stand-in for OpenClaw's gateway, as far as delivering a reply goes: a real WebSocket
server on a free loopback port, in a thread of the test, answering with the frames the
real gateway 2026.9.6 sent (tests/fixtures/gateway/, captured with its own token, scopes,
channels and a Telegram chat): the `connect.challenge` event, `connect` (the token
checked: AUTH_TOKEN_MISMATCH otherwise), and `send`, delivered once per idempotencyKey (a
repeated key gets the first send's answer, as the real one does).

`mode` says what the next sends meet: "ok"; "queued" (the Telegram 400 the gateway
reports as OUTBOUND_DELIVERY_QUEUED); "unsupported-channel"; "missing-scope"; "drop-before"
(the connection closed when a send arrives, nothing delivered, once); "drop-after"
(delivered, then the connection closed before the answer, once); "silent" (no answer).
Every frame received is kept in `frames`, every delivery in `delivered`.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

from websockets.sync.server import ServerConnection, serve

FRAMES = Path(__file__).parent / "fixtures" / "gateway"
TOKEN = "stand-in-gateway-token-7f3a9c"


def captured(name: str) -> dict[str, Any]:
    return json.loads((FRAMES / f"{name}.json").read_text("utf-8"))


class StandInGateway:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.mode = "ok"
        self.frames: list[dict[str, Any]] = []
        self.delivered: list[dict[str, Any]] = []
        self.connections = 0
        self._answers: dict[str, dict[str, Any]] = {}  # idempotencyKey -> first answer
        self._lock = threading.Lock()
        self._server = serve(self._handle, "127.0.0.1", 0)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def sends(self) -> list[dict[str, Any]]:
        """The `send` requests received (params), in order."""
        return [f["params"] for f in self.frames if f.get("method") == "send"]

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)

    def _handle(self, ws: ServerConnection) -> None:
        with self._lock:
            self.connections += 1
        ws.send(json.dumps(captured("connect-challenge")))
        for raw in ws:
            frame = json.loads(raw)
            with self._lock:
                self.frames.append(frame)
            method, rid = frame.get("method"), frame.get("id")
            if method == "connect":
                token = (frame.get("params", {}).get("auth") or {}).get("token")
                if token != self.token:
                    ws.send(self._answer("connect-token-mismatch", rid))
                    return
                ws.send(self._answer("hello-ok", rid))
            elif method == "send":
                answer = self._send(frame["params"], rid)
                if answer is None:
                    ws.close()
                    return
                if answer:
                    ws.send(answer)

    def _send(self, params: dict[str, Any], rid: str) -> str | None:
        """The answer to a send ("" for none; None: close the connection)."""
        with self._lock:
            mode = self.mode
            if mode in ("drop-before", "drop-after"):
                self.mode = "ok"  # once
            key = params["idempotencyKey"]
            if key in self._answers:  # a repeated key: the first answer, nothing sent
                return json.dumps({**self._answers[key], "id": rid})
            if mode == "drop-before":
                return None
            if mode == "silent":
                return ""
            name = {"queued": "send-telegram-400-queued",
                    "unsupported-channel": "send-unsupported-channel",
                    "missing-scope": "send-missing-scope"}.get(mode, "send-ok")  # fmt: skip
            answer = captured(name)
            if name == "send-ok":
                self.delivered.append(params)
                answer = copy.deepcopy(answer)
                answer["payload"]["messageId"] = str(600 + len(self.delivered))
                answer["payload"]["channel"] = params.get("channel")
            if name in ("send-ok", "send-telegram-400-queued"):
                self._answers[key] = answer
            if mode == "drop-after":
                return None
            return json.dumps({**answer, "id": rid})

    def _answer(self, name: str, rid: str) -> str:
        return json.dumps({**captured(name), "id": rid})
