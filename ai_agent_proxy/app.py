"""The Sanic app: routes, auth, error shapes, and the start/stop of outbox, flusher, relay.

Hot path of a chat request: parse -> extract context (pure) -> group commit -> answer.
Everything slower (payload building, file writes) happens later in the flusher.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from functools import partial
from typing import Any

import orjson
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, raw

from . import wire
from .admission import LARGE_BODY, RETRY_AFTER_S, BodyBudget, NoRoom
from .bodies import BodyParser, ParsedBody, TooDeep
from .chat import Answer, json_response, relay_chat
from .config import Settings
from .connections import Limits, closing_response, connection_bound, drain
from .context import MediaStore, RequestContext, extract_context
from .errors import OutboxError, RowRejected
from .flusher import Flusher
from .ids import new_request_id
from .logs import safe_logs, setup_logging
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .outbox.store import Outbox
from .process import notify, return_large_allocations
from .relay import Relay
from .retention import Pruner
from .rows import NewRequest, State

log = logging.getLogger("ai_agent_proxy")

PUBLIC_PATHS = frozenset({"/healthz"})

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    408: "timeout_error",
    413: "request_too_large",
    503: "service_unavailable",
}


class ApiError(SanicException):
    """An error the client sees as the OpenAI-style error object."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, status_code=status, quiet=True, headers=headers)


def error_response(status: int, message: str, headers: Any = None) -> HTTPResponse:
    type_ = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    response = json_response(wire.error_body(status, message, type_), status)
    if headers:
        response.headers.update(headers)
    return response


class ProxyErrorHandler(ErrorHandler):
    """Every error, Sanic's own included (404, 405, 413), in the OpenAI error shape.
    An unauthenticated caller learns nothing but 401, whatever went wrong."""

    def __init__(self, key: str | None) -> None:
        super().__init__()
        self.key = key

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        if request is not None and not is_authorized(request, self.key):
            end_without_body(request)
            return error_response(401, "missing or invalid API key")
        status = getattr(exception, "status_code", 500)
        if status >= 500 and not isinstance(exception, ApiError):
            self.log(request, exception)
            return error_response(status, "internal error; the request was not accepted")
        message = str(exception) or "error"
        if isinstance(exception, ApiError):
            return error_response(status, message, exception.headers)
        if status == 404:
            message = f"not found: {request.path}" if request is not None else "not found"
        elif status == 405 and request is not None:
            message = f"method {request.method} not allowed on {request.path}"
        elif status == 413:
            message = "request body too large"
        return error_response(status, message)


def end_without_body(request: Request) -> None:
    """This answer ends the connection, and the body not read yet is not waited for (Sanic
    would read it to the end first, however slowly it came)."""
    stream = request.stream
    if stream is not None:
        stream.keep_alive = False
        stream.request_body = None


def is_authorized(request: Request, key: str | None) -> bool:
    if not key or request.path in PUBLIC_PATHS:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class AuthWarnings:
    """One warning per client address per minute for a missing or wrong key (OpenClaw only
    tells the person "Authentication failed"; the operator needs to hear it here). Never
    logs what was sent."""

    PERIOD_S = 60.0
    MAX_ADDRESSES = 10_000

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def note(self, address: str, path: str) -> None:
        now = time.monotonic()
        if now - self._last.get(address, -self.PERIOD_S) < self.PERIOD_S:
            return
        if len(self._last) >= self.MAX_ADDRESSES:
            self._last.clear()
        self._last[address] = now
        log.warning(
            "auth_failed remote=%s path=%s: missing or wrong key (check the client's apiKey "
            "against KEY; said once a minute per address)",
            address,
            path,
        )


class Refused(Exception):
    """A body the proxy cannot accept: the client's message, and why (for the log)."""

    def __init__(self, message: str, why: object) -> None:
        super().__init__(message)
        self.why = why


def read_body(
    raw: bytes, parser: BodyParser, media: MediaStore
) -> tuple[ParsedBody, RequestContext]:
    """The body parsed and cut for storage, and what it says (context.py); Refused for one
    the proxy cannot accept (not JSON, not an object, nested too deep: see bodies.loads and
    check_depth). No I/O: a large body is read in a thread (LARGE_BODY)."""
    try:
        parsed = parser.read(raw)
    except TooDeep as exc:
        raise Refused(f"request body is not accepted: {exc}", exc) from None
    except (ValueError, RecursionError) as exc:
        raise Refused(f"request body is not valid JSON: {exc}", exc) from None
    if not isinstance(parsed.value, dict):
        raise Refused("request body must be a JSON object", "not an object")
    return parsed, extract_context(parsed.value, media)


