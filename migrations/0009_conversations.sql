-- Conversations: the agent answers a chat, not a message.
--
-- A request is answered once a reply to it was sent or it was marked done, directly or
-- covered by a reply to a later message of its conversation (`replies.covered_by` names
-- that reply). `answered_ms` says when, on the request itself, so the waiting requests
-- (written, not answered) are found by two small partial indexes, whatever the history
-- holds: the oldest waiting overall, and a conversation's waiting ones in order.
ALTER TABLE requests ADD COLUMN answered_ms INTEGER;
UPDATE requests SET answered_ms = (
    SELECT coalesce(finished_ms, claimed_ms) FROM replies WHERE replies.request_id = requests.id
) WHERE id IN (SELECT request_id FROM replies WHERE state IN ('sent', 'done'));
CREATE INDEX requests_waiting ON requests (seq)
    WHERE state = 'written' AND answered_ms IS NULL;
CREATE INDEX requests_waiting_by_chat ON requests (context_id, seq)
    WHERE state = 'written' AND answered_ms IS NULL;
-- A conversation's messages in arrival order (how many were answered before the waiting
-- ones, what came after a message): walked from a point, never read whole.
CREATE INDEX requests_chat ON requests (context_id, seq);

ALTER TABLE replies ADD COLUMN covered_by TEXT;  -- the request whose reply covered this one
CREATE INDEX replies_covered ON replies (covered_by) WHERE covered_by IS NOT NULL;

-- Who works on a conversation (`next --as NAME`, an MCP session, a runner's slot) and until
-- when: others' `next` skip it meanwhile. `conversation` is the context_id, or
-- 'request:<id>' for a request without one (a conversation of its own).
CREATE TABLE conversation_leases (
    conversation TEXT    PRIMARY KEY,
    taker        TEXT    NOT NULL,
    taken_ms     INTEGER NOT NULL,
    until_ms     INTEGER NOT NULL
);
