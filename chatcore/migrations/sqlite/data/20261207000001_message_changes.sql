-- The embedded twin of migrations/mysql/20261207000001_message_changes.sql.
ALTER TABLE chats ADD COLUMN last_change_sequence INTEGER NOT NULL DEFAULT 0;

CREATE TABLE message_changes (
    chat_id INTEGER NOT NULL REFERENCES chats (id),
    sequence INTEGER NOT NULL,
    number INTEGER NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    message_created_at TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    PRIMARY KEY (chat_id, sequence),
    UNIQUE (chat_id, number, version)
) WITHOUT ROWID;

INSERT INTO message_changes
    (chat_id, sequence, number, version, kind, body, message_created_at, occurred_at)
SELECT chat_id, ROW_NUMBER() OVER (PARTITION BY chat_id ORDER BY number), number, version,
       CASE WHEN deleted_at IS NOT NULL THEN 'deleted' WHEN version > 1 THEN 'updated' ELSE 'created' END,
       body, created_at, updated_at
FROM messages;

UPDATE chats SET last_change_sequence =
    (SELECT MAX(sequence) FROM message_changes WHERE message_changes.chat_id = chats.id)
WHERE id IN (SELECT chat_id FROM message_changes);
