//! Opening the SQLite files of the embedded adapters: WAL (readers never wait for the writer),
//! `synchronous = FULL` (a commit is on disk before it returns: an accepted write survives a power
//! cut, not only a killed process), a busy timeout instead of immediate SQLITE_BUSY errors, and the
//! file's migrations applied.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub static DATA_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite/data");
pub static QUEUE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite/queue");
pub static STATE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite/state");
pub static SEARCH_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite/search");

/// Creates the file (and its directory) when missing and applies its migrations.
pub async fn open(
    path: &Path,
    migrator: &Migrator,
    max_connections: u32,
) -> anyhow::Result<SqlitePool> {
    if let Some(directory) = path.parent() {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("creating the data directory {}", directory.display()))?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    migrator
        .run(&pool)
        .await
        .with_context(|| format!("migrating {}", path.display()))?;
    Ok(pool)
}

/// Starts a write transaction that takes the write lock at once. A deferred transaction that
/// reads first cannot wait for the lock when it later writes (SQLITE_BUSY_SNAPSHOT); this one
/// waits its turn in the busy timeout instead.
pub async fn begin_write(
    pool: &SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}
