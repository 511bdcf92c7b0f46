-- The embedded twin of migrations/mysql/20261208000001_webhooks.sql.
CREATE TABLE webhook_endpoints (
    id INTEGER NOT NULL PRIMARY KEY,
    application_id INTEGER NOT NULL REFERENCES applications (id),
    url TEXT NOT NULL,
    description TEXT NOT NULL,
    event_types TEXT NOT NULL,
    secret TEXT NOT NULL,
    previous_secret TEXT NULL,
    previous_secret_until TEXT NULL,
    delivered_through INTEGER NOT NULL,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    failing_since TEXT NULL,
    next_attempt_at TEXT NOT NULL,
    disabled_at TEXT NULL,
    disabled_reason TEXT NULL,
    lease_owner TEXT NULL,
    lease_until TEXT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX webhook_endpoints_application ON webhook_endpoints (application_id);
CREATE INDEX webhook_endpoints_due ON webhook_endpoints (disabled_at, next_attempt_at);

CREATE TABLE webhook_attempts (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    endpoint_id INTEGER NOT NULL,
    webhook_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    feed_position INTEGER NOT NULL,
    attempted_at TEXT NOT NULL,
    status_code INTEGER NULL,
    error TEXT NULL,
    response TEXT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);
CREATE INDEX webhook_attempts_age ON webhook_attempts (attempted_at);
