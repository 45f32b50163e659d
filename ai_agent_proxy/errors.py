"""Every error ai-agent-proxy raises on purpose, under one base class. Each message is
already phrased for the person who will read it (one line, no traceback).

    ProxyError            exit_code: what the CLI exits with (2 unless said otherwise)
     ├── ConfigError      a bad setting: key, value and where it came from (exit 2)
     ├── StartError       the server cannot start or stopped on its own: port taken (exit 1)
     ├── ServiceError     a service manager call failed (exit 1)
     ├── SchemaError      the DB cannot be used by this version (newer, not a DB)
     ├── OutboxError       the outbox could not do it now (locked, full, read-only): retry
     │    └── RowRejected this one row can never be stored (the client gets 400, not 503)
     ├── HistoryError     a history/replay query that cannot run (bad id, time, state, DB)
     ├── ReplayError      a row that cannot be written again as an inbox file (exit 1)
     ├── ReplyRefused     a request answered already, or whose reply is being sent (exit 1)
     │    └── NewerMessagesWait  newer messages of the conversation wait: nothing sent (exit 4)
     ├── ReplyFailed      the delivery failed (the gateway refused it, or was down and so
     │                    was the CLI's path): recorded, try again later (exit 1)
     ├── SetupFailed      a step of `setup` failed; OpenClaw's config kept as it was (exit 1)
     └── BackendError     the backend LLM gave no usable answer (safe to log and record)

The CLI turns any ProxyError into one line on stderr and a non-zero exit; the server turns
OutboxError into 503 and RowRejected into 400. The write engine raises OutboxError for work
given to it once closed.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class: an error whose message is meant for the user."""

    exit_code = 2


class StartError(ProxyError):
    """The server cannot serve (the port is taken, not ours to bind) or stopped on its own."""

    exit_code = 1


class SetupFailed(ProxyError):
    """A step of `setup` failed (OpenClaw refused the change, the CLI is missing): what was
    done before it is said, what failed in one line; OpenClaw's config as it was."""

    exit_code = 1


class ServiceError(ProxyError):
    """A service manager (systemctl, launchctl) call failed, or there is none to call."""

    exit_code = 1


class ConfigError(ProxyError):
    """A configuration problem, already phrased as the one line the user sees."""


class SchemaError(ProxyError):
    """The DB cannot be used by this version (newer schema, unreadable, not a DB)."""


class OutboxError(ProxyError):
    """The outbox could not do what was asked (locked, read-only, disk full, ...): worth
    trying again later."""


class RowRejected(OutboxError):
    """This one row cannot be stored, now or later (something in it the DB refuses)."""


class HistoryError(ProxyError):
    """A bad history or replay query, or an unusable DB, phrased for the user."""


class ReplayError(ProxyError):
    """A row that cannot be replayed, phrased for the user."""

    exit_code = 1


class ReplyRefused(ProxyError):
    """`reply`/`done` did not claim the request: answered already, or a reply is being
    sent (by another process, within its lease)."""

    exit_code = 1


class NewerMessagesWait(ReplyRefused):
    """`reply` to a message while newer ones of its conversation wait: nothing was sent.
    `newer` holds them (agent.conversations.Message), for the caller to show."""

    exit_code = 4

    def __init__(self, message: str, newer: list[object]) -> None:
        super().__init__(message)
        self.newer = newer


class ReplyFailed(ProxyError):
    """`openclaw message send` failed; the failure is recorded and a later reply may try
    again."""

    exit_code = 1


class BackendError(ProxyError):
    """The backend did not give a usable answer; the message is safe to log and record."""
