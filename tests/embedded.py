"""The real server in a thread of the test process.

`EmbeddedServer` runs what `ai-agent-proxy serve` runs (the settings loaded the same way,
storage prepared, `create_app`, the guarded protocol, every listener, the inbox writer
process) on a free loopback port, through Sanic's low-level server API in a thread with
its own event loop. It starts in about 0.05 s where a new interpreter takes 0.4 s, and is
talked to over real HTTP like the process. Tests where the process itself is under test
(signals, kill -9, workers, memory, what reaches stderr) use conftest's `Server`, and say
so with `make_server(process=True)`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
from sanic import Sanic

from ai_agent_proxy.app import create_app
from ai_agent_proxy.config import Settings, load_settings
from ai_agent_proxy.connections import GuardedHttpProtocol
from ai_agent_proxy.errors import ConfigError
from ai_agent_proxy.logs import SafeLogFilter
from ai_agent_proxy.startup import announce, prepare_storage

from .conftest import Server, free_port

# Many apps of one name in one process, one after another (what sanic-testing sets too).
Sanic.test_mode = True
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def flags_of(args: list[str]) -> dict[str, Any]:
    """`--max-body 4096 --debug` as the flags `serve` would have been given."""
    flags: dict[str, Any] = {}
    i = 0
    while i < len(args):
        name = args[i].removeprefix("--").replace("-", "_")
        if name.startswith("no_") and name[3:] == "debug":
            flags["debug"], i = False, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[name], i = args[i + 1], i + 2
        else:
            flags[name], i = True, i + 1
    return flags


class EmbeddedServer(Server):
    thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _handler: logging.Handler | None = None
    _root_level: int = logging.WARNING
    _failed: BaseException | None = None

    def start(self, timeout: float = 20.0) -> Server:
        self.port = self.port or free_port()
        self.starts += 1
        # (as on the process's command line: the test's own flags come last and win)
        flags: dict[str, Any] = {"port": self.port, "inbox": self.inbox}
        if self.explicit_db:
            flags["db"] = self.db
        flags |= flags_of(self.args)
        try:
            settings = load_settings(None, flags, environ=self.settings_env)
        except ConfigError as exc:
            pytest.fail(f"server would not start: {exc}")
        self._capture_logs(settings)
        prepare_storage(settings)
        announce(settings)
        ready = threading.Event()
        self._failed = None
        self.thread = threading.Thread(
            target=self._run, args=(settings, ready), name=f"server-{self.port}", daemon=True
        )
        self.thread.start()
        if not ready.wait(timeout) or self._failed is not None:
            pytest.fail(f"server did not start in {timeout}s ({self._failed!r}):\n{self.log()}")
        return self

    def _capture_logs(self, settings: Settings) -> None:
        """The server's log lines, as its process would print them, into server-N.log."""
        log_path = self.workdir / f"server-{self.starts}.log"
        self.logs.append(log_path)
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(SafeLogFilter(settings.redact))
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.DEBUG if settings.debug else logging.INFO)
        root.addHandler(handler)
        self._handler = handler

    def _release_logs(self) -> None:
        if self._handler is not None:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            root.setLevel(self._root_level)
            self._handler.close()
            self._handler = None

    def _run(self, settings: Settings, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop, self._stop = loop, asyncio.Event()
        try:
            loop.run_until_complete(self._serve(settings, ready))
        except BaseException as exc:  # said by start() or stop()
            self._failed = exc
            ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, settings: Settings, ready: threading.Event) -> None:
        app = create_app(settings)
        server = await app.create_server(
            host=settings.host, port=settings.port, protocol=GuardedHttpProtocol,
            access_log=settings.debug,
        )  # fmt: skip
        assert server is not None
        await server.startup()
        await server.before_start()
        await server.after_start()
        ready.set()
        assert self._stop is not None
        await self._stop.wait()
        # Sanic's own shutdown, as in sanic.server.runners: stop listeners, close the port,
        # give open connections the grace period, then the after-stop listeners.
        await server.before_stop()
        server.close()
        await server.wait_closed()
        for conn in list(server.connections):
            conn.close_if_idle()
        deadline = time.monotonic() + app.config.GRACEFUL_SHUTDOWN_TIMEOUT
        while server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(server.connections):
            conn.abort()
        await server.after_stop()

    def stop(self) -> None:
        """The graceful stop a signal makes, asked of the server's own loop."""
        thread, loop, stop = self.thread, self._loop, self._stop
        if thread is None or not thread.is_alive() or loop is None or stop is None:
            self._release_logs()
            return
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        self._release_logs()
        if thread.is_alive():
            pytest.fail(f"the embedded server did not stop within 15 s:\n{self.log()[-2000:]}")
        if self._failed is not None:
            raise self._failed

    def kill(self) -> None:
        raise AssertionError("an embedded server cannot be killed: use make_server(process=True)")

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
