-- The event that created each chat: a second `chat_created` event with the same (application,
-- number) is a number handed out twice, which the ingest consumer dead-letters instead of merging
-- it into the first chat. NULL for a chat stored by a message that came before its chat's event
-- (that event claims the row), and for chats written before this column existed.
ALTER TABLE chats ADD COLUMN event_id BINARY(16) NULL;
