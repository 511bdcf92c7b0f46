//! The embedded adapters on real SQLite files: numbering across a restart, the queue's delivery,
//! acknowledgement and dead letters, and expiring keys.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chatcore::config::{ConsumerConfig, Topology};
use chatcore::domain::{ApplicationToken, Number};
use chatcore::events::{Consumer, Event, EventPayload, TraceContext};
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::queue::{EventQueue as _, SqliteQueue};
use chatcore::retry::Backoff;
use chatcore::state::{InProcessState, SharedState as _};
use chatcore::store::{SqliteStorage, Storage as _};
use tokio_util::sync::CancellationToken;

/// A data directory of its own, removed at the end.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!("chatcore-{}", uuid::Uuid::new_v4().simple())))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn allocator(data_dir: &DataDir, block_size: u64) -> anyhow::Result<NumberAllocator> {
    let storage = SqliteStorage::open(&data_dir.0.join("chat.db")).await?;
    let state = InProcessState::open(&data_dir.0.join("state.db")).await?;
    Ok(NumberAllocator::new(
        Arc::new(state),
        Arc::new(storage),
        "test",
        block_size,
    ))
}

#[tokio::test]
async fn numbers_are_unique_and_continue_above_everything_after_a_restart() -> anyhow::Result<()> {
    let data_dir = DataDir::new();
    let scope = Scope::ChatsOf { application_id: 7 };
    let first_run = allocator(&data_dir, 10).await?;
    let numbers = futures_util::future::join_all((0..25).map(|_| first_run.allocate(&scope))).await;
    let numbers: BTreeSet<u64> = numbers
        .into_iter()
        .map(|number| number.map(Number::get))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        numbers,
        (1..=25).collect(),
        "concurrent allocations are 1..25"
    );
    drop(first_run);

    // A restart: the counters in memory are gone, the reservations on disk are not.
    let second_run = allocator(&data_dir, 10).await?;
    let after_restart = second_run.allocate(&scope).await?.get();
    assert!(after_restart > 25, "{after_restart} reuses a number");
    assert!(second_run.handed_out_up_to(&scope).await? >= after_restart);
    let other_scope = Scope::ChatsOf { application_id: 8 };
    assert_eq!(second_run.allocate(&other_scope).await?.get(), 1);
    Ok(())
}

/// Replicas (allocators of their own over one counter store and one database) meeting a fresh
/// scope at once seed it once: no replica's counter replaces another's whose first numbers were
/// handed out already, which skipped a whole block.
#[tokio::test]
async fn replicas_seeding_one_scope_at_once_skip_no_block() -> anyhow::Result<()> {
    let data_dir = DataDir::new();
    let storage = Arc::new(SqliteStorage::open(&data_dir.0.join("chat.db")).await?);
    let state = Arc::new(InProcessState::open(&data_dir.0.join("state.db")).await?);
    let replicas: Vec<NumberAllocator> = (0..4)
        .map(|_| NumberAllocator::new(state.clone(), storage.clone(), "test", 1000))
        .collect();
    let scope = Scope::ChatsOf { application_id: 9 };
    let numbers = futures_util::future::join_all(
        (0..40).map(|i| replicas[i % replicas.len()].allocate(&scope)),
    )
    .await;
    let numbers: BTreeSet<u64> = numbers
        .into_iter()
        .map(|number| number.map(Number::get))
        .collect::<Result<_, _>>()?;
    assert_eq!(numbers, (1..=40).collect(), "four replicas share 1..40");
    Ok(())
}

/// A database of before token digests (tokens in plaintext) opened by this version: each token
/// still opens its application, and no token is left in the file.
#[tokio::test]
async fn plaintext_tokens_of_an_older_database_become_digests() -> anyhow::Result<()> {
    let data_dir = DataDir::new();
    let path = data_dir.0.join("chat.db");
    let before_digests =
        chatcore::store::migrations_before(&chatcore::sqlite::DATA_MIGRATOR, 20261205000000);
    let legacy = "L".repeat(32);
    {
        let pool = chatcore::sqlite::open(&path, &before_digests, 1).await?;
        sqlx::query(
            "INSERT INTO applications (id, token, name, chats_count, created_at, updated_at) \
             VALUES (5, ?, 'old', 0, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
        )
        .bind(&legacy)
        .execute(&pool)
        .await?;
        sqlx::query(
            "INSERT INTO chats (application_id, number, messages_count, created_at, updated_at) \
             VALUES (5, 1, 0, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
        )
        .execute(&pool)
        .await?;
        pool.close().await;
    }
    let storage = SqliteStorage::open(&path).await?;
    let token = ApplicationToken::parse(&legacy)?;
    let grant = storage.resolve_token(&token.digest()).await?;
    assert_eq!(grant.map(|grant| grant.application_id), Some(5));
    let application = storage.find_application(5).await?.expect("kept");
    assert_eq!(application.token_hint, "...LLLL");
    assert!(
        storage
            .find_chat(5, Number::new(1).expect("positive"))
            .await?
            .is_some()
    );
    drop(storage);
    let file = std::fs::read(&path)?;
    let wal = std::fs::read(data_dir.0.join("chat.db-wal")).unwrap_or_default();
    for bytes in [file, wal] {
        assert!(
            !bytes
                .windows(legacy.len())
                .any(|window| window == legacy.as_bytes()),
            "the plaintext token is gone from the file"
        );
    }
    Ok(())
}

