"""A small load generator for fault tests: N keep-alive connections sending unique prompts,
recording which requests were acknowledged (HTTP 200) and which were only sent."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field


@dataclass
class LoadRecord:
    sent: set[str] = field(default_factory=set)
    acked: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


async def _drive(
    port: int, total: int, connections: int, record: LoadRecord, stop: threading.Event,
    body_for: object, tag: str, reconnects: int,
) -> None:  # fmt: skip
    counter = iter(range(total))

    async def connection(worker: int) -> None:
        for _ in range(reconnects + 1):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            try:
                for n in counter:
                    if stop.is_set():
                        return
                    prompt = f"{tag} {worker}-{n}"
                    body = json.dumps(body_for(prompt)).encode()  # type: ignore[operator]
                    record.sent.add(prompt)
                    writer.write(
                        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n"
                        b"content-type: application/json\r\ncontent-length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body
                    )  # fmt: skip
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: *(\d+)", head)
                    await reader.readexactly(int(length.group(1)) if length else 0)
                    status = int(head.split(b" ", 2)[1])
                    record.statuses[status] = record.statuses.get(status, 0) + 1
                    if status == 200:
                        record.acked.append(prompt)
                return
            except (OSError, asyncio.IncompleteReadError):
                pass  # the server went away: this request was not acknowledged
            finally:
                writer.close()

    await asyncio.gather(*(connection(w) for w in range(connections)))


def plain_body(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}]}


def start_load(
    port: int, total: int, connections: int = 32, body_for: object = plain_body,
    tag: str = "load", reconnects: int = 0,
) -> tuple[LoadRecord, threading.Event, threading.Thread]:  # fmt: skip
    """Run the load in a background thread; returns (record, stop flag, thread).
    Prompts are `<tag> <connection>-<n>`, unique within one load. A connection the server
    drops is opened again up to `reconnects` times, as a client would."""
    record, stop = LoadRecord(), threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(
            _drive(port, total, connections, record, stop, body_for, tag, reconnects)
        ),
        daemon=True,
    )
    thread.start()
    return record, stop, thread
