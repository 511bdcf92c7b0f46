-- Application tokens are kept as SHA-256 digests, never in plaintext, in a table of their own (an
-- application has more than one during a rotation's overlap). The tokens of an older database are
-- digested, and their column dropped, when the file is opened (SqliteStorage::open).
CREATE TABLE application_tokens (
    digest BLOB NOT NULL PRIMARY KEY,
    application_id INTEGER NOT NULL REFERENCES applications (id),
    created_at TEXT NOT NULL,
    -- NULL: valid until the application's next rotation or revocation.
    expires_at TEXT
) WITHOUT ROWID;

CREATE INDEX application_tokens_application ON application_tokens (application_id);

-- The prefix and last 4 characters of the newest token: what the admin listing shows.
ALTER TABLE applications ADD COLUMN token_hint TEXT NOT NULL DEFAULT '';
