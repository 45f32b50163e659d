-- A row that can never become an inbox file (whatever the inbox does) ends `undeliverable`
-- after a few tries, so it no longer holds up the rows behind it; `row_failures` counts
-- those tries apart from failures of the inbox itself (disk full, path missing), which are
-- retried without end. SQLite cannot change a CHECK in place: the table is rebuilt (the
-- migration runs with foreign keys off, so inbox_failures keeps its rows).
CREATE TABLE requests_new (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,
    received_ms         INTEGER NOT NULL,
    body_segments       BLOB    NOT NULL,
    body_hash           BLOB    NOT NULL,
    context_id          TEXT,
    channel             TEXT,
    target              TEXT,
    message_id          TEXT,
    latest_user_prompt  TEXT    NOT NULL DEFAULT '',
    payload_kind        TEXT    NOT NULL CHECK (payload_kind IN ('full', 'compact')),
    state               TEXT    NOT NULL CHECK (state IN (
                            'awaiting_backend', 'pending', 'written', 'duplicate',
                            'undeliverable')),
    duplicate_of        TEXT,
    backend_instruction TEXT,
    backend_reply       TEXT,
    backend_status      INTEGER,
    backend_error       TEXT,
    backend_latency_ms  REAL,
    backend_usage       TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    claimed_until_ms    INTEGER,
    written_ms          INTEGER,
    claimed_by          TEXT,
    sender              TEXT,
    attachments         TEXT,
    modality            TEXT,
    row_failures        INTEGER NOT NULL DEFAULT 0
);
INSERT INTO requests_new (
    seq, id, received_ms, body_segments, body_hash, context_id, channel, target, message_id,
    latest_user_prompt, payload_kind, state, duplicate_of, backend_instruction, backend_reply,
    backend_status, backend_error, backend_latency_ms, backend_usage, attempts, last_error,
    claimed_until_ms, written_ms, claimed_by, sender, attachments, modality)
SELECT
    seq, id, received_ms, body_segments, body_hash, context_id, channel, target, message_id,
    latest_user_prompt, payload_kind, state, duplicate_of, backend_instruction, backend_reply,
    backend_status, backend_error, backend_latency_ms, backend_usage, attempts, last_error,
    claimed_until_ms, written_ms, claimed_by, sender, attachments, modality
FROM requests;
-- seq is never reused, also past rows pruned from the end: carry the counter over.
DELETE FROM sqlite_sequence WHERE name = 'requests_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'requests_new', seq FROM sqlite_sequence
WHERE name = 'requests';
DROP TABLE requests;
ALTER TABLE requests_new RENAME TO requests;
CREATE INDEX requests_state ON requests (state, seq);
CREATE INDEX requests_context_turn ON requests (context_id, message_id);
CREATE INDEX requests_context_body ON requests (context_id, body_hash);
CREATE INDEX requests_received ON requests (received_ms);
