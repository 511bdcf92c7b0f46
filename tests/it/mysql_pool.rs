//! The MySQL pool hands out connections without pinging them first (a round trip saved on every
//! query): a connection that broke while idle in the pool fails the one query that gets it, as a
//! transient error (a 503 the client retries, a batch the worker retries), and is dropped, so the
//! next query runs on a new connection.

use std::time::Duration;

use chatcore::retry::Transient as _;
use chatcore::store::StorageError;
use system_tests::{TestEnv, eventually};

#[tokio::test]
async fn a_connection_broken_while_idle_fails_one_query_and_is_replaced() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let config = env.config();
    let url = config.require_database_url()?;
    let pool = chatcore::store::mysql::connect(url, 1).await?;
    let broken: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&pool)
        .await?;
    // Killed by the server while idle in the pool, as a restart or a dropped link would.
    let other = chatcore::store::mysql::connect(url, 1).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("KILL {broken}")))
        .execute(&other)
        .await?;

    let first = sqlx::query_scalar::<_, u64>("SELECT CONNECTION_ID()")
        .fetch_one(&pool)
        .await;
    match first {
        Ok(id) => assert_ne!(id, broken, "a killed connection answered"),
        Err(error) => {
            let error = StorageError::from(error);
            assert!(error.is_transient(), "not transient: {error}");
        }
    }
    eventually(
        "a query runs on a new connection",
        Duration::from_secs(30),
        || async {
            let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                .fetch_one(&pool)
                .await?;
            Ok(id != broken)
        },
    )
    .await?;
    pool.close().await;
    other.close().await;
    Ok(())
}
