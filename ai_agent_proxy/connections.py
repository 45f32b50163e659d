"""Connections: no client can hold the server hostage, and a stop drains cleanly.

Sanic's own timeouts count from the last byte received, so a client that trickles its
request headers a byte at a time is never timed out, and enough of them use up every file
descriptor (with a common `ulimit -n 1024`, a thousand do). `GuardedHttpProtocol` adds:

- a header deadline: a request's headers must be complete within HEADER_TIMEOUT seconds
  of its first byte, however they trickle;
- a body deadline: its body must be complete BODY_TIMEOUT seconds after that first byte,
  or keep arriving at BODY_MIN_RATE bytes per second on average from then on;
- a bound on open connections per process, under the open-files limit; at the bound, a
  new connection takes the place of the connection that has waited longest without a
  whole request (idle, or its headers or body still coming), so normal clients are served
  even during a flood; when every connection is busy in a handler, the new one is closed.
  Each of these says so in one log line, at most once per LOG_EVERY_S;
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


class Limits:
    """The state shared by the connections of one server (app.ctx.limits)."""

    def __init__(self) -> None:
        self.bound = 1000
        self.header_timeout = 10.0  # HEADER_TIMEOUT
        self.body_timeout = 60.0  # BODY_TIMEOUT
        self.body_min_rate = 4096  # BODY_MIN_RATE
        self.stopping = False
        self.connections: set[Any] = set()  # Sanic's set of this server's connections
        self.refused = 0
        self.timed_out = 0
        self.body_timed_out = 0
        self.evicted = 0
        self._last_said: dict[str, float] = {}

    def say(self, message: str, *args: Any) -> None:
        """Log `message` unless the same event (its first word) was said in the last
        LOG_EVERY_S: a flood makes one line of each kind, not one per connection."""
        event, now = message.split(":", 1)[0].split(" ", 1)[0], time.monotonic()
        if now - self._last_said.get(event, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_said[event] = now
            log.warning(message, *args)


class GuardedHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with header and body deadlines and a connection bound."""

    __slots__ = ("_deadline", "_limits", "_request_began", "_request_bytes")

    def connection_made(self, transport: Any) -> None:
        self._limits: Limits = self.app.ctx.limits
        self._deadline: asyncio.TimerHandle | None = None
        self._request_began = 0.0  # monotonic time of the current request's first byte
        self._request_bytes = 0  # bytes of it received so far
        super().connection_made(transport)
        limits = self._limits
        limits.connections = self.connections
        if limits.stopping:
            self.close()
        elif len(self.connections) > limits.bound:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        http = self.http
        if self._deadline is None or (http is not None and http.stage is Stage.IDLE):
            # The first bytes of a request: its deadlines count from now. (Sanic's own
            # timeouts restart with every byte, and are checked every 30 s.)
            self._request_began, self._request_bytes = time.monotonic(), 0
            self._check_in(min(self._limits.header_timeout, self._limits.body_timeout))
        self._request_bytes += len(data)
        super().data_received(data)

    def _check_in(self, delay: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(delay, self._deadlines)

    def _deadlines(self) -> None:
        """Cut a request whose headers are late, or whose body is late and slow; otherwise
        look again when the next deadline is due."""
        http = self.http
        if self.transport is None or http is None:
            return
        took, limits = time.monotonic() - self._request_began, self._limits
        if http.stage in (Stage.IDLE, Stage.REQUEST) and b"\r\n\r\n" not in self.recv_buffer:
            if took < limits.header_timeout:
                self._check_in(limits.header_timeout - took)
                return
            limits.timed_out += 1
            limits.say(
                "header_timeout: closed a connection whose request headers took over %g s"
                " (%d so far)", limits.header_timeout, limits.timed_out,
            )  # fmt: skip
            self.abort()
        elif self._receiving_body():
            if took < limits.body_timeout:
                self._check_in(limits.body_timeout - took)
            elif self._request_bytes >= limits.body_min_rate * took:
                self._check_in(1.0)  # late but keeping the pace: looked at each second
            else:
                limits.body_timed_out += 1
                limits.say(
                    "body_timeout: closed a connection whose request body took over %g s"
                    " at %.0f bytes/s (%d so far)",
                    limits.body_timeout, self._request_bytes / took, limits.body_timed_out,
                )  # fmt: skip
                self.abort()

    def _receiving_body(self) -> bool:
        http = self.http
        return http is not None and http.stage is Stage.HANDLER and bool(http.request_body)

    def _waiting_since(self) -> float | None:
        """When this connection began waiting for a whole request (idle, or headers or body
        still coming); None while a handler works on one."""
        http = self.http
        if http is None:
            return None
        if http.stage is Stage.IDLE:
            return float(self._time)  # Sanic's last activity (monotonic)
        if http.stage is Stage.REQUEST or self._receiving_body():
            return self._request_began
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _make_room(self) -> None:
        """At the bound: close the connection that has waited longest without a whole
        request (idle keep-alive, or headers or body still coming), or this new one."""
        limits = self._limits
        waiting = [
            (since, c)
            for c in self.connections
            if c is not self and (since := c._waiting_since()) is not None
        ]
        if waiting:  # a slow or idle one makes room for the new one
            closed = min(waiting, key=lambda pair: pair[0])[1]
            why = "closing the longest idle or slowest"
            limits.evicted += 1
        else:  # every connection is inside a request: the new one waits its turn elsewhere
            closed, why = self, "every connection is busy: closing the new one"
            limits.refused += 1
        limits.say(
            "connection_limit_reached open=%d limit=%d evicted=%d refused=%d: %s",
            len(self.connections), limits.bound, limits.evicted, limits.refused, why,
        )  # fmt: skip
        closed.abort()


def drain(limits: Limits) -> None:
    """Shutdown: no new request on any connection; each answers the one it is in with
    `Connection: close` and closes; idle ones close now. (A request whose headers are
    read later is told the same by `closing_response`.)"""
    limits.stopping = True
    for conn in list(limits.connections):
        http = getattr(conn, "http", None)
        if http is None:
            continue
        http.keep_alive = False
        if http.stage is Stage.IDLE:
            conn.close()


def closing_response(request: Any) -> None:
    """While stopping, the response ends its connection."""
    if request.app.ctx.limits.stopping and request.stream is not None:
        request.stream.keep_alive = False
