-- A reply claim ('sending') whose process died is taken over once its lease has run out
-- (replies.LEASE_MS); when that happened is kept, for `history show`.
ALTER TABLE replies ADD COLUMN abandoned_ms INTEGER;