fn message_event(number: u64) -> Event {
    Event::new(EventPayload::MessageCreated {
        application_id: 1,
        chat_number: Number::new(1).expect("positive"),
        message_number: Number::new(number).expect("positive"),
        body: format!("message {number}"),
        created_at: chatcore::store::now(),
        sender: None,
        metadata: None,
    })
}

#[tokio::test]
async fn the_queue_delivers_to_every_bound_queue_until_acknowledged() -> anyhow::Result<()> {
    let data_dir = DataDir::new();
    let topology = Topology::from_prefix("t");
    let queue = SqliteQueue::open(
        &data_dir.0.join("queue.db"),
        &topology,
        Duration::from_secs(5),
    )
    .await?;
    let trace = TraceContext::child_of(None);
    for number in 1..=3 {
        queue.publish(&message_event(number), &trace).await?;
    }
    // A message goes to both consumers.
    assert_eq!(queue.depth(&topology.ingest_queue).await?, 3);
    assert_eq!(queue.depth(&topology.index_queue).await?, 3);

    let settings = ConsumerConfig {
        prefetch: 10,
        batch_max_size: 10,
        batch_max_wait: Duration::from_millis(10),
        retry: Backoff::new(Duration::from_millis(10), Duration::from_millis(10)),
    };
    let shutdown = CancellationToken::new();
    let mut source = queue.open_source(Consumer::Ingest, &settings).await?;
    let batch = source
        .next_batch(&settings, &shutdown)
        .await?
        .expect("a batch");
    assert_eq!(batch.len(), 3);
    assert!(batch.iter().all(|delivery| delivery.trace.is_some()));
    let decoded = Event::decode(&batch[0].data)?;
    assert!(matches!(
        decoded.payload,
        EventPayload::MessageCreated { .. }
    ));

    // Not acknowledged: delivered again.
    let again = source
        .next_batch(&settings, &shutdown)
        .await?
        .expect("a batch");
    assert_eq!(again.len(), 3);
    source.dead_letter(batch[0].tag).await?;
    let tags: Vec<u64> = batch.iter().map(|delivery| delivery.tag).collect();
    source.acknowledge(&tags).await?;
    assert_eq!(queue.depth(&topology.ingest_queue).await?, 0);
    assert_eq!(
        queue
            .depth(&Topology::dead_letter_queue(&topology.ingest_queue))
            .await?,
        1
    );
    assert_eq!(queue.depth(&topology.index_queue).await?, 3, "untouched");

    assert_eq!(queue.replay_dead_letters(Consumer::Ingest).await?, 1);
    assert_eq!(queue.depth(&topology.ingest_queue).await?, 1);

    // An empty queue waits, and returns nothing on shutdown.
    let replayed = source
        .next_batch(&settings, &shutdown)
        .await?
        .expect("a batch");
    source.acknowledge(&[replayed[0].tag]).await?;
    shutdown.cancel();
    assert!(source.next_batch(&settings, &shutdown).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn keys_are_set_once_until_they_expire() -> anyhow::Result<()> {
    let data_dir = DataDir::new();
    let state = InProcessState::open(&data_dir.0.join("state.db")).await?;
    let long = Duration::from_secs(60);
    assert!(state.set_if_absent("k", "first", long).await?);
    assert!(!state.set_if_absent("k", "second", long).await?);
    assert_eq!(state.get("k").await?.as_deref(), Some("first"));
    state.set("k", "done", long).await?;
    assert_eq!(state.get("k").await?.as_deref(), Some("done"));
    state.delete("k").await?;
    assert_eq!(state.get("k").await?, None);

    assert!(
        state
            .set_if_absent("short", "v", Duration::from_millis(1))
            .await?
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(state.get("short").await?, None, "expired");
    assert!(
        state.set_if_absent("short", "again", long).await?,
        "an expired key is absent"
    );
    assert_eq!(state.purge_expired_keys().await?, 0);
    Ok(())
}
