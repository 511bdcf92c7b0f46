-- Who sent a message, the integrator's data on chats and messages (a JSON object, compact), and
-- when a message was first edited. Every new column may be NULL, which is what rows written before
-- mean: no sender, no metadata, no title. A message edited before has no record of its first edit;
-- its last one stands in. The change log keeps each change's message as it left it, these fields too.
ALTER TABLE messages
    ADD COLUMN sender VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN metadata TEXT NULL,
    ADD COLUMN edited_at DATETIME(3) NULL,
    ADD KEY messages_sender (chat_id, sender, number);

UPDATE messages SET edited_at = updated_at WHERE version > 1 AND deleted_at IS NULL;

ALTER TABLE message_changes
    ADD COLUMN sender VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN metadata TEXT NULL,
    ADD COLUMN edited_at DATETIME(3) NULL;

ALTER TABLE chats
    ADD COLUMN title VARCHAR(255) NULL,
    ADD COLUMN metadata TEXT NULL;
