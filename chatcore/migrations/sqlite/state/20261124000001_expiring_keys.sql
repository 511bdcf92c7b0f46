-- What Redis keeps with a TTL in the distributed stack: idempotency keys, accepted chats.
CREATE TABLE expiring_keys (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX expiring_keys_expiry ON expiring_keys (expires_at_ms);
