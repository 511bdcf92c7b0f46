-- The embedded twin of migrations/mysql/20261209000001_senders_and_metadata.sql.
ALTER TABLE messages ADD COLUMN sender TEXT;
ALTER TABLE messages ADD COLUMN metadata TEXT;
ALTER TABLE messages ADD COLUMN edited_at TEXT;
CREATE INDEX messages_sender ON messages (chat_id, sender, number);

UPDATE messages SET edited_at = updated_at WHERE version > 1 AND deleted_at IS NULL;

ALTER TABLE message_changes ADD COLUMN sender TEXT;
ALTER TABLE message_changes ADD COLUMN metadata TEXT;
ALTER TABLE message_changes ADD COLUMN edited_at TEXT;

ALTER TABLE chats ADD COLUMN title TEXT;
ALTER TABLE chats ADD COLUMN metadata TEXT;