def refuse(request: Request, why: object) -> None:
    """The log line of a body refused (the client's address looked up only then)."""
    log.warning(
        "invalid_json remote=%s bytes=%d error=%s", request.client_ip, len(request.body), why
    )


class Phase(Enum):
    """Where a server is in its life; set in one place each (create_app, the last start-up
    listener, the first stop listener)."""

    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


RESTOP_S = 0.2


class ProxyApp(Sanic):
    """Sanic with a stop that is never lost, whenever SIGTERM or SIGINT comes.

    Sanic stops by stopping the event loop. A stop made while its start-up listeners run
    (the port answers already: a service manager stopping a server that has just answered
    its first request) is consumed when that start-up step returns, and the server then
    runs on. So a stop is only made once serving has begun, and is made again every
    RESTOP_S until the stop listeners have begun. Never more than one per RESTOP_S: uvloop
    keeps a second stop made in the same moment for its next run, which then broke off the
    stop listeners. Signals are heard from the first start-up listener on (Sanic's own
    handlers, installed later, call this same method)."""

    def stop(self, terminate: bool = True, unregister: bool = False) -> None:
        ctx = self.ctx
        if ctx.phase is Phase.STOPPING:
            return
        loop = asyncio.get_event_loop()
        if ctx.phase is Phase.SERVING and loop.time() - ctx.stopped_at >= RESTOP_S:
            ctx.stopped_at = loop.time()
            super().stop(terminate=terminate, unregister=unregister)
        if not ctx.restop_due:  # one timer looks again, however many signals came
            ctx.restop_due = True
            loop.call_later(RESTOP_S, self._stop_again, terminate, unregister)

    def _stop_again(self, terminate: bool, unregister: bool) -> None:
        self.ctx.restop_due = False
        self.stop(terminate, unregister)


FIRST = 1_000_000  # listener priority: before every other listener of its step


