-- The embedded queue: one row per event and consumer queue (the RabbitMQ bindings), deleted
-- when the consumer acknowledges it. Dead letters move to queue '<queue>.dead'.
CREATE TABLE queued_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    traceparent TEXT
);
CREATE INDEX queued_events_queue ON queued_events (queue, id);
