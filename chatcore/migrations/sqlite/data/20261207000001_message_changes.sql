-- The embedded twin of migrations/mysql/20261207000001_message_changes.sql.
ALTER TABLE chats ADD COLUMN last_change_sequence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE applications ADD COLUMN last_change_sequence INTEGER NOT NULL DEFAULT 0;

CREATE TABLE message_changes (
    chat_id INTEGER NOT NULL REFERENCES chats (id),
    sequence INTEGER NOT NULL,
    application_id INTEGER NOT NULL,
    application_sequence INTEGER NOT NULL,
    number INTEGER NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    message_created_at TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    PRIMARY KEY (chat_id, sequence),
    UNIQUE (application_id, application_sequence),
    UNIQUE (chat_id, number, version)
) WITHOUT ROWID;

INSERT INTO message_changes
    (chat_id, sequence, application_id, application_sequence, number, version, kind, body,
     message_created_at, occurred_at)
SELECT m.chat_id, ROW_NUMBER() OVER (PARTITION BY m.chat_id ORDER BY m.number),
       c.application_id, ROW_NUMBER() OVER (PARTITION BY c.application_id ORDER BY m.chat_id, m.number),
       m.number, m.version,
       CASE WHEN m.deleted_at IS NOT NULL THEN 'deleted' WHEN m.version > 1 THEN 'updated' ELSE 'created' END,
       m.body, m.created_at, m.updated_at
FROM messages m JOIN chats c ON c.id = m.chat_id;

UPDATE chats SET last_change_sequence =
    (SELECT MAX(sequence) FROM message_changes WHERE message_changes.chat_id = chats.id)
WHERE id IN (SELECT chat_id FROM message_changes);

UPDATE applications SET last_change_sequence =
    (SELECT MAX(application_sequence) FROM message_changes
     WHERE message_changes.application_id = applications.id)
WHERE id IN (SELECT application_id FROM message_changes);
