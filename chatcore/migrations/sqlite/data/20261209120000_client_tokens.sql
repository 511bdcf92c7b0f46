-- Client tokens: the id of each application's signing key. The key is HMAC-SHA256 of the operator's
-- secret and this id, so only the id is stored (a copy of the file cannot sign a token). NULL until
-- the application mints its first client token, then replaced by revoke-all and cleared at deletion.
ALTER TABLE applications ADD COLUMN client_token_key_id TEXT;
ALTER TABLE applications ADD COLUMN client_token_key_rotated_at TEXT;

CREATE INDEX applications_client_token_key_rotated_at ON applications (client_token_key_rotated_at);

-- The secret the keys derive from while the operator sets none (CHAT_CLIENT_TOKEN_SECRET).
CREATE TABLE client_token_secret (
    id INTEGER PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
