"""Real-server fixtures: each test starts the server on a free loopback port with its own
inbox and DB (in a thread of this process, or as `python -m ai_agent_proxy` where the
process is under test) and talks to it over HTTP."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from ai_agent_proxy.cli import cli as cli_app

from . import openclaw

# Real OpenClaw 2026.9 request bodies (copied from the project's shared fixtures):
# (context_id, latest-user-prompt) of each, from the one table in tests/openclaw.py.
FIXTURES = openclaw.FIXTURES
OPENCLAW_HOME = "/home/alice/.openclaw"
SKILL_PATH = Path(__file__).parents[1] / "ai_agent_proxy/skills/openclaw-message-cli/SKILL.md"
FIXTURE_CONTEXTS = {
    name: (values["context_id"], values.get("stored_prompt", values["prompt"]))
    for name, values in openclaw.EXPECTED.items()
}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What `-n auto` means here: five workers for two cores, at most eight. Most tests
    spend half their time waiting on a process they started (a server's start, a signal's
    grace, a lock's timeout), so a worker per core leaves the cores a third idle: 116 s on
    two cores with two workers, 81-92 s with five."""
    return min(8, max(2, (os.cpu_count() or 1) * 5 // 2))


@pytest.fixture(autouse=True, scope="session")
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test, and every process a test starts, gets a HOME and XDG dirs of its own:
    the suite never reads or writes the user's real ~/.local/state or ~/.config."""
    home = tmp_path_factory.mktemp("home")
    names = ("HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME")
    # nor the user's OpenClaw: its gateway is found from these (agent/delivery.py)
    openclaw = ("OPENCLAW_GATEWAY_URL", "OPENCLAW_GATEWAY_TOKEN", "OPENCLAW_CONFIG_PATH",
                "OPENCLAW_STATE_DIR")  # fmt: skip
    saved = {name: os.environ.get(name) for name in (*names, *openclaw)}
    for name in openclaw:
        os.environ.pop(name, None)
    real_state = Path(saved["XDG_STATE_HOME"] or Path.home() / ".local" / "state")
    before = _listing(real_state / "ai-agent-proxy")
    os.environ["HOME"] = str(home)
    for name, sub in zip(names[1:], (".local/state", ".config", ".local/share", ".cache"),
                         strict=True):  # fmt: skip
        os.environ[name] = str(home / sub)
    try:
        yield home
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    after = _listing(real_state / "ai-agent-proxy")
    assert after == before, f"the test suite wrote into the real {real_state}: {after - before}"


def _listing(folder: Path) -> set[tuple[str, int]]:
    """Every file below `folder` with its modification time (nothing if it is missing)."""
    if not folder.is_dir():
        return set()
    return {(str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# One client for the suite: making one costs ~20 ms of CPU (its TLS context), which per
# request was most of the suite's time. No keep-alive: each request its own connection,
# as a client made per request had.
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=5.0)


def fixture_body(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text("utf-8"))


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a port from that range (what
    binding port 0 gives) may be taken by some test's outgoing connection before the server
    binds it, and the suite opens thousands of them in parallel."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(10000, max(10001, low - 1))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    step: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; fail the test
    (saying `message`) if it has not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout}s: {detail}")
        time.sleep(step)


@dataclass
class Server:
    workdir: Path
    inbox: Path
    db: Path
    args: list[str]
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    key: str | None = None
    logs: list[Path] = field(default_factory=list)
    explicit_db: bool = True  # False: start without --db, on the inbox's default DB
    nofile: tuple[int, int] | None = None  # RLIMIT_NOFILE (soft, hard) for the server

    @property
    def settings_env(self) -> dict[str, str]:
        """The AI_AGENT_PROXY_ settings this server was given through its environment."""
        return {k: v for k, v in self.env.items() if k.startswith("AI_AGENT_PROXY_")}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Server:
        self.port = self.port or free_port()
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        self.logs.append(log_path)
        db = ["--db", str(self.db)] if self.explicit_db else []
        cmd = [
            sys.executable, "-m", "ai_agent_proxy", "--port", str(self.port),
            "--inbox", str(self.inbox), *db, *self.args,
        ]  # fmt: skip
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                preexec_fn=self._limits if self.nofile else None,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if HTTP.get(self.base_url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"server did not start in {timeout}s:\n{self.log()}")

    def _limits(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as a service manager would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(
                    f"the server did not stop within 15 s of SIGTERM:\n{self.log()[-2000:]}"
                )

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def log(self) -> str:
        return "".join(p.read_text("utf-8", "replace") for p in self.logs if p.exists())

    # -- HTTP -----------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"} if self.key else {}

    def post_chat(self, body: Any, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", self.headers())
        if isinstance(body, (bytes, str)):
            return HTTP.post(self.base_url + "/v1/chat/completions", content=body, **kw)
        return HTTP.post(self.base_url + "/v1/chat/completions", json=body, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", self.headers())
        return HTTP.get(self.base_url + path, **kw)

    # -- what landed on disk --------------------------------------------------------------

    def inbox_names(self) -> list[str]:
        if not self.inbox.is_dir():
            return []
        return sorted(n for n in os.listdir(self.inbox) if not n.startswith("."))

    def inbox_payloads(self) -> list[dict[str, Any]]:
        return [json.loads((self.inbox / n).read_text("utf-8")) for n in self.inbox_names()]

    def wait_files(self, count: int, timeout: float = 10.0) -> list[str]:
        """Wait for `count` inbox files and for their rows to be marked written (the flusher
        renames files first and marks rows in its next commit)."""

        def done() -> list[str] | None:
            names = self.inbox_names()
            if len(names) < count:
                return None
            marked = self.rows("SELECT count(*) AS n FROM requests WHERE state = 'written'")
            return names if marked[0]["n"] >= count else None

        names = wait_until(
            done,
            timeout,
            message=lambda: (
                f"expected {count} inbox files, have {len(self.inbox_names())}\n"
                + self.log()[-3000:]
            ),
        )
        assert len(names) == count, f"expected {count} inbox files, have {names}"
        return names

    def body(self, request_id: str) -> bytes:
        """A stored body, joined from its segments straight from the DB file."""
        (row,) = self.rows("SELECT body_segments FROM requests WHERE id = ?", request_id)
        ids = array("I")
        ids.frombytes(row["body_segments"])
        data = {r["id"]: r["data"] for r in self.rows("SELECT id, data FROM segments")}
        return b"".join(data[i] for i in ids)

    def rows(self, sql: str = "SELECT * FROM requests ORDER BY seq", *params: Any) -> list[Any]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()


def new_server(
    workdir: Path,
    *flags: str,
    key: str | None = None,
    env: dict[str, str] | None = None,
    kind: type[Server] = Server,
) -> Server:
    """A server (not started) with its own inbox and DB in `workdir`, and no
    AI_AGENT_PROXY_ settings from the environment of the suite."""
    workdir.mkdir()
    # The captured bodies name files under the OpenClaw home of the machine they came from.
    args = ["--media-dir", OPENCLAW_HOME, *flags]
    if key:
        args += ["--key", key]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AI_AGENT_PROXY_")}
    full_env.update(env or {})
    return kind(
        workdir=workdir,
        inbox=workdir / "inbox",
        db=workdir / "outbox.db",
        args=args,
        env=full_env,
        key=key,
    )


@pytest.fixture
def make_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    """Factory: make_server(*flags, key=None, start=True, env=None) -> a running server: in
    a thread of this process (tests/embedded.py), or, in a test marked
    `@pytest.mark.process` (signals, kill -9, workers, ...), a real
    `python -m ai_agent_proxy`."""
    from .embedded import EmbeddedServer

    kind = Server if request.node.get_closest_marker("process") else EmbeddedServer
    servers: list[Server] = []

    def make(
        *flags: str, key: str | None = None, start: bool = True, env: dict[str, str] | None = None
    ) -> Server:
        workdir = tmp_path / f"srv{len(servers) + 1}"
        server = new_server(workdir, *flags, key=key, env=env, kind=kind)
        servers.append(server)
        return server.start() if start else server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A command in-process (Typer's CliRunner), from `cwd` or else an empty directory (so
    that no ./.ai-agent-proxy.conf of the caller's is read); what a process would have
    shown."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as empty:
        os.chdir(cwd or empty)
        try:
            r = CliRunner().invoke(cli_app, list(args), env={"COLUMNS": "200", **(env or {})})
        finally:
            os.chdir(here)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback where a process would print one
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)
