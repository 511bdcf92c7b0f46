-- Applications, chats and messages. Internal ids never leave the service; chats and messages are
-- addressed by their number within their parent, which the unique keys make collision-proof.
CREATE TABLE applications (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    token CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name VARCHAR(255) NOT NULL,
    chats_count BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at DATETIME(3) NOT NULL,
    updated_at DATETIME(3) NOT NULL,
    UNIQUE KEY applications_token (token)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE chats (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    application_id BIGINT UNSIGNED NOT NULL,
    number BIGINT UNSIGNED NOT NULL,
    messages_count BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at DATETIME(3) NOT NULL,
    updated_at DATETIME(3) NOT NULL,
    UNIQUE KEY chats_application_number (application_id, number),
    CONSTRAINT chats_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- body is MEDIUMTEXT because a body may be 65,536 bytes, one more than TEXT holds.
-- version orders writes of one message in the search index (1 when created, +1 per update).
CREATE TABLE messages (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    chat_id BIGINT UNSIGNED NOT NULL,
    number BIGINT UNSIGNED NOT NULL,
    body MEDIUMTEXT NOT NULL,
    version BIGINT UNSIGNED NOT NULL DEFAULT 1,
    created_at DATETIME(3) NOT NULL,
    updated_at DATETIME(3) NOT NULL,
    UNIQUE KEY messages_chat_number (chat_id, number),
    CONSTRAINT messages_chat FOREIGN KEY (chat_id) REFERENCES chats (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- Durable upper bound of the numbers Redis may hand out per scope (see chatcore::numbering).
CREATE TABLE number_reservations (
    scope VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    reserved_until BIGINT UNSIGNED NOT NULL,
    epoch BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB;
