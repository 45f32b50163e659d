"""`ai-agent-proxy doctor`: what is wrong between the proxy, OpenClaw and the agent, one check
a line (PASS, WARN or FAIL) with the fix. Each check is a small function of what it reads
(the settings, the running server, OpenClaw's config through its CLI and file, the gateway,
the inbox, the DB, the service manager) returning a Check; none changes anything, none
shows a secret (every line goes through the settings' redaction too).
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import openclaw_cli
from .config import Settings, exposed_secrets, settings_file
from .errors import ProxyError
from .openclaw_setup import DM_SCOPE, base_url

WAITING_WARN_S = 1800  # a message waiting longer than this for the agent: said
BACKLOG_WARN_S = 60  # a request not in the inbox after this long: said


class Status(str, enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not checked: an earlier check failed, or it does not apply


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.status.value:4} {self.name}: {self.detail}{fix}"

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


@dataclass
class Context:
    """What the checks share: the settings, the config file, OpenClaw's config (read once)."""

    settings: Settings
    config: str | None
    openclaw: str | None = None  # the CLI's path, once found
    openclaw_config: dict[str, Any] | None = None
    openclaw_config_path: Path | None = None
    provider: str | None = None  # the provider that reaches this server


def check_settings_file(ctx: Context) -> Check:
    path = settings_file(ctx.config)
    if path is None:
        return Check(
            "settings file",
            Status.WARN,
            "none: defaults and AI_AGENT_PROXY_* only",
            "ai-agent-proxy setup writes one, with a KEY shared with OpenClaw",
        )
    exposed = exposed_secrets(path)
    if exposed:
        return Check("settings file", Status.WARN, exposed, f"chmod 600 {path}")
    return Check("settings file", Status.PASS, f"{path} (mode {path.stat().st_mode & 0o777:o})")


def check_server(ctx: Context) -> Check:
    import httpx

    s = ctx.settings
    url = base_url(s).removesuffix("/v1") + "/readyz"
    headers = {"authorization": f"Bearer {s.key}"} if s.key else {}
    try:
        answer = httpx.get(url, headers=headers, timeout=3)
    except httpx.HTTPError as exc:
        return Check(
            "server",
            Status.FAIL,
            f"{url}: not reachable ({type(exc).__name__})",
            "start it: ai-agent-proxy (or ai-agent-proxy service install)",
        )
    if answer.status_code == 401:
        return Check(
            "server",
            Status.FAIL,
            f"{url} refused this KEY (401)",
            "the server runs with another KEY: run both from the same settings file",
        )
    try:
        report = answer.json()
    except ValueError:
        report = {}
    if answer.status_code != 200:
        # what /readyz says is wrong (its db or inbox), else its status
        wrong = [f"{part} {report[part]}" for part in ("db", "inbox")
                 if report.get(part) not in (None, "ok")]  # fmt: skip
        why = "; ".join(wrong) or report.get("status") or answer.status_code
        return Check(
            "server",
            Status.FAIL,
            f"{url}: not ready ({why})",
            "see its log; ai-agent-proxy history stats",
        )
    return Check("server", Status.PASS, f"{url}: ready (backlog {report.get('backlog', '?')})")


def check_openclaw_cli(ctx: Context) -> Check:
    binary = ctx.settings.openclaw_bin
    path = openclaw_cli.found(binary)
    if path is None:
        return Check(
            "openclaw CLI",
            Status.FAIL,
            f"{binary} is not on PATH",
            "install OpenClaw, or set OPENCLAW_BIN to its path",
        )
    version = openclaw_cli.version(binary)
    if version is None:
        return Check(
            "openclaw CLI", Status.FAIL, f"{path} does not answer --version", "reinstall OpenClaw"
        )
    ctx.openclaw = binary
    config_path = openclaw_cli.config_file(binary)
    if config_path is not None:
        from .agent.delivery import read_openclaw_config

        ctx.openclaw_config_path = config_path
        ctx.openclaw_config = read_openclaw_config(config_path)
    return Check("openclaw CLI", Status.PASS, f"{path}: {version}")


def check_provider(ctx: Context) -> Check:
    if ctx.openclaw is None:
        return Check("OpenClaw provider", Status.SKIP, "the openclaw CLI is missing")
    if ctx.openclaw_config is None:
        return Check(
            "OpenClaw provider",
            Status.FAIL,
            f"OpenClaw's config ({ctx.openclaw_config_path or '?'}) cannot be read",
            "ai-agent-proxy setup",
        )
    ours = urlsplit(base_url(ctx.settings))
    providers = (ctx.openclaw_config.get("models") or {}).get("providers") or {}
    matching = [
        (name, p)
        for name, p in providers.items()
        if isinstance(p, dict) and _same_server(str(p.get("baseUrl") or ""), ours)
    ]
    if not matching:
        return Check(
            "OpenClaw provider",
            Status.FAIL,
            f"no provider in {ctx.openclaw_config_path} has baseUrl {base_url(ctx.settings)}",
            "ai-agent-proxy setup --default-model",
        )
    name, provider = matching[0]
    ctx.provider = name
    key = ctx.settings.key
    if key and provider.get("apiKey") != key:
        return Check(
            "OpenClaw provider",
            Status.FAIL,
            f'provider {name}\'s apiKey is not this KEY: the person sees "Authentication failed"',
            "ai-agent-proxy setup",
        )
    if provider.get("api") != "openai-completions":
        return Check(
            "OpenClaw provider",
            Status.FAIL,
            f"provider {name} has api {provider.get('api')!r}, not openai-completions",
            "ai-agent-proxy setup",
        )
    keyed = "its apiKey is this KEY" if key else "KEY is not set: anyone on this machine may post"
    return Check(
        "OpenClaw provider",
        Status.PASS if key else Status.WARN,
        f"{name} -> {provider.get('baseUrl')}; {keyed}",
        None if key else "ai-agent-proxy setup (a random KEY, shared)",
    )


