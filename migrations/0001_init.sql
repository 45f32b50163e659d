-- The outbox: one row per accepted chat request, in arrival order.
CREATE TABLE requests (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    id                  TEXT    NOT NULL UNIQUE,             -- 32 hex, time ordered (UUIDv7)
    received_ms         INTEGER NOT NULL,                    -- unix ms, UTC
    inbox_file          TEXT    NOT NULL,                    -- file name the row becomes
    body                BLOB    NOT NULL,                    -- request body exactly as received
    body_hash           TEXT    NOT NULL,
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

-- The flusher's work queue stays small whatever the history holds.
CREATE INDEX requests_unwritten ON requests (seq) WHERE state IN ('pending', 'awaiting_backend');
-- Compaction and repeat detection look up earlier rows of one context.
CREATE INDEX requests_context ON requests (context_id, seq) WHERE context_id IS NOT NULL;
CREATE INDEX requests_received ON requests (received_ms);

-- Failed inbox writes, for `history show`.
CREATE TABLE inbox_failures (
    request_seq INTEGER NOT NULL REFERENCES requests (seq) ON DELETE CASCADE,
    at_ms       INTEGER NOT NULL,
    error       TEXT    NOT NULL
);
CREATE INDEX inbox_failures_request ON inbox_failures (request_seq);