async def hear_stop_signals(app: Sanic) -> None:
    """SIGTERM and SIGINT stop the server from the first start-up listener on, before the
    port answers, and whether the event loop runs or not.

    Between its start-up steps Sanic leaves the loop paused (and sends READY=1 just before
    such a pause, so a service manager's SIGTERM comes then). uvloop only records a signal
    that comes while it is paused, and acts on it when another signal comes: the stop was
    lost. So besides the loop's handler (it wakes a running loop), our own Python handler,
    run whatever the loop does, queues the stop for when the loop runs. Run again after
    Sanic installs its handlers, which replace both."""
    if threading.current_thread() is not threading.main_thread():
        return  # run in another program's thread (the tests): signals are that program's
    loop = asyncio.get_running_loop()
    stop = partial(app.stop, terminate=False)

    def on_signal(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
        signal.signal(signum, on_signal)


def create_app(settings: Settings) -> Sanic:
    """The app: its settings, then what it runs (listeners, the auth check, routes)."""
    setup_logging(settings.debug)
    safe_logs(settings.redact)
    app = ProxyApp("ai_agent_proxy", configure_logging=False)
    app.config.update(REQUEST_MAX_SIZE=settings.max_body, ACCESS_LOG=settings.debug,
                      MOTD=False, GRACEFUL_SHUTDOWN_TIMEOUT=5.0)  # fmt: skip
    app.error_handler = ProxyErrorHandler(settings.key)
    app.ctx.settings, app.ctx.metrics, app.ctx.phase = settings, Metrics(), Phase.STARTING
    app.ctx.stopped_at, app.ctx.restop_due = -RESTOP_S, False  # (ProxyApp.stop)
    app.ctx.auth_warnings, app.ctx.limits = AuthWarnings(), Limits()
    # Symlinks followed: a media line's path counts only if the file it names is inside.
    # (A few lstat calls, for the rare message that has such a line.)
    app.ctx.media = MediaStore(str(settings.media_dir), os.path.realpath)
    for event, listener, priority in LISTENERS:
        app.listener(listener, event, priority=priority)
    if settings.key:  # (a signal Sanic dispatches on every request: ~10 µs each)
        app.add_signal(authenticate, "http.routing.after")
    app.register_middleware(count, "response")
    for uri, handler, methods, streamed in ROUTES:  # (streamed: the handler reads its body)
        app.add_route(handler, uri, methods=methods, stream=streamed)
    return app


# -- listeners ---------------------------------------------------------------------------


async def open_outbox(app: Sanic) -> None:
    """The outbox, its flusher (and writer process), the relay and the pruner of this
    worker process."""
    settings: Settings = app.ctx.settings
    return_large_allocations()  # in each worker process
    app.ctx.parser = BodyParser()  # learns the pieces this process's bodies repeat
    # Large bodies: read in one thread, one at a time, with a parser of their own (a
    # BodyParser is not shared between threads), within the bytes of BODY_MEMORY.
    app.ctx.large_parser = BodyParser()
    app.ctx.large_bodies = ThreadPoolExecutor(1, thread_name_prefix="aiap-large-body")
    app.ctx.body_budget = BodyBudget(settings.body_memory)
    outbox = Outbox(settings.db_path, settings.dedup_window)
    await outbox.open()
    flusher = Flusher(outbox, settings, on_written=app.ctx.metrics.flush_latency.observe)
    outbox.listen(flusher.hand, flusher.wake)
    flusher.start()
    app.ctx.outbox, app.ctx.flusher = outbox, flusher
    app.ctx.relay = Relay(settings) if settings.url else None
    app.ctx.pruner = Pruner(outbox, settings.retention_days) if settings.retention_days else None
    if app.ctx.pruner:
        app.ctx.pruner.start()
    # Everything alive now (modules, app, settings) lives as long as the process. Frozen,
    # the GC stops walking it on every full collection, which otherwise made most of the
    # tail latency at saturation (README, Performance).
    gc.collect()
    gc.freeze()


async def announce_listening(app: Sanic) -> None:
    """Connection limits in force, one `listening` line, READY=1 for a service manager."""
    settings: Settings = app.ctx.settings
    limits: Limits = app.ctx.limits
    limits.bound = connection_bound(settings.max_connections)
    limits.header_timeout = settings.header_timeout
    limits.body_timeout, limits.body_min_rate = settings.body_timeout, settings.body_min_rate
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info(
        "listening url=http://%s:%d/v1 inbox=%s max_connections=%d",
        host, settings.port, settings.inbox, limits.bound,
    )  # fmt: skip
    # The DB is open and the port answers: a service manager may start what needs us.
    notify(f"READY=1\nSTATUS=listening on {host}:{settings.port}")
    app.ctx.phase = Phase.SERVING


async def stop_taking_requests(app: Sanic) -> None:
    app.ctx.phase = Phase.STOPPING
    notify("STOPPING=1")
    drain(app.ctx.limits)


async def close_outbox(app: Sanic) -> None:
    if app.ctx.pruner is not None:
        await app.ctx.pruner.stop()
    if app.ctx.relay is not None:
        await app.ctx.relay.close()
    await app.ctx.flusher.stop()
    await app.ctx.outbox.close()
    app.ctx.large_bodies.shutdown(wait=False)


LISTENERS = (
    ("before_server_start", hear_stop_signals, FIRST),
    ("before_server_start", open_outbox, 0),
    ("after_server_start", hear_stop_signals, FIRST),  # (Sanic's handlers replaced ours)
    ("after_server_start", announce_listening, 0),
    ("before_server_stop", stop_taking_requests, 0),
    ("after_server_stop", close_outbox, 0),
)


# -- every request ------------------------------------------------------------------------


async def authenticate(request: Request, **_: Any) -> None:
    """On Sanic's http.routing.after: routed, and the body not read yet, so a client
    without the key gets 401 at once."""
    if not is_authorized(request, request.app.ctx.settings.key):
        request.app.ctx.auth_warnings.note(request.client_ip, request.path)
        raise ApiError(401, "missing or invalid API key")


async def count(request: Request, response: HTTPResponse) -> None:
    closing_response(request)
    route = request.route.path if request.route else "unmatched"
    request.app.ctx.metrics.answered(route, response.status)


# -- routes -------------------------------------------------------------------------------


async def chat_completions(request: Request) -> HTTPResponse | None:
    """Admit, read, parse, extract (pure), commit, answer: the local answer, or the relayed
    one. A streaming route: the body is read here, once it has room (admission.py)."""
    ctx = request.app.ctx
    stream = request.stream
    assert stream is not None
    stream.request_max_size = ctx.settings.max_body  # (Sanic lifts it for streaming routes)
    if stream.request_bytes > ctx.settings.max_body:
        end_without_body(request)
        raise ApiError(413, "request body too large")
    expected = stream.request_bytes if stream.request_body is True else ctx.settings.max_body
    try:
        reserved = await ctx.body_budget.reserve(expected if stream.request_body else 0)
    except NoRoom as exc:
        end_without_body(request)
        raise ApiError(503, str(exc), {"retry-after": str(RETRY_AFTER_S)}) from None
    try:
        await request.receive_body()
        raw_body = request.body
        try:
            if len(raw_body) >= LARGE_BODY:  # (off the event loop, one at a time)
                loop = asyncio.get_running_loop()
                work = partial(read_body, raw_body, ctx.large_parser, ctx.media)
                parsed, context = await loop.run_in_executor(ctx.large_bodies, work)
            else:
                parsed, context = read_body(raw_body, ctx.parser, ctx.media)
        except Refused as exc:
            refuse(request, exc.why)
            raise ApiError(400, str(exc)) from None
        body = parsed.value
        request_id, received_ms = new_request_id()
        relay: Relay | None = ctx.relay
        row = new_request(request_id, received_ms, parsed, raw_body, context, relay)
        try:
            await ctx.outbox.record(row)
        except RowRejected as exc:  # permanent: telling the client to retry would not help
            raise ApiError(400, f"the request cannot be stored: {exc}") from None
        except OutboxError as exc:
            raise ApiError(
                503, f"the request could not be recorded, please retry ({exc})"
            ) from None
    finally:
        ctx.body_budget.release(reserved)
    answer = Answer.for_body(body, ctx.settings)
    if relay is None:
        return answer.fallback()
    return await relay_chat(request, relay, body, context.context_id, request_id, answer)


async def list_models(request: Request) -> HTTPResponse:
    return json_response(orjson.dumps({"object": "list", "data": await models(request.app)}))


async def get_model(request: Request, model_id: str) -> HTTPResponse:
    for model in await models(request.app):
        if model.get("id") == model_id:
            return json_response(orjson.dumps(model))
    raise ApiError(404, f"model {model_id!r} not found")


async def healthz(request: Request) -> HTTPResponse:
    return json_response(b'{"status":"ok"}')


async def readyz(request: Request) -> HTTPResponse:
    report, ready = await readiness(request.app)
    return json_response(orjson.dumps(report), 200 if ready else 503)


async def metrics(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    text = await ctx.metrics.scrape(ctx.outbox, ctx.flusher.status)
    return raw(text, content_type=CONTENT_TYPE_LATEST)


ROUTES = (
    ("/v1/chat/completions", chat_completions, ["POST"], True),
    ("/v1/models", list_models, ["GET"], False),
    ("/v1/models/<model_id:path>", get_model, ["GET"], False),
    ("/healthz", healthz, ["GET", "HEAD"], False),
    ("/readyz", readyz, ["GET"], False),
    ("/metrics", metrics, ["GET"], False),
)


def new_request(
    request_id: str,
    received_ms: int,
    parsed: ParsedBody,
    raw_body: bytes,
    context: RequestContext,
    relay: Relay | None,
) -> NewRequest:
    """The row for a request."""
    return NewRequest(
        id=request_id,
        received_ms=received_ms,
        body=raw_body,
        segments=parsed.segments,
        retry=context.retry,
        awaiting_backend=relay is not None,
        **context.stored(),
    )


async def models(app: Sanic) -> list[dict[str, Any]]:
    """The backend's model list when there is a backend and it answers, else ours."""
    if app.ctx.relay is not None:
        found = await app.ctx.relay.models()
        if found is not None:
            return found
    return [wire.Model(id=app.ctx.settings.model_id).model_dump()]


async def readiness(app: Sanic) -> tuple[dict[str, Any], bool]:
    """Ready when the DB answers and takes commits, and inbox files can be written."""
    outbox: Outbox = app.ctx.outbox
    report: dict[str, Any] = {"status": "ready", "db": "ok", "inbox": "ok"}
    try:
        backlog, oldest = await outbox.backlog()
        report["backlog"] = backlog
        # Rows given up on: not a readiness failure (the rest flows), but worth a look.
        report["undeliverable"] = await outbox.count_in_state(State.UNDELIVERABLE)
        report["oldest_unwritten_age_s"] = (
            None if oldest is None else round(max(0.0, time.time() - oldest / 1000), 3)
        )
    except OutboxError as exc:
        report["db"] = f"error: {exc}"
    if outbox.last_commit_error:
        report["db"] = f"error: {outbox.last_commit_error}"
    if problem := outbox.file_problem():
        report["db"] = f"error: {problem}"
    inbox = app.ctx.settings.inbox
    status = app.ctx.flusher.status
    if (held := status.stalled_s(time.monotonic())) is not None:
        report["inbox"] = (
            f"error: the inbox writer process has held a batch of {status.batch_rows} rows for"
            f" {held:.0f} s without answering (stopped, or its disk hangs)"
        )
    elif status.consecutive_failures:
        report["inbox"] = f"error: {status.last_error}"
        report["retry_in_s"] = status.retry_in_s
        report["consecutive_failures"] = status.consecutive_failures
    elif inbox.exists() and not inbox.is_dir():  # found before the next write fails
        report["inbox"] = f"error: {inbox} is not a directory"
    ready = report["db"] == "ok" and report["inbox"] == "ok"
    if not ready:
        report["status"] = "not_ready"
    return report, ready
