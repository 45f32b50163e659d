"""Connections: no client can hold the server hostage, and a stop drains cleanly.

Sanic's own timeouts count from the last byte received, so a client that trickles its
request headers a byte at a time is never timed out, and enough of them use up every file
descriptor (with a common `ulimit -n 1024`, a thousand do). `GuardedHttpProtocol` adds:

- a header deadline: a request's headers must be complete within HEADER_TIMEOUT seconds
  of its first byte, however they trickle;
- a bound on open connections per process, under the open-files limit; at the bound, a
  new connection takes the place of the connection that has sent nothing useful for the
  longest (idle, or still sending headers), so normal clients are served even during a
  flood; when every connection is busy in a request, the new one is closed. Either way a
  log line says so, at most once per LOG_EVERY_S;
- on shutdown (`drain`), every connection answers the request it is in with
  `Connection: close` and closes, instead of serving keep-alive clients until the grace
  period runs out and then dropping requests already committed.

"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from sanic.http.constants import Stage
from sanic.server.protocols.http_protocol import HttpProtocol

log = logging.getLogger("ai_agent_proxy.connections")

LOG_EVERY_S = 10.0
FD_RESERVE = 128  # descriptors kept for the DB, the writer's pipes, logs, the backend


def connection_bound(max_connections: int) -> int:
    """The bound in force: the configured one, below the open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(max_connections, soft - FD_RESERVE))


class _Limits:
    """Per-process state shared by the connections of one server."""

    def __init__(self) -> None:
        self.bound = 1000
        self.header_timeout = 10.0  # HEADER_TIMEOUT
        self.stopping = False
        self.connections: set[Any] = set()  # Sanic's set of this server's connections
        self.refused = 0
        self.timed_out = 0
        self.evicted = 0
        self._last_log = 0.0

    def say(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning(message, *args)


LIMITS = _Limits()


class GuardedHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with a header deadline and a connection bound."""

    __slots__ = ("_header_deadline",)

    def connection_made(self, transport: Any) -> None:
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        LIMITS.connections = self.connections
        if LIMITS.stopping:
            self.close()
        elif len(self.connections) > LIMITS.bound:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        http = self.http
        if self._header_deadline is None or (http is not None and http.stage is Stage.IDLE):
            # The first bytes of a request: its headers have HEADER_TIMEOUT from now.
            # (Sanic's own timeouts restart with every byte, and are checked every 30 s.)
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(LIMITS.header_timeout, self._headers_due)
        super().data_received(data)

    def _headers_due(self) -> None:
        http = self.http
        if self.transport is None or http is None:
            return
        if http.stage in (Stage.IDLE, Stage.REQUEST) and b"\r\n\r\n" not in self.recv_buffer:
            LIMITS.timed_out += 1
            LIMITS.say(
                "header_timeout: closed a connection whose request headers took over %.0f s"
                " (%d so far)", LIMITS.header_timeout, LIMITS.timed_out,
            )  # fmt: skip
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _make_room(self) -> None:
        """At the bound: close the connection that has waited longest without a request in
        progress (idle keep-alive, or headers still coming), or this new one."""
        victims = [
            c
            for c in self.connections
            if c is not self and c.http is not None and c.http.stage in (Stage.IDLE, Stage.REQUEST)
        ]
        if victims:  # a slow or idle one makes room for the new one
            closed, why = min(victims, key=lambda c: c._time), "closing the longest idle or slowest"
            LIMITS.evicted += 1
        else:  # every connection is inside a request: the new one waits its turn elsewhere
            closed, why = self, "every connection is busy: closing the new one"
            LIMITS.refused += 1
        LIMITS.say(
            "connection_limit_reached open=%d limit=%d evicted=%d refused=%d: %s",
            len(self.connections), LIMITS.bound, LIMITS.evicted, LIMITS.refused, why,
        )  # fmt: skip
        closed.abort()


def drain() -> None:
    """Shutdown: no new request on any connection; each answers the one it is in with
    `Connection: close` and closes; idle ones close now. (A request whose headers are
    read later is told the same by `closing_response`.)"""
    LIMITS.stopping = True
    for conn in list(LIMITS.connections):
        http = getattr(conn, "http", None)
        if http is None:
            continue
        http.keep_alive = False
        if http.stage is Stage.IDLE:
            conn.close()


def closing_response(request: Any) -> None:
    """While stopping, the response ends its connection."""
    if LIMITS.stopping and request.stream is not None:
        request.stream.keep_alive = False