def _same_server(url: str, ours: Any) -> bool:
    try:
        theirs = urlsplit(url)
        same_port = (theirs.port or 80) == (ours.port or 80)
    except ValueError:
        return False
    hosts = {"127.0.0.1", "localhost", "::1"}
    same_host = theirs.hostname == ours.hostname or {theirs.hostname, ours.hostname} <= hosts
    return same_host and same_port and theirs.path.rstrip("/") == "/v1"


def check_agents_model(ctx: Context) -> Check:
    if ctx.provider is None or ctx.openclaw_config is None:
        return Check("agents' model", Status.SKIP, "no provider of this server in OpenClaw")
    agents = ctx.openclaw_config.get("agents") or {}
    ours = f"{ctx.provider}/"
    primary = str(_primary((agents.get("defaults") or {}).get("model")) or "")
    if primary.startswith(ours):
        return Check("agents' model", Status.PASS, f"{primary}: the agents' default model")
    listed = [
        str(a.get("id"))
        for a in agents.get("list") or []
        if isinstance(a, dict) and str(_primary(a.get("model")) or "").startswith(ours)
    ]
    if listed:
        return Check("agents' model", Status.PASS, f"agents {', '.join(listed)} use {ctx.provider}")
    return Check(
        "agents' model",
        Status.FAIL,
        f"no agent uses {ctx.provider} (default model: {primary or 'unset'}): OpenClaw"
        " answers with its own model and nothing reaches the inbox",
        "ai-agent-proxy setup --default-model",
    )


def _primary(model: Any) -> Any:
    """An agent's model: "provider/model", or {"primary": "provider/model", ...}."""
    return model.get("primary") if isinstance(model, dict) else model


def check_dm_scope(ctx: Context) -> Check:
    if ctx.openclaw_config is None:
        return Check("DM scope", Status.SKIP, "OpenClaw's config cannot be read")
    scope = (ctx.openclaw_config.get("session") or {}).get("dmScope")
    if scope in (DM_SCOPE, "per-account-channel-peer"):
        return Check("DM scope", Status.PASS, f"session.dmScope {scope}: a session per chat")
    return Check(
        "DM scope",
        Status.WARN,
        f"session.dmScope {scope or 'unset (main)'}: every person's DMs share one"
        " session, so one's request carries the others' turns",
        "ai-agent-proxy setup --dm-scope",
    )


def check_reply(ctx: Context) -> Check:
    if ctx.settings.reply.strip():
        return Check("REPLY", Status.PASS, "a holding answer is set")
    if ctx.settings.url:
        return Check("REPLY", Status.PASS, "empty, and a backend answers (URL set)")
    return Check(
        "REPLY",
        Status.WARN,
        "empty: OpenClaw treats an empty answer as a failure, retries the turn, then"
        ' tells the person "Agent couldn\'t generate a response"',
        'set REPLY="On it - I\'ll reply in a moment." (ai-agent-proxy setup adds it)',
    )


def check_gateway(ctx: Context) -> Check:
    from .agent.delivery import Gateway, GatewayUnreachable, find_gateway

    try:
        config = find_gateway(ctx.settings)
    except ProxyError as exc:
        return Check("gateway", Status.FAIL, str(exc), "fix OPENCLAW_GATEWAY_URL")
    if config is None:
        return Check(
            "gateway",
            Status.WARN,
            "not found (no OpenClaw config, no OPENCLAW_GATEWAY_URL): replies go"
            " through the openclaw CLI, ~5 s each",
            "set OPENCLAW_GATEWAY_URL and OPENCLAW_GATEWAY_TOKEN",
        )
    gateway = Gateway(config, ctx.settings.redact)
    try:
        gateway.connect()
    except GatewayUnreachable as exc:
        return Check(
            "gateway",
            Status.FAIL,
            f"{exc}",
            "start it (openclaw gateway run, or its service), and check"
            " gateway.auth.token / OPENCLAW_GATEWAY_TOKEN",
        )
    finally:
        gateway.close()
    return Check(
        "gateway",
        Status.PASS,
        f"{config.url} let us in (from {config.source}): replies go through it",
    )


