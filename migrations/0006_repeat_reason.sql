-- Why a row is a repeat of `duplicate_of` (NULL for rows that are not): 'retry' (OpenClaw
-- re-sent the same turn: same message and words) or 'resend' (the same body again within
-- DEDUP_WINDOW). `history show` of the original counts its repeats by this column.
ALTER TABLE requests ADD COLUMN repeat_reason TEXT;
-- Only repeats are indexed: the original's repeats are found without a scan.
CREATE INDEX requests_repeats ON requests (duplicate_of) WHERE duplicate_of IS NOT NULL;
