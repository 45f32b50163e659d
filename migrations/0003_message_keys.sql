-- What identifies the person's message and what they sent besides text. Compact payloads
-- carry no body, so these are kept beside it; `attachments` also tells a retry of a turn
-- from a steered follow-up that shares its message_id.
ALTER TABLE requests ADD COLUMN sender TEXT;       -- JSON object: id, name, username (e164)
ALTER TABLE requests ADD COLUMN attachments TEXT;  -- JSON list of {path, mime, name}
ALTER TABLE requests ADD COLUMN modality TEXT;     -- OpenClaw's source_modality