def check_inbox(ctx: Context) -> Check:
    inbox = ctx.settings.inbox
    if inbox.exists() and not inbox.is_dir():
        return Check("inbox", Status.FAIL, f"{inbox} is not a folder: no file can be written",
                     f"move it away: mv {inbox} {inbox}.old")  # fmt: skip
    if not inbox.is_dir():
        return Check(
            "inbox",
            Status.WARN,
            f"{inbox} does not exist yet",
            "the server makes it with the first message's file",
        )
    probe = inbox / f".doctor-{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
        os.replace(probe, probe.with_suffix(".done"))  # the writer's own rename
        probe.with_suffix(".done").unlink()
    except OSError as exc:
        probe.unlink(missing_ok=True)
        return Check(
            "inbox",
            Status.FAIL,
            f"{inbox}: cannot write and rename a file there ({exc.strerror or exc})",
            f"check its owner and mode: ls -ld {inbox}",
        )
    return Check("inbox", Status.PASS, f"{inbox}: writable (a temp file written and renamed)")


def _history(ctx: Context) -> Any:
    from .history import History

    return History(ctx.settings.db_path)


def check_backlog(ctx: Context) -> Check:
    try:
        audit = _history(ctx)
    except ProxyError as exc:
        return Check("backlog", Status.WARN, f"no DB to read: {exc}", "start the server once")
    try:
        stats = audit.stats(top=0)
        oldest_waiting = audit.oldest_unanswered_ms()
    finally:
        audit.close()
    now = time.time() * 1000
    detail = f"{stats['backlog']} not yet in the inbox, {stats['unanswered']} waiting for the agent"
    if stats["backlog"] and stats["oldest_unwritten_at"]:
        from datetime import datetime

        age = (now - datetime.fromisoformat(stats["oldest_unwritten_at"]).timestamp() * 1000) / 1000
        if age > BACKLOG_WARN_S:
            return Check(
                "backlog",
                Status.WARN,
                f"{detail}; the oldest unwritten is {age:.0f} s old",
                "ai-agent-proxy history --state failed; the server's /readyz",
            )
    if oldest_waiting is not None and (now - oldest_waiting) / 1000 > WAITING_WARN_S:
        age = (now - oldest_waiting) / 60000
        return Check(
            "backlog",
            Status.WARN,
            f"{detail}; the oldest has waited {age:.0f} min",
            "ai-agent-proxy next (or run the agent: ai-agent-proxy agent --preset ...)",
        )
    return Check("backlog", Status.PASS, detail)


def check_failed_replies(ctx: Context) -> Check:
    try:
        audit = _history(ctx)
    except ProxyError:
        return Check("replies", Status.SKIP, "no DB to read")
    try:
        failed, last = audit.failed_replies_since(int((time.time() - 86400) * 1000))
    finally:
        audit.close()
    if failed:
        return Check(
            "replies",
            Status.WARN,
            f"{failed} failed in the last day (the last: {last})",
            "ai-agent-proxy history --unanswered; reply again",
        )
    return Check("replies", Status.PASS, "none failed in the last day")


def check_runner(ctx: Context) -> Check:
    from . import service

    if not (service.unit_path(agent=True).exists() or service.plist_path(agent=True).exists()):
        return Check(
            "agent runner",
            Status.SKIP,
            "no runner service installed (ai-agent-proxy service install --agent --preset ...)",
        )
    lines, active = service.status(ctx.settings, service.manager(), agent=True)
    runs = next((ln for ln in lines if ln.startswith("runs in the last day")), "")
    if not active:
        return Check(
            "agent runner",
            Status.FAIL,
            "installed but not running",
            "ai-agent-proxy service status --agent; service start --agent",
        )
    return Check("agent runner", Status.PASS, f"running; {runs}")


CHECKS: tuple[Callable[[Context], Check], ...] = (
    check_settings_file,
    check_server,
    check_openclaw_cli,
    check_provider,
    check_agents_model,
    check_dm_scope,
    check_reply,
    check_gateway,
    check_inbox,
    check_backlog,
    check_failed_replies,
    check_runner,
)


def run(settings: Settings, config: str | None) -> Iterator[Check]:
    from .agent.delivery import find_gateway
    from .redaction import Redactor

    ctx = Context(settings, config)
    try:  # the gateway's token found in OpenClaw's config is a secret too
        gateway = find_gateway(settings)
    except ProxyError:
        gateway = None
    redact = Redactor.for_settings(
        settings.key,
        settings.api_key,
        settings.url,
        settings.openclaw_gateway_token,
        gateway.token if gateway else None,
    )
    for check in CHECKS:
        try:
            found = check(ctx)
        except Exception as exc:  # a check that breaks is a finding, not a crash
            found = Check(
                check.__name__.removeprefix("check_"),
                Status.FAIL,
                f"the check itself failed: {type(exc).__name__}: {exc}",
            )
        yield Check(
            found.name,
            found.status,
            redact(found.detail),
            None if found.fix is None else redact(found.fix),
        )
