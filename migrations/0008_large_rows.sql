-- Large rows stay cheap to read, compare and update.
--
-- The person's words of PROMPT_INLINE_MAX characters or more are stored once as a segment
-- (content-addressed, like bodies), the row keeping the first ones in latest_user_prompt
-- and the segment in prompt_segment. Inline, 15 MiB of words made every column after them
-- an overflow-chain walk of 3,500 pages (the repeat check read them for each later request
-- of the chat), and every UPDATE (a lease, a mark) rewrote them whole.
ALTER TABLE requests ADD COLUMN prompt_segment INTEGER;

-- The size of each large row (its body and the person's words, from 1 MiB), so a flusher's
-- claim can stop at a number of bytes without reading the rows to learn theirs (128 rows
-- of 15 MiB were once read into memory by one claim). Rows not listed are small.
CREATE TABLE large_rows (
    seq   INTEGER PRIMARY KEY REFERENCES requests (seq) ON DELETE CASCADE,
    bytes INTEGER NOT NULL
);
