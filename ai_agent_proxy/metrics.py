"""Prometheus metrics of one worker process (prometheus-client, text format)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .agent.runner.runs import Outcome
from .errors import OutboxError
from .flusher import FlusherStatus
from .outbox.store import Outbox
from .rows import State

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# the agent runner's outcomes, and a run still running
RUN_OUTCOMES = (*(o.value for o in Outcome), "running")


class Metrics:
    """Prometheus metrics of one worker process; DB gauges are read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aiap_http_requests",
            "HTTP requests answered",
            ["route", "status"],
            registry=self.registry,
        )
        self.rows = Gauge("aiap_rows", "Outbox rows by state", ["state"], registry=self.registry)
        self.backlog = Gauge(
            "aiap_backlog_rows", "Rows not yet in the inbox", registry=self.registry
        )
        self.backlog_age = Gauge(
            "aiap_backlog_oldest_age_seconds",
            "Age of the oldest row not yet in the inbox",
            registry=self.registry,
        )
        self.files = Gauge(
            "aiap_inbox_files_written",
            "Inbox files written by this process",
            registry=self.registry,
        )
        self.failures = Gauge(
            "aiap_inbox_write_failures",
            "Failed inbox writes in this process",
            registry=self.registry,
        )
        self.unanswered = Gauge(
            "aiap_unanswered_requests",
            "Requests in the inbox the agent has neither replied to nor marked done",
            registry=self.registry,
        )
        self.waiting_chats = Gauge(
            "aiap_waiting_conversations",
            "Conversations with a request the agent has neither replied to nor marked done",
            registry=self.registry,
        )
        self.agent_runs = Gauge(
            "aiap_agent_runs_last_day",
            "The agent runner's runs started in the last 24 hours, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.set_aside = Gauge(
            "aiap_agent_conversations_set_aside",
            "Conversations the agent runner set aside after failed runs (until a new message)",
            registry=self.registry,
        )
        self.delivery = Gauge(
            "aiap_reply_delivery_seconds",
            "Time from a reply's start to its delivery's answer (the newest 1000), by transport",
            ["transport", "quantile"],
            registry=self.registry,
        )
        self.flush_latency = Histogram(
            "aiap_request_to_file_seconds",
            "Time from receipt to inbox file",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self._answered: dict[tuple[str, int], Any] = {}

    def answered(self, route: str, status: int) -> None:
        """Count an answer (its labelled counter looked up once per route and status: the
        lookup took several times the increment)."""
        counter = self._answered.get((route, status))
        if counter is None:
            counter = self._answered[(route, status)] = self.requests.labels(route, str(status))
        counter.inc()

    async def scrape(self, outbox: Outbox, flusher: FlusherStatus) -> bytes:
        """Prometheus text; the row gauges are read from the DB now, so every worker
        reports the same, current numbers."""
        try:
            counts = await outbox.counts_by_state()
            backlog, oldest = await outbox.backlog()
            unanswered, waiting_chats = await outbox.count_unanswered()
            runs, set_aside = await outbox.agent_runner()
            delivery = await outbox.reply_delivery()
        except OutboxError:
            counts, backlog, oldest, unanswered, waiting_chats = {}, -1, None, -1, -1
            runs, set_aside, delivery = {}, -1, {}
        for state in State:
            self.rows.labels(state.value).set(counts.get(state.value, 0))
        self.backlog.set(backlog)
        self.unanswered.set(unanswered)
        self.waiting_chats.set(waiting_chats)
        for outcome in (*RUN_OUTCOMES, *runs):  # every outcome shown, 0 when none
            self.agent_runs.labels(outcome).set(runs.get(outcome, 0))
        self.set_aside.set(set_aside)
        for transport, times in delivery.items():
            times.sort()
            for q in (0.5, 0.9, 0.99):
                ms = times[min(len(times) - 1, int(q * len(times)))]
                self.delivery.labels(transport, str(q)).set(ms / 1000)
        self.backlog_age.set(0 if oldest is None else max(0.0, time.time() - oldest / 1000))
        self.files.set(flusher.files_written)
        self.failures.set(flusher.write_failures)
        return generate_latest(self.registry)
