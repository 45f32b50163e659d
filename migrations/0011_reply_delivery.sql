-- Replies delivered through OpenClaw's gateway (agent/delivery.py), or its CLI as before.
-- `transport`: 'gateway' or 'cli'; `delivered_id`: the channel's message id the gateway
-- reported; `maybe_sent`: an attempt that may have reached the gateway without an answer
-- (or a send whose process died): from then on only the gateway, which knows the reply's
-- key, may send it again. A new state, 'queued': the gateway accepted it for delivery
-- later (answered; never sent again). SQLite cannot change a CHECK: the table is rebuilt.
CREATE TABLE replies_new (
    request_id   TEXT    PRIMARY KEY REFERENCES requests (id) ON DELETE CASCADE,
    state        TEXT    NOT NULL
                 CHECK (state IN ('sending', 'sent', 'queued', 'failed', 'done')),
    message      TEXT,                 -- what was (or was to be) sent; NULL for 'done'
    claimed_ms   INTEGER NOT NULL,     -- when this attempt began
    finished_ms  INTEGER,              -- when it was delivered, failed, or marked done
    exit_status  INTEGER,              -- the openclaw CLI's, when it was used
    output       TEXT,                 -- what the gateway or the CLI said (its tail)
    attempts     INTEGER NOT NULL DEFAULT 0,
    abandoned_ms INTEGER,
    covered_by   TEXT,
    transport    TEXT,
    delivered_id TEXT,
    maybe_sent   INTEGER NOT NULL DEFAULT 0
);
INSERT INTO replies_new (request_id, state, message, claimed_ms, finished_ms, exit_status,
                         output, attempts, abandoned_ms, covered_by, transport)
    SELECT request_id, state, message, claimed_ms, finished_ms, exit_status, output,
           attempts, abandoned_ms, covered_by,
           CASE WHEN state IN ('sent', 'failed') AND attempts > 0 THEN 'cli' END
    FROM replies;
DROP TABLE replies;
ALTER TABLE replies_new RENAME TO replies;
CREATE INDEX replies_state ON replies (state);
CREATE INDEX replies_covered ON replies (covered_by) WHERE covered_by IS NOT NULL;
