"""A small real OpenAI-style backend LLM for relay tests (HTTP/1.1 in a thread).

`mode` picks the behaviour: ok, status500, raw500 (`echo_text` as a 500's body), garbage,
hang, cut, slow, json-for-stream, echo
(a successful answer that repeats `echo_text`, e.g. secrets a careless backend echoes; a
stream sends each event in two chunks cut in its middle). `requests` records each request's
path (query included), headers and body.
With `gate` cleared, a stream pauses after its first content chunk until the test sets it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY_PARTS = ["backend ", "says ", "hi"]
SECRET_ECHO = "echo:"


class FakeBackend:
    def __init__(self, api_key: str = "") -> None:
        self.mode = "ok"
        self.api_key = api_key
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[dict[str, Any]] = []
        self.finished = threading.Event()  # set when a stream was sent to the end
        self.aborted = threading.Event()  # set when the proxy hung up on us
        self.delay = 0.0
        self.echo_text = ""
        self.linger = 0.0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                backend.requests.append({"path": self.path, "body": None, "headers": {}})
                if self.path.split("?")[0].endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": "backend-a", "object": "model", "owned_by": "fake"},
                        {"id": "backend-b", "object": "model", "owned_by": "fake"},
                    ] + ([{"id": f"echo {backend.echo_text}", "object": "model"}]
                         if backend.mode == "echo" else [])})  # fmt: skip
                else:
                    self._json(404, {"error": {"message": "no"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                backend.requests.append(
                    {"path": self.path, "body": body,
                     "headers": {k.lower(): v for k, v in self.headers.items()}}
                )  # fmt: skip
                backend.handle(self, body)

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default of 5 drops bursts of connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    # -- behaviours -----------------------------------------------------------------------

    def handle(self, h: Any, body: dict[str, Any]) -> None:
        mode = self.mode
        if mode == "hang":
            time.sleep(5)
            return
        if mode == "status500":
            h._json(500, {"error": {"message": f"internal trouble {SECRET_ECHO}{self.api_key}"}})
            return
        if mode == "raw500":  # `echo_text` as the error body, byte for byte
            data = self.echo_text.encode()
            h.send_response(500)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if mode == "garbage":
            data = b"<html>definitely not json</html>"
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if mode == "echo" and not body.get("stream"):
            h._json(200, completion(body.get("model", "?"), f"you said {self.echo_text}"))
            return
        if body.get("stream") and mode != "json-for-stream":
            self.stream(h, body, cut=mode == "cut")
            return
        h._json(200, completion(body.get("model", "?"), "".join(REPLY_PARTS)))

    def stream(self, h: Any, body: dict[str, Any], cut: bool) -> None:
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        model = body.get("model", "?")

        def send(data: bytes) -> None:
            # echo: each event in two chunks, cut in its middle (a key may straddle them)
            for piece in (data[: len(data) // 2], data[len(data) // 2 :]) if echo else (data,):
                h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                h.wfile.flush()

        echo = self.mode == "echo"
        parts = [f"you said {self.echo_text}"] if echo else REPLY_PARTS
        try:
            send(event(chunk(model, {"role": "assistant", "content": ""})))
            for i, part in enumerate(parts):
                send(event(chunk(model, {"content": part})))
                if self.delay:
                    time.sleep(self.delay)
                if i == 0:
                    if cut:
                        h.connection.shutdown(socket.SHUT_RDWR)  # broken off mid-stream
                        return
                    while not self.gate.wait(0.05):
                        pass
            send(event(chunk(model, {}, "stop")))
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            send(event({**chunk(model, {}), "choices": [], "usage": usage}))
            send(b"data: [DONE]\n\n")
            time.sleep(self.linger)  # some backends end the stream a little later
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
            self.finished.set()
        except (BrokenPipeError, ConnectionResetError):
            self.aborted.set()


def chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
