-- The change log of each chat: every stored change of a message (created, updated, deleted) with
-- the chat's next change sequence, written in the transaction that stores the change. The live
-- streams resume from it and the replay API reads it. A change keeps the message as it was then.
-- One change per (message, version): a redelivered event cannot log its change twice.
ALTER TABLE chats ADD COLUMN last_change_sequence BIGINT UNSIGNED NOT NULL DEFAULT 0;

CREATE TABLE message_changes (
    chat_id BIGINT UNSIGNED NOT NULL,
    sequence BIGINT UNSIGNED NOT NULL,
    number BIGINT UNSIGNED NOT NULL,
    version BIGINT UNSIGNED NOT NULL,
    kind VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    body MEDIUMTEXT NOT NULL,
    message_created_at DATETIME(3) NOT NULL,
    occurred_at DATETIME(3) NOT NULL,
    PRIMARY KEY (chat_id, sequence),
    UNIQUE KEY message_changes_version (chat_id, number, version),
    CONSTRAINT message_changes_chat FOREIGN KEY (chat_id) REFERENCES chats (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- The messages stored before the log existed: one change each, their state now, in number order.
INSERT INTO message_changes
    (chat_id, sequence, number, version, kind, body, message_created_at, occurred_at)
SELECT chat_id, ROW_NUMBER() OVER (PARTITION BY chat_id ORDER BY number), number, version,
       CASE WHEN deleted_at IS NOT NULL THEN 'deleted' WHEN version > 1 THEN 'updated' ELSE 'created' END,
       body, created_at, updated_at
FROM messages;

UPDATE chats c
JOIN (SELECT chat_id, MAX(sequence) AS last FROM message_changes GROUP BY chat_id) logged
    ON logged.chat_id = c.id
SET c.last_change_sequence = logged.last;
