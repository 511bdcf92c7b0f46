-- The event that created each message (see the MySQL migration of the same name).
ALTER TABLE messages ADD COLUMN event_id BLOB;

CREATE INDEX messages_updated_at ON messages (updated_at);
