-- Content-addressed pieces of request bodies. OpenClaw re-sends the same ~58 KB (system
-- prompt, tools, conversation so far) on every request; each piece is stored once.
CREATE TABLE segments (
    id   INTEGER PRIMARY KEY,
    hash BLOB    NOT NULL UNIQUE,  -- blake2b-128 of data
    data BLOB    NOT NULL
);

-- The outbox: one row per accepted chat request, in arrival order.
CREATE TABLE requests (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    id                  TEXT    NOT NULL UNIQUE,             -- 32 hex, time ordered (UUIDv7)
    received_ms         INTEGER NOT NULL,                    -- unix ms, UTC
    body_segments       BLOB    NOT NULL,  -- segment ids (u32 LE); their data joined = the body
    body_hash           BLOB    NOT NULL,  -- blake2b-128 of the whole body, for repeat checks
    context_id          TEXT,
    channel             TEXT,
    target              TEXT,
    message_id          TEXT,
    latest_user_prompt  TEXT    NOT NULL DEFAULT '',
    payload_kind        TEXT    NOT NULL CHECK (payload_kind IN ('full', 'compact')),
    state               TEXT    NOT NULL
                        CHECK (state IN ('awaiting_backend', 'pending', 'written', 'duplicate')),
    duplicate_of        TEXT,
    backend_instruction TEXT,
    backend_reply       TEXT,
    backend_status      INTEGER,
    backend_error       TEXT,
    backend_latency_ms  REAL,
    backend_usage       TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    claimed_until_ms    INTEGER,                             -- a flusher's lease on the row
    written_ms          INTEGER
);

-- The flusher's queue and the backlog, whatever the history holds.
CREATE INDEX requests_state ON requests (state, seq);
-- Compaction and the two repeat checks each look up one context with one index.
CREATE INDEX requests_context_turn ON requests (context_id, message_id);
CREATE INDEX requests_context_body ON requests (context_id, body_hash);
CREATE INDEX requests_received ON requests (received_ms);

-- Failed inbox writes, for `history show`.
CREATE TABLE inbox_failures (
    request_seq INTEGER NOT NULL REFERENCES requests (seq) ON DELETE CASCADE,
    at_ms       INTEGER NOT NULL,
    error       TEXT    NOT NULL
);
CREATE INDEX inbox_failures_request ON inbox_failures (request_seq);
