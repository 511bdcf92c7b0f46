//! The embedded event queue: a SQLite file (`<data dir>/queue.db`) in place of RabbitMQ.
//!
//! Publishing inserts one row per consumer that receives the event's routing key and returns once the transaction is committed with `synchronous =
//! FULL`, so a 202 is on disk before it is sent. Concurrent publishes are committed together
//! (group commit): one writer task takes every request waiting and writes them in one
//! transaction, so a burst costs one disk flush, not one per request.
//!
//! Consuming reads the oldest rows of a queue in id order; acknowledging deletes them; a dead
//! letter moves to queue `<queue>.dead`. A consumer is woken by the publisher, and polls as a
//! fallback.
//!
//! Announcements of stored changes go through an in-process broadcast channel: the api and the
//! consumers are one process.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Delivery, EventQueue, EventSource, FollowedChats, Listener, QueueError};
use crate::changes::MessageChange;
use crate::config::{ConsumerConfig, Topology};
use crate::events::{Consumer, Event, TraceContext};
use crate::store::ChatKey;

/// Publishes waiting for the writer; beyond this, publishers wait for room (back-pressure).
const PENDING_PUBLISHES: usize = 4096;
/// Publishes committed in one transaction at most.
const GROUP_COMMIT_MAX: usize = 512;
/// A consumer looks for events this often even when nobody woke it.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Announcements a listener may fall behind by before its stream ends.
const ANNOUNCEMENTS_BUFFERED: usize = 1024;

struct QueuedRow {
    queue: String,
    body: Arc<Vec<u8>>,
    traceparent: String,
}

struct PendingPublish {
    rows: Vec<QueuedRow>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The embedded queue; clones share the file, the writer and the wake-ups.
#[derive(Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    topology: Topology,
    arrivals: Arc<HashMap<String, Notify>>,
    publishes: mpsc::Sender<PendingPublish>,
    confirm_timeout: Duration,
    announcements: broadcast::Sender<Arc<Vec<MessageChange>>>,
}

impl SqliteQueue {
    /// Opens (creating and migrating) the queue file and starts its writer task.
    pub async fn open(
        path: &Path,
        topology: &Topology,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let pool = crate::sqlite::open(path, &crate::sqlite::QUEUE_MIGRATOR, 4).await?;
        let arrivals: Arc<HashMap<String, Notify>> = Arc::new(
            Consumer::ALL
                .iter()
                .map(|consumer| (topology.queue(*consumer).to_owned(), Notify::new()))
                .collect(),
        );
        let (publishes, pending) = mpsc::channel(PENDING_PUBLISHES);
        tokio::spawn(write_publishes(
            pool.clone(),
            pending,
            Arc::clone(&arrivals),
        ));
        Ok(Self {
            pool,
            topology: topology.clone(),
            arrivals,
            publishes,
            confirm_timeout,
            announcements: broadcast::channel(ANNOUNCEMENTS_BUFFERED).0,
        })
    }
}

/// The writer task: commits every waiting publish in one transaction, then answers each.
async fn write_publishes(
    pool: SqlitePool,
    mut pending: mpsc::Receiver<PendingPublish>,
    arrivals: Arc<HashMap<String, Notify>>,
) {
    let mut group = Vec::with_capacity(GROUP_COMMIT_MAX);
    while pending.recv_many(&mut group, GROUP_COMMIT_MAX).await > 0 {
        let written = insert_rows(&pool, &group).await;
        if let Err(error) = &written {
            tracing::error!(%error, publishes = group.len(), "embedded queue write failed");
        }
        for publish in group.drain(..) {
            for row in &publish.rows {
                if written.is_ok()
                    && let Some(arrival) = arrivals.get(&row.queue)
                {
                    arrival.notify_one();
                }
            }
            let _ = publish
                .done
                .send(written.as_ref().map(|_| ()).map_err(ToString::to_string));
        }
    }
}

async fn insert_rows(pool: &SqlitePool, group: &[PendingPublish]) -> Result<(), sqlx::Error> {
    let mut transaction = crate::sqlite::begin_write(pool).await?;
    for publish in group {
        for row in &publish.rows {
            sqlx::query("INSERT INTO queued_events (queue, body, traceparent) VALUES (?, ?, ?)")
                .bind(&row.queue)
                .bind(row.body.as_slice())
                .bind(&row.traceparent)
                .execute(&mut *transaction)
                .await?;
        }
    }
    transaction.commit().await
}

