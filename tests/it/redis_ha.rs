//! `REDIS_URL` naming sentinels or a Redis Cluster (`scripts/services up --ha`): the api and
//! counter-sync work on either, and every operation of the Redis adapter runs on the cluster on
//! keys spread over its three masters (each script's keys in one slot). Their failovers under
//! load are scenarios of the fault suite (tests/faults/redis_ha.rs).

use std::collections::BTreeSet;
use std::time::Duration;

use chatcore::config::{RedisUrl, SecretUrl};
use chatcore::state::{Counter, RedisState, SharedState as _, connect_redis};
use system_tests::{Services, TestEnv, eventually};

const LONG: Duration = Duration::from_secs(60);

/// Numbers, an idempotent retry and counter-sync's repair of a counter behind, through `url`.
async fn api_and_counter_sync_on(url: &str) -> anyhow::Result<()> {
    let env = TestEnv::with_settings(&[("REDIS_URL", url)]).await?;
    let running = env.running_chat("redis-ha").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for expected in 1..=3 {
        assert_eq!(client.create_message(token, chat, "hello").await?, expected);
    }
    let first = client
        .create_message_carefully(token, chat, "once", "the-key")
        .await?;
    let retried = client
        .create_message_carefully(token, chat, "once", "the-key")
        .await?;
    assert_eq!((first, retried), (4, 4));
    eventually("the messages are stored", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [1, 2, 3, 4])
    })
    .await?;

    // The counter falls behind what is stored: counter-sync raises it.
    let application_id = env.application_id(token).await?;
    let key = format!("{}:numbers:messages:{application_id}:{chat}", env.id);
    let mut redis = connect_redis(env.config().require_redis_url()?).await?;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("next")
        .arg(1)
        .query_async(&mut redis)
        .await?;
    let report = counter_sync::run(&env.config()).await?;
    let described: Vec<String> = report.repairs.iter().map(ToString::to_string).collect();
    assert!(
        described
            .iter()
            .any(|repair| repair.starts_with("counter ") && repair.contains("raised to")),
        "{described:?}"
    );
    assert_eq!(client.create_message(token, chat, "next").await?, 5);
    running.stop().await
}

#[tokio::test]
async fn the_api_and_counter_sync_follow_the_sentinels() -> anyhow::Result<()> {
    api_and_counter_sync_on(&Services::from_env().redis_sentinel_url).await
}

#[tokio::test]
async fn the_api_and_counter_sync_run_on_a_redis_cluster() -> anyhow::Result<()> {
    api_and_counter_sync_on(&Services::from_env().redis_cluster_url).await
}

/// Every operation of the adapter, on keys of `prefix`.
async fn every_operation(url: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let url = RedisUrl::parse(SecretUrl::new(url)).map_err(anyhow::Error::msg)?;
    let state = RedisState::new(connect_redis(&url).await?);
    state.ping().await?;
    let keys: Vec<String> = (0..12)
        .map(|scope| format!("{prefix}:numbers:chats:{scope}"))
        .collect();
    for key in &keys {
        assert_eq!(state.increment(key).await?, None, "{key}: no counter yet");
        let seeded = Counter {
            next: 10,
            ceiling: 20,
            epoch: 1,
        };
        assert!(state.seed(key, seeded).await?);
        assert!(
            !state.seed(key, seeded).await?,
            "{key}: the same epoch again"
        );
        let incremented = state.increment(key).await?;
        assert_eq!(incremented.map(|counter| counter.next), Some(11));
        state.raise_ceiling(key, 30, 1).await?;
        state.raise_ceiling(key, 99, 0).await?;
        assert_eq!(
            state.counter(key).await?.map(|counter| counter.ceiling),
            Some(30)
        );
    }
    let targets: Vec<(String, u64)> = keys.iter().map(|key| (key.clone(), 50)).collect();
    assert!(
        state
            .raise_next(&targets)
            .await?
            .iter()
            .all(|raised| *raised)
    );
    assert!(
        state
            .raise_next(&targets)
            .await?
            .iter()
            .all(|raised| !raised)
    );
    for key in &keys {
        assert_eq!(
            state.counter(key).await?.map(|counter| counter.next),
            Some(50)
        );
    }
    let window = format!("{prefix}:rate");
    assert_eq!(state.count_in_window(&window, LONG).await?, 1);
    assert_eq!(state.count_in_window(&window, LONG).await?, 2);
    let record = format!("{prefix}:idempotency:chats:1:key");
    assert!(state.set_if_absent(&record, "claimed", LONG).await?);
    assert!(!state.set_if_absent(&record, "again", LONG).await?);
    state.set(&record, "done", LONG).await?;
    assert_eq!(state.get(&record).await?.as_deref(), Some("done"));
    state.delete(&record).await?;
    assert_eq!(state.get(&record).await?, None);
    Ok(keys)
}

#[tokio::test]
async fn every_operation_runs_on_a_redis_cluster_across_its_masters() -> anyhow::Result<()> {
    let url = Services::from_env().redis_cluster_url;
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let keys = every_operation(&url, &prefix).await?;
    // The keys lie on every master (redis-cli gives each a third of the 16384 slots).
    let mut redis =
        connect_redis(&RedisUrl::parse(SecretUrl::new(url)).map_err(anyhow::Error::msg)?).await?;
    let mut thirds = BTreeSet::new();
    for key in &keys {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut redis)
            .await?;
        thirds.insert(slot / 5462);
    }
    assert_eq!(thirds.len(), 3, "the keys lie on every master");
    Ok(())
}

#[tokio::test]
async fn every_operation_runs_behind_the_sentinels() -> anyhow::Result<()> {
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    every_operation(&Services::from_env().redis_sentinel_url, &prefix).await?;
    Ok(())
}
