-- The agent runner (`ai-agent-proxy agent`): its state is rows, so a runner killed with -9
-- and started again continues where it was.

-- One row per run of the agent's CLI on a conversation, written when it starts and
-- completed when it ends; a row without `ended_ms` whose runner is gone was interrupted.
CREATE TABLE agent_runs (
    id             TEXT    PRIMARY KEY,      -- time-ordered hex, like request ids
    conversation   TEXT    NOT NULL,         -- context_id, or 'request:<id>'
    request_ids    TEXT    NOT NULL,         -- JSON list of the messages it was given, in order
    command        TEXT    NOT NULL,         -- JSON argv, secrets masked
    runner         TEXT    NOT NULL,         -- JSON {"name", "pid", "started"}: who ran it
    slot           INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,         -- of this conversation's waiting messages, from 1
    pid            INTEGER,                  -- the child (its process group has the same id)
    pid_started    INTEGER,                  -- the child's start time (/proc stat), against pid reuse
    started_ms     INTEGER NOT NULL,
    ended_ms       INTEGER,
    exit_status    INTEGER,                  -- negative: killed by that signal
    limit_fired    TEXT,                     -- timeout, idle, stopped (the runner's stop or `agent stop`)
    outcome        TEXT,                     -- how it ended (runs.Outcome: answered, held, ...)
    sent_output    INTEGER NOT NULL DEFAULT 0,  -- --send-output sent the CLI's answer
    session_before TEXT,
    session_after  TEXT,
    cost_usd       REAL,
    tokens         INTEGER,
    error          TEXT,                     -- why it failed, in one line
    output_tail    TEXT,                     -- the last 4 KB of its output (stdout and stderr)
    stop_requested_ms INTEGER                -- `agent stop` asked for it
);
CREATE INDEX agent_runs_conversation ON agent_runs (conversation, started_ms);
CREATE INDEX agent_runs_started ON agent_runs (started_ms);
CREATE INDEX agent_runs_unfinished ON agent_runs (started_ms) WHERE ended_ms IS NULL;

-- A conversation's session with an agent CLI: a stable UUID (AIAP_SESSION) and the CLI's
-- own session id, resumed by the next run of that conversation.
CREATE TABLE agent_sessions (
    conversation TEXT NOT NULL,
    agent        TEXT NOT NULL,              -- the preset, or 'command'
    stable_id    TEXT NOT NULL,
    session_id   TEXT,
    updated_ms   INTEGER NOT NULL,
    PRIMARY KEY (conversation, agent)
);

-- A conversation the runner tried and failed: how often for its waiting messages, when to
-- try again, and, once its attempts are spent, set aside until a message newer than
-- `set_aside_seq` arrives.
CREATE TABLE agent_conversations (
    conversation   TEXT    PRIMARY KEY,
    failures       INTEGER NOT NULL,
    retry_after_ms INTEGER,
    set_aside_seq  INTEGER,
    set_aside_ms   INTEGER,
    last_outcome   TEXT
);
