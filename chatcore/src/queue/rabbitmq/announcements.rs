//! Announcements of stored changes: published to a topic exchange (not durable) under the routing
//! key of their chat (`<application id>.<chat number>`); each listening api replica consumes from a
//! queue of its own (server-named, exclusive, bounded, deleted with its connection) bound to the
//! keys of the chats it streams, so a replica receives no change of a chat nobody streams from it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use futures_util::future::try_join_all;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

use super::publisher::{Outcome, Publication};
use super::topology::declare_topology;
use super::{RabbitMqQueue, TRANSIENT};
use crate::changes::{self, MessageChange};
use crate::queue::{FollowedChats, Listener, QueueError};
use crate::store::ChatKey;

/// Announcements a listener's queue holds at most; beyond it the oldest are dropped (a replica
/// that stopped reading must not grow the broker's memory).
const ANNOUNCEMENTS_QUEUED: u32 = 10_000;

/// The routing key of a chat's announcements.
fn routing_key((application_id, chat_number): ChatKey) -> String {
    format!("{application_id}.{chat_number}")
}

impl RabbitMqQueue {
    /// Publishes the changes of each chat under the chat's routing key, all at once.
    pub(super) async fn announce_by_chat(
        &self,
        changes: &[MessageChange],
    ) -> Result<(), QueueError> {
        let mut by_chat: BTreeMap<ChatKey, Vec<MessageChange>> = BTreeMap::new();
        for change in changes {
            by_chat
                .entry((change.application_id, change.chat_number))
                .or_default()
                .push(change.clone());
        }
        let linked = self.channel(None).await?;
        let publications = by_chat.into_iter().map(|(chat, changes)| {
            let publication = Publication {
                exchange: self.topology.changes_exchange.clone(),
                routing_key: routing_key(chat),
                payload: changes::encode(&changes),
                properties: BasicProperties::default()
                    .with_delivery_mode(TRANSIENT)
                    .with_content_type(ShortString::from("application/json")),
                mandatory: false,
                event_trace: None,
            };
            let linked = &linked;
            async move {
                match self.publish_through(linked, publication).await? {
                    Outcome::Stored | Outcome::Returned => Ok(()),
                    Outcome::Refused => Err(QueueError::Nacked),
                }
            }
        });
        try_join_all(publications).await?;
        Ok(())
    }

    /// A queue of this replica's own, bound to no chat yet, and its consumer.
    pub(super) async fn listen_by_chat(&self) -> Result<Listener, QueueError> {
        let connection = self
            .connect(&format!("{} listener", self.topology.changes_exchange))
            .await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel, &self.topology).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongUInt(ANNOUNCEMENTS_QUEUED),
        );
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        let deliveries = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let chats = BoundChats {
            channel,
            queue: queue.name().clone(),
            exchange: self.topology.changes_exchange.as_str().into(),
        };
        // The connection lives as long as the stream; the stream ends with the connection.
        let announcements = futures_util::stream::unfold(
            (connection, deliveries),
            |(connection, mut deliveries)| async move {
                loop {
                    let delivery = deliveries.next().await?.ok()?;
                    match changes::decode(&delivery.data) {
                        Ok(changes) => return Some((changes, (connection, deliveries))),
                        Err(error) => {
                            tracing::warn!(%error, "skipping an announcement that is not valid")
                        }
                    }
                }
            },
        );
        Ok(Listener {
            announcements: Box::pin(announcements),
            chats: Box::new(chats),
        })
    }
}

/// The chats a listener's queue is bound to.
struct BoundChats {
    channel: Channel,
    queue: ShortString,
    exchange: ShortString,
}

#[async_trait]
impl FollowedChats for BoundChats {
    async fn follow(&self, chat: ChatKey) -> Result<(), QueueError> {
        self.channel
            .queue_bind(
                self.queue.clone(),
                self.exchange.clone(),
                routing_key(chat).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn unfollow(&self, chat: ChatKey) -> Result<(), QueueError> {
        self.channel
            .queue_unbind(
                self.queue.clone(),
                self.exchange.clone(),
                routing_key(chat).into(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}
