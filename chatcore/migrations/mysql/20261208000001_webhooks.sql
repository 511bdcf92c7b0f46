-- Webhook endpoints and the record of their delivery attempts. An endpoint follows its
-- application's feed (message_changes by application_sequence): `delivered_through` is the last
-- feed position it answered 2xx for (or skipped: an event type it did not subscribe to), so a
-- delivery is due until then and a replay only moves it back. The lease lets several dispatchers
-- share the endpoints, one each at a time (per-endpoint order).
CREATE TABLE webhook_endpoints (
    id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    application_id BIGINT UNSIGNED NOT NULL,
    url VARCHAR(2048) NOT NULL,
    description VARCHAR(255) NOT NULL,
    event_types VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    secret VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    previous_secret VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    previous_secret_until DATETIME(3) NULL,
    delivered_through BIGINT UNSIGNED NOT NULL,
    failed_attempts INT UNSIGNED NOT NULL DEFAULT 0,
    failing_since DATETIME(3) NULL,
    next_attempt_at DATETIME(3) NOT NULL,
    disabled_at DATETIME(3) NULL,
    disabled_reason VARCHAR(255) NULL,
    lease_owner VARCHAR(64) NULL,
    lease_until DATETIME(3) NULL,
    created_at DATETIME(3) NOT NULL,
    updated_at DATETIME(3) NOT NULL,
    KEY webhook_endpoints_application (application_id),
    KEY webhook_endpoints_due (disabled_at, next_attempt_at),
    CONSTRAINT webhook_endpoints_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE webhook_attempts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    endpoint_id BIGINT UNSIGNED NOT NULL,
    webhook_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_type VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    feed_position BIGINT UNSIGNED NOT NULL,
    attempted_at DATETIME(3) NOT NULL,
    status_code SMALLINT UNSIGNED NULL,
    error VARCHAR(512) NULL,
    response VARCHAR(1024) NULL,
    duration_ms INT UNSIGNED NOT NULL,
    KEY webhook_attempts_endpoint (endpoint_id, id),
    KEY webhook_attempts_age (attempted_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
