-- The embedded twin of migrations/mysql: same tables, SQLite types. Timestamps are RFC 3339 text.
CREATE TABLE applications (
    id INTEGER PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    chats_count INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE chats (
    id INTEGER PRIMARY KEY,
    application_id INTEGER NOT NULL REFERENCES applications (id),
    number INTEGER NOT NULL,
    messages_count INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (application_id, number)
);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats (id),
    number INTEGER NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (chat_id, number)
);

-- Durable upper bound of the numbers the in-process counters may hand out per scope.
CREATE TABLE number_reservations (
    scope TEXT PRIMARY KEY,
    reserved_until INTEGER NOT NULL,
    epoch INTEGER NOT NULL
) WITHOUT ROWID;
