"""The baseline for tools/bench.py: a bare Sanic handler that parses the JSON body and
answers a fixed chat.completion. No storage, no inbox. `bare_sanic.py PORT [WORKERS]`."""

from __future__ import annotations

import sys

from sanic import Request, Sanic
from sanic.response import HTTPResponse, raw

ANSWER = (
    b'{"id":"chatcmpl-bare","object":"chat.completion","created":0,"model":"bare",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":0,"completion_tokens":0,'
    b'"total_tokens":0}}'
)

app = Sanic("bare_sanic")
app.config.REQUEST_MAX_SIZE = 64 * 1024 * 1024


@app.post("/v1/chat/completions")
async def chat(request: Request) -> HTTPResponse:
    if not isinstance(request.json, dict):
        return raw(b'{"error":"not an object"}', status=400, content_type="application/json")
    return raw(ANSWER, content_type="application/json")


@app.get("/healthz")
async def healthz(request: Request) -> HTTPResponse:
    return raw(b'{"status":"ok"}', content_type="application/json")


if __name__ == "__main__":  # bare_sanic.py PORT [WORKERS]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    app.run(host="127.0.0.1", port=int(sys.argv[1]), access_log=False, motd=False,
            **({"single_process": True} if workers == 1 else {"workers": workers}))  # fmt: skip
