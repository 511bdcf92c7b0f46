-- The event that created each message: a second event with the same (chat, number) is a number
-- handed out twice, which the ingest consumer records instead of dropping. NULL for messages
-- written before this column existed.
ALTER TABLE messages ADD COLUMN event_id BINARY(16) NULL;

-- The reconciliation pass of counter-sync re-indexes the messages updated lately.
CREATE INDEX messages_updated_at ON messages (updated_at);
