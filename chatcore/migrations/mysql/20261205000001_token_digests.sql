-- Application tokens are kept as SHA-256 digests, never in plaintext (a dump exposes no tenant's
-- key), in a table of their own: an application has more than one during a rotation's overlap.
CREATE TABLE application_tokens (
    digest BINARY(32) NOT NULL PRIMARY KEY,
    application_id BIGINT UNSIGNED NOT NULL,
    created_at DATETIME(3) NOT NULL,
    -- NULL: valid until the application's next rotation or revocation.
    expires_at DATETIME(3) NULL,
    KEY application_tokens_application (application_id),
    CONSTRAINT application_tokens_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB;

-- The prefix and last 4 characters of the newest token: what the admin listing shows.
ALTER TABLE applications ADD COLUMN token_hint VARCHAR(16) CHARACTER SET ascii NOT NULL DEFAULT '' AFTER id;

INSERT INTO application_tokens (digest, application_id, created_at)
SELECT UNHEX(SHA2(token, 256)), id, created_at FROM applications;

UPDATE applications SET token_hint = CONCAT('...', RIGHT(token, 4));

-- Rebuilt (not an instant drop): the old rows, tokens and all, leave the table's pages.
ALTER TABLE applications DROP INDEX applications_token, DROP COLUMN token, ALGORITHM = COPY;