#[async_trait]
impl EventQueue for SqliteQueue {
    fn kind(&self) -> &'static str {
        "sqlite-queue"
    }

    fn queue_name(&self, consumer: Consumer) -> &str {
        self.topology.queue(consumer)
    }

    fn system(&self) -> &'static str {
        "sqlite"
    }

    async fn ensure_topology(&self) -> Result<(), QueueError> {
        // The queues are rows of one table, created with the file.
        Ok(())
    }

    async fn publish(&self, event: &Event, trace: &TraceContext) -> Result<(), QueueError> {
        let routing_key = event.routing_key();
        let body = Arc::new(event.encode());
        let rows: Vec<QueuedRow> = Consumer::ALL
            .iter()
            .filter(|consumer| consumer.receives(routing_key))
            .map(|consumer| QueuedRow {
                queue: self.topology.queue(*consumer).to_owned(),
                body: Arc::clone(&body),
                traceparent: trace.as_str().to_owned(),
            })
            .collect();
        if rows.is_empty() {
            return Err(QueueError::Unroutable(routing_key));
        }
        let (done, committed) = oneshot::channel();
        let writer_stopped = || QueueError::Embedded("the queue writer stopped".to_owned());
        let confirmed = async {
            self.publishes
                .send(PendingPublish { rows, done })
                .await
                .map_err(|_| writer_stopped())?;
            committed
                .await
                .map_err(|_| writer_stopped())?
                .map_err(QueueError::Embedded)
        };
        tokio::time::timeout(self.confirm_timeout, confirmed)
            .await
            .map_err(|_| QueueError::ConfirmTimeout(self.confirm_timeout))?
    }

    async fn is_ready(&self) -> bool {
        !self.publishes.is_closed() && sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    async fn open_source(
        &self,
        consumer: Consumer,
        _settings: &ConsumerConfig,
    ) -> Result<Box<dyn EventSource>, QueueError> {
        Ok(Box::new(SqliteQueueSource {
            queue: self.clone(),
            name: self.topology.queue(consumer).to_owned(),
        }))
    }

    async fn announce(&self, changes: &[MessageChange]) -> Result<(), QueueError> {
        // Nobody listening is fine: nothing is queued for absent listeners.
        let _ = self.announcements.send(Arc::new(changes.to_vec()));
        Ok(())
    }

    async fn listen(&self) -> Result<Listener, QueueError> {
        let receiver = self.announcements.subscribe();
        let followed = Arc::new(Mutex::new(HashSet::new()));
        // A listener that fell behind ends (its streams read the storage again), like a lost
        // connection of the distributed stack.
        let announcements = futures_util::stream::unfold(
            (receiver, Arc::clone(&followed)),
            |(mut receiver, followed)| async move {
                loop {
                    let changes = receiver.recv().await.ok()?;
                    let heard: Vec<MessageChange> = {
                        let followed = followed.lock().unwrap_or_else(PoisonError::into_inner);
                        changes
                            .iter()
                            .filter(|change| {
                                followed.contains(&(change.application_id, change.chat_number))
                            })
                            .cloned()
                            .collect()
                    };
                    if !heard.is_empty() {
                        return Some((heard, (receiver, followed)));
                    }
                }
            },
        );
        Ok(Listener {
            announcements: Box::pin(announcements),
            chats: Box::new(InProcessFollowedChats(followed)),
        })
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM queued_events WHERE queue = ?")
                .bind(queue)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn replay_dead_letters(&self, consumer: Consumer) -> Result<u64, QueueError> {
        let queue = self.topology.queue(consumer);
        let moved = sqlx::query("UPDATE queued_events SET queue = ? WHERE queue = ?")
            .bind(queue)
            .bind(Topology::dead_letter_queue(queue))
            .execute(&self.pool)
            .await?
            .rows_affected();
        if let Some(arrival) = self.arrivals.get(queue) {
            arrival.notify_one();
        }
        Ok(moved)
    }
}

/// The consuming side of one queue of the embedded queue.
struct SqliteQueueSource {
    queue: SqliteQueue,
    name: String,
}

#[async_trait]
impl EventSource for SqliteQueueSource {
    async fn next_batch(
        &mut self,
        settings: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Delivery>>, QueueError> {
        loop {
            let rows: Vec<(i64, Vec<u8>, Option<String>)> = sqlx::query_as(
                "SELECT id, body, traceparent FROM queued_events WHERE queue = ? ORDER BY id LIMIT ?",
            )
            .bind(&self.name)
            .bind(settings.batch_max_size as i64)
            .fetch_all(&self.queue.pool)
            .await?;
            if !rows.is_empty() {
                return Ok(Some(
                    rows.into_iter()
                        .map(|(id, data, traceparent)| Delivery {
                            tag: id as u64,
                            data,
                            trace: traceparent.as_deref().and_then(TraceContext::parse),
                        })
                        .collect(),
                ));
            }
            let arrival = self.queue.arrivals.get(&self.name);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = async { if let Some(arrival) = arrival { arrival.notified().await } else { std::future::pending().await } } => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    async fn dead_letter(&mut self, tag: u64) -> Result<(), QueueError> {
        sqlx::query("UPDATE queued_events SET queue = ? WHERE id = ?")
            .bind(Topology::dead_letter_queue(&self.name))
            .bind(tag as i64)
            .execute(&self.queue.pool)
            .await?;
        Ok(())
    }

    async fn postpone(&mut self, _tag: u64) -> Result<(), QueueError> {
        // Not acknowledged, the row stays first in the queue for the next batch.
        Ok(())
    }

    async fn acknowledge(&mut self, batch: &[u64]) -> Result<(), QueueError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut delete = QueryBuilder::<Sqlite>::new("DELETE FROM queued_events WHERE queue = ");
        delete.push_bind(&self.name).push(" AND id IN (");
        let mut ids = delete.separated(", ");
        for tag in batch {
            ids.push_bind(*tag as i64);
        }
        delete.push(")");
        delete.build().execute(&self.queue.pool).await?;
        Ok(())
    }

    async fn close(self: Box<Self>) {
        // Unacknowledged rows simply stay in the table.
    }
}

/// The chats an in-process listener follows: its announcements are filtered by them.
struct InProcessFollowedChats(Arc<Mutex<HashSet<ChatKey>>>);

#[async_trait]
impl FollowedChats for InProcessFollowedChats {
    async fn follow(&self, chat: ChatKey) -> Result<(), QueueError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(chat);
        Ok(())
    }

    async fn unfollow(&self, chat: ChatKey) -> Result<(), QueueError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&chat);
        Ok(())
    }
}
