-- The agent's side of the loop: the reply to each request (or that none is needed). One row
-- per request; claimed ('sending') in a transaction before the message is sent, so two
-- `reply` calls for one request send once. Pruned with its request.
CREATE TABLE replies (
    request_id  TEXT    PRIMARY KEY REFERENCES requests (id) ON DELETE CASCADE,
    state       TEXT    NOT NULL CHECK (state IN ('sending', 'sent', 'failed', 'done')),
    message     TEXT,                 -- what was (or was to be) sent; NULL for 'done'
    claimed_ms  INTEGER NOT NULL,     -- when this attempt began
    finished_ms INTEGER,              -- when it was sent, failed, or marked done
    exit_status INTEGER,              -- the openclaw CLI's
    output      TEXT,                 -- the openclaw CLI's output (its tail)
    attempts    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX replies_state ON replies (state);
