-- The event that created each chat (see the MySQL migration of the same name).
ALTER TABLE chats ADD COLUMN event_id BLOB;
