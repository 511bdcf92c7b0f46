-- The change log: every stored change of a message (created, updated, deleted), written in the
-- transaction that stores the change, with two sequences: its chat's next (the chat's log: the
-- live streams and the chat's replay API) and its application's next (the application's feed). A
-- change keeps the message as it was then. One change per (message, version): a redelivered event
-- cannot log its change twice.
ALTER TABLE chats ADD COLUMN last_change_sequence BIGINT UNSIGNED NOT NULL DEFAULT 0;
ALTER TABLE applications ADD COLUMN last_change_sequence BIGINT UNSIGNED NOT NULL DEFAULT 0;

CREATE TABLE message_changes (
    chat_id BIGINT UNSIGNED NOT NULL,
    sequence BIGINT UNSIGNED NOT NULL,
    application_id BIGINT UNSIGNED NOT NULL,
    application_sequence BIGINT UNSIGNED NOT NULL,
    number BIGINT UNSIGNED NOT NULL,
    version BIGINT UNSIGNED NOT NULL,
    kind VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    body MEDIUMTEXT NOT NULL,
    message_created_at DATETIME(3) NOT NULL,
    occurred_at DATETIME(3) NOT NULL,
    PRIMARY KEY (chat_id, sequence),
    UNIQUE KEY message_changes_application (application_id, application_sequence),
    UNIQUE KEY message_changes_version (chat_id, number, version),
    CONSTRAINT message_changes_chat FOREIGN KEY (chat_id) REFERENCES chats (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- The messages stored before the log existed: one change each, their state now, in number order.
INSERT INTO message_changes
    (chat_id, sequence, application_id, application_sequence, number, version, kind, body,
     message_created_at, occurred_at)
SELECT m.chat_id, ROW_NUMBER() OVER (PARTITION BY m.chat_id ORDER BY m.number),
       c.application_id, ROW_NUMBER() OVER (PARTITION BY c.application_id ORDER BY m.chat_id, m.number),
       m.number, m.version,
       CASE WHEN m.deleted_at IS NOT NULL THEN 'deleted' WHEN m.version > 1 THEN 'updated' ELSE 'created' END,
       m.body, m.created_at, m.updated_at
FROM messages m JOIN chats c ON c.id = m.chat_id;

UPDATE chats c
JOIN (SELECT chat_id, MAX(sequence) AS last FROM message_changes GROUP BY chat_id) logged
    ON logged.chat_id = c.id
SET c.last_change_sequence = logged.last;

UPDATE applications a
JOIN (SELECT application_id, MAX(application_sequence) AS last FROM message_changes GROUP BY application_id) logged
    ON logged.application_id = a.id
SET a.last_change_sequence = logged.last;
