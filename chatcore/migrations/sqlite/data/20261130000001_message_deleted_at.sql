-- Deleted messages stay as tombstones (see the MySQL migration of the same name).
ALTER TABLE messages ADD COLUMN deleted_at TEXT;
