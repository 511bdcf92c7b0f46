//! Raw limits of the capacity plan (README "Scaling"): what one chat's counter and one queue take
//! when driven straight, the ceilings sharding past them starts from.

use anyhow::ensure;
use chatcore::Config;
use chatcore::state::{Counter, RedisState, SharedState as _};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};

use super::accept::{PUBLISHERS, RAW_PHASE, REDIS_CLIENTS};
use super::{ChatRef, amqp_connect, declare_durable, envelope_of};
use crate::load::{self, Load, Outcome};

/// The numbering script (`{next, ceil, epoch}` incremented under the server check, what every
/// `POST` runs) on one counter from concurrent clients: the rate one chat's numbers can be handed
/// out at, whatever the number of api replicas or Redis shards (a chat's counter is one key).
pub async fn numbering_increments(config: &Config) -> anyhow::Result<Outcome> {
    let state = RedisState::new(chatcore::state::connect_redis(config.require_redis_url()?).await?);
    let key = format!("{}:bench:numbers", config.redis_key_prefix);
    let counter = Counter {
        next: 0,
        ceiling: u64::from(u32::MAX),
        epoch: 1,
    };
    state.delete(&key).await?;
    ensure!(
        state.seed(&key, counter).await?,
        "the bench's counter was not installed"
    );
    let (client, client_key) = (state.clone(), key.clone());
    let outcome = load::run(Load::timed(REDIS_CLIENTS, RAW_PHASE), move |_| {
        let (state, key) = (client.clone(), client_key.clone());
        async move {
            ensure!(
                state.increment(&key).await?.is_some(),
                "the counter vanished"
            );
            Ok(())
        }
    })
    .await;
    state.delete(&key).await?;
    outcome
}

/// Envelopes of `events_per_message` created events (the api's framing and properties, the size
/// its envelopes had in this run), each published and confirmed on its own into one durable queue
/// from concurrent publishers: one queue's ceiling in the api's own messages.
pub async fn confirmed_envelopes(
    config: &Config,
    chat: ChatRef,
    events_per_message: usize,
) -> anyhow::Result<Outcome> {
    let sequences: Vec<u64> = (0..events_per_message as u64).collect();
    let (payload, properties) = envelope_of(chat, &sequences)?;
    let connection = amqp_connect(config).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("{}.bench-raw-envelopes", config.topology.ingest_queue);
    declare_durable(&channel, &queue).await?;
    let (publisher, target) = (channel.clone(), queue.clone());
    let outcome = load::run(Load::timed(PUBLISHERS, RAW_PHASE), move |_| {
        let (channel, queue) = (publisher.clone(), target.clone());
        let (payload, properties) = (payload.clone(), properties.clone());
        async move {
            let confirmation = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await?
                .await?;
            ensure!(confirmation.is_ack(), "an envelope was not confirmed");
            Ok(())
        }
    })
    .await;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    outcome
}
