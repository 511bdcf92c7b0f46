//! Live streams of a chat's messages (Server-Sent Events): every message created, updated or
//! deleted once it is stored, with `id:` = the change's sequence in the chat's change log.
//!
//! Each replica listens to the announcements of stored changes ([`chatcore::changes`], through the
//! queue: RabbitMQ in the distributed stack, an in-process channel embedded) and hands each to the
//! streams of its chat through a bounded broadcast channel per chat. A stream that resumes
//! (`Last-Event-ID: <sequence>`) subscribes first, then reads the changes after that sequence from
//! the change log, then goes live; one without `Last-Event-ID` reads the chat's latest sequence
//! once subscribed and sends every change after it; `Last-Event-ID: 0` reads the chat's messages as they are now
//! (the latest change of each), in sequence order, first. Live, a change is sent when it is the
//! next sequence; one further ahead (another change was announced later than it was stored)
//! sends the stream back to the log for what lies between: no gap, no duplicate.
//!
//! Bounded: streams per replica, per application and per client address (429 beyond), a reader
//! that falls behind by more than the buffer is disconnected (it resumes with `Last-Event-ID`), a
//! stream ends after its maximum lifetime (its client resumes the same way) and at shutdown, and
//! while the replica cannot hear the announcements it serves no stream (503): one that was open
//! when the listener was lost ends, so its client resumes from the storage.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use chatcore::changes::{ChangeKind, MessageChange};
use chatcore::config::StreamLimits;
use chatcore::domain::Number;
use chatcore::metrics::{Metrics, StreamEndLabels};
use chatcore::queue::{EventQueue, FollowedChats, Listener};
use chatcore::retry::{self, Backoff};
use chatcore::store::{ChangeSelection, ChatKey};
use futures_util::{Stream, StreamExt as _};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::app::ChatService;
use crate::http::error::ApiError;

/// Rows read from the storage per query while a resumed stream catches up.
const CATCH_UP_PAGE: u32 = 100;
/// How long opening a stream waits for the replica to hear the announcements.
const LISTENER_WAIT: Duration = Duration::from_secs(3);

/// The streams of this replica and the announcements feeding them.
pub struct LiveHub {
    chats: Mutex<HashMap<ChatKey, broadcast::Sender<Arc<MessageChange>>>>,
    /// The chats the current listener follows (None while not listening): the listener hears the
    /// changes of the chats streamed here only. Held across a follow or unfollow, so that one
    /// chat's first stream and its last stream's end take turns.
    followed: tokio::sync::Mutex<Option<Box<dyn FollowedChats>>>,
    open: Mutex<OpenStreams>,
    /// Whether the announcements are heard now.
    listening: watch::Sender<bool>,
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct OpenStreams {
    total: usize,
    per_application: HashMap<u64, usize>,
    per_address: HashMap<IpAddr, usize>,
}

/// One less stream in `counts` under `key`; the entry goes with its last stream.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

impl LiveHub {
    /// Starts listening to the announcements on `queue` (again after each loss, with backoff)
    /// until `shutdown`.
    pub fn start(
        queue: Arc<dyn EventQueue>,
        limits: StreamLimits,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let hub = Arc::new(Self {
            chats: Mutex::default(),
            followed: tokio::sync::Mutex::default(),
            open: Mutex::default(),
            listening: watch::channel(false).0,
            limits,
            metrics,
            shutdown,
        });
        // With streaming turned off the replica does not listen at all.
        if limits.per_replica > 0 {
            tokio::spawn(Arc::clone(&hub).listen(queue));
        }
        hub
    }

    async fn listen(self: Arc<Self>, queue: Arc<dyn EventQueue>) {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut attempt = 0;
        loop {
            let listened = tokio::select! {
                () = self.shutdown.cancelled() => return,
                listened = queue.listen() => listened,
            };
            match listened {
                Ok(Listener {
                    mut announcements,
                    chats,
                }) => {
                    attempt = 0;
                    *self.followed.lock().await = Some(chats);
                    self.listening.send_replace(true);
                    tracing::info!("listening to stored changes for live streams");
                    loop {
                        let changes = tokio::select! {
                            () = self.shutdown.cancelled() => return,
                            changes = announcements.next() => changes,
                        };
                        let Some(changes) = changes else { break };
                        self.dispatch(changes);
                    }
                    tracing::warn!("lost the stored changes; live streams end and resume");
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen to stored changes, retrying");
                }
            }
            self.listening.send_replace(false);
            // The lost listener's chats went with it.
            *self.followed.lock().await = None;
            // Dropping the senders ends every open stream: they may have missed changes.
            self.lock_chats().clear();
            attempt += 1;
            if retry::sleep_or_cancel(backoff.delay(attempt), &self.shutdown).await {
                return;
            }
        }
    }

    fn dispatch(&self, changes: Vec<MessageChange>) {
        self.metrics
            .live_changes_received
            .inc_by(changes.len() as u64);
        let mut chats = self.lock_chats();
        for change in changes {
            let key = (change.application_id, change.chat_number);
            if let Some(sender) = chats.get(&key)
                && sender.send(Arc::new(change)).is_err()
            {
                chats.remove(&key);
            }
        }
    }

    fn lock_chats(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ChatKey, broadcast::Sender<Arc<MessageChange>>>> {
        self.chats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a stream of one chat for a client (its address keyed as the rate limits key it), if
    /// the limits allow it and the replica hears the announcements (waiting a moment for them
    /// after a start or a reconnect).
    pub async fn open(
        self: &Arc<Self>,
        chat: ChatKey,
        client: IpAddr,
    ) -> Result<Subscription, ApiError> {
        if self.limits.per_replica == 0 {
            return Err(ApiError::TooManyStreams("on this replica"));
        }
        let mut listening = self.listening.subscribe();
        let heard = matches!(
            tokio::time::timeout(LISTENER_WAIT, listening.wait_for(|heard| *heard)).await,
            Ok(Ok(_))
        );
        if !heard {
            return Err(ApiError::Unavailable(
                "not listening to stored changes".into(),
            ));
        }
        {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            if open.total >= self.limits.per_replica {
                return Err(ApiError::TooManyStreams("on this replica"));
            }
            if open.per_address.get(&client).copied().unwrap_or(0) >= self.limits.per_address {
                return Err(ApiError::TooManyStreams("for this client address"));
            }
            if open.per_application.get(&chat.0).copied().unwrap_or(0)
                >= self.limits.per_application
            {
                return Err(ApiError::TooManyStreams("for this application"));
            }
            *open.per_address.entry(client).or_default() += 1;
            *open.per_application.entry(chat.0).or_default() += 1;
            open.total += 1;
        }
        self.metrics.live_streams.inc();
        let slot = Slot {
            hub: Arc::clone(self),
            chat,
            client,
        };
        let changes = self.subscribe(chat).await?;
        Ok(Subscription { changes, slot })
    }

    /// A receiver of the chat's changes; the first stream of a chat has the listener follow it
    /// first.
    async fn subscribe(
        &self,
        chat: ChatKey,
    ) -> Result<broadcast::Receiver<Arc<MessageChange>>, ApiError> {
        let followed = self.followed.lock().await;
        if let Some(sender) = self.lock_chats().get(&chat) {
            return Ok(sender.subscribe());
        }
        let Some(chats) = followed.as_ref() else {
            return Err(ApiError::Unavailable(
                "not listening to stored changes".into(),
            ));
        };
        chats.follow(chat).await.map_err(|error| {
            tracing::warn!(%error, "cannot follow a chat's stored changes");
            ApiError::Unavailable("cannot follow the chat's stored changes".into())
        })?;
        let (sender, receiver) = broadcast::channel(self.limits.buffered_changes);
        self.lock_chats().insert(chat, sender);
        Ok(receiver)
    }

    /// Has the listener stop following a chat whose last stream ended, unless one opened since.
    async fn unfollow_if_unwatched(&self, chat: ChatKey) {
        let followed = self.followed.lock().await;
        if self.lock_chats().contains_key(&chat) {
            return;
        }
        if let Some(chats) = followed.as_ref()
            && let Err(error) = chats.unfollow(chat).await
        {
            tracing::warn!(%error, "cannot unfollow a chat's stored changes");
        }
    }

    /// Serves one stream: from the storage after `last_event_id` when the client resumes, then
    /// live, until the client leaves, falls behind, the replica loses the announcements or shuts
    /// down.
    pub fn serve(
        &self,
        subscription: Subscription,
        service: Arc<ChatService>,
        last_event_id: Option<u64>,
    ) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>> {
        let stream = ChatStream {
            changes: subscription.changes,
            catch_up: Some(match last_event_id {
                None => CatchUp::FromNow,
                Some(0) => CatchUp::StateNow,
                Some(after) => CatchUp::Log {
                    selection: ChangeSelection::Every,
                    after,
                },
            }),
            last_sent: last_event_id,
            pending: VecDeque::new(),
            service,
            shutdown: self.shutdown.clone(),
            ends_at: tokio::time::Instant::now() + self.limits.max_lifetime,
            slot: subscription.slot,
            ended: "client",
        };
        let events = futures_util::stream::unfold(stream, |mut stream| async move {
            let event = stream.next_event().await?;
            Some((Ok(event), stream))
        });
        Sse::new(events).keep_alive(KeepAlive::new().interval(self.limits.heartbeat))
    }
}

/// A stream's place in the hub: given back when the stream is dropped.
struct Slot {
    hub: Arc<LiveHub>,
    chat: ChatKey,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let hub = &self.hub;
        {
            let mut open = hub.open.lock().unwrap_or_else(PoisonError::into_inner);
            open.total -= 1;
            release(&mut open.per_application, &self.chat.0);
            release(&mut open.per_address, &self.client);
        }
        hub.metrics.live_streams.dec();
        // The stream's receiver is gone by now (it is dropped first): a chat nobody watches any
        // more needs no channel, and the listener need not follow it.
        let unwatched = {
            let mut chats = hub.lock_chats();
            let unwatched = chats
                .get(&self.chat)
                .is_some_and(|sender| sender.receiver_count() == 0);
            if unwatched {
                chats.remove(&self.chat);
            }
            unwatched
        };
        if unwatched && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (hub, chat) = (Arc::clone(hub), self.chat);
            runtime.spawn(async move { hub.unfollow_if_unwatched(chat).await });
        }
    }
}

/// An opened stream, before it is served.
pub struct Subscription {
    changes: broadcast::Receiver<Arc<MessageChange>>,
    slot: Slot,
}

/// What a stream reads from the change log before it goes live.
#[derive(Debug, Clone, Copy)]
enum CatchUp {
    /// Nothing of the past (no `Last-Event-ID`): the chat's latest sequence is read once the
    /// stream is subscribed, and every change after it is sent, whenever it was announced.
    FromNow,
    /// The chat as it is now (`Last-Event-ID: 0`): its latest sequence is read first.
    StateNow,
    /// The page of `selection` after the sequence `after`.
    Log {
        selection: ChangeSelection,
        after: u64,
    },
}

/// The state of one stream. Fields drop in order: the receiver before the slot.
struct ChatStream {
    changes: broadcast::Receiver<Arc<MessageChange>>,
    /// While catching up from the change log: where the next page starts.
    catch_up: Option<CatchUp>,
    /// The sequence of the last change sent (or the one the stream started after); None until
    /// the catch-up has set it.
    last_sent: Option<u64>,
    pending: VecDeque<SseEvent>,
    service: Arc<ChatService>,
    shutdown: CancellationToken,
    /// The end of the stream's lifetime.
    ends_at: tokio::time::Instant,
    /// Why the stream ended, for the metric (counted when it is dropped).
    ended: &'static str,
    slot: Slot,
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        self.slot
            .hub
            .metrics
            .live_streams_ended
            .get_or_create(&StreamEndLabels { reason: self.ended })
            .inc();
    }
}

impl ChatStream {
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if let Some(catch_up) = self.catch_up {
                if let Err(reason) = self.catch_up(catch_up).await {
                    self.ended = reason;
                    return None;
                }
                continue;
            }
            let received = tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.ended = "shutdown";
                    return None;
                }
                () = tokio::time::sleep_until(self.ends_at) => {
                    self.ended = "lifetime";
                    return None;
                }
                received = self.changes.recv() => received,
            };
            match received {
                Ok(change) => match self.last_sent {
                    Some(last) if change.sequence <= last => {}
                    Some(last) if change.sequence > last + 1 => {
                        // Announced before one stored earlier: the log has both, in order.
                        self.catch_up = Some(CatchUp::Log {
                            selection: ChangeSelection::Every,
                            after: last,
                        });
                    }
                    _ => return Some(self.event_of(&change)),
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.ended = "slow_reader";
                    return None;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.ended = "feed_lost";
                    return None;
                }
            }
        }
    }

    /// Reads the next page of the change log into `pending`.
    async fn catch_up(&mut self, catch_up: CatchUp) -> Result<(), &'static str> {
        let (application_id, chat_number) = self.slot.chat;
        let (selection, after) = match catch_up {
            CatchUp::FromNow => {
                self.last_sent = Some(self.latest_sequence().await?);
                self.catch_up = None;
                return Ok(());
            }
            CatchUp::StateNow => (ChangeSelection::StateAt(self.latest_sequence().await?), 0),
            CatchUp::Log { selection, after } => (selection, after),
        };
        let rows = tokio::select! {
            () = self.shutdown.cancelled() => return Err("shutdown"),
            rows = self.service.changes_to_catch_up(
                application_id,
                chat_number,
                selection,
                after,
                CATCH_UP_PAGE + 1,
            ) => rows,
        };
        let mut rows = rows.map_err(|_| "storage_error")?;
        let more = rows.len() > CATCH_UP_PAGE as usize;
        rows.truncate(CATCH_UP_PAGE as usize);
        self.catch_up = rows.last().filter(|_| more).map(|last| CatchUp::Log {
            selection,
            after: last.sequence,
        });
        for row in rows {
            let Some(number) = Number::new(row.message.number) else {
                continue;
            };
            let mut change = MessageChange::logged(application_id, chat_number, number, &row);
            if let ChangeSelection::StateAt(_) = selection {
                // The chat as it is: each message once, as the creation of what it holds now.
                change.kind = ChangeKind::Created;
            }
            let event = self.event_of(&change);
            self.pending.push_back(event);
        }
        if let (None, ChangeSelection::StateAt(as_of)) = (self.catch_up, selection) {
            // The state at `as_of` is sent: what follows is every change after it.
            self.last_sent = Some(as_of);
        }
        Ok(())
    }

    /// The chat's latest change sequence, as stored.
    async fn latest_sequence(&self) -> Result<u64, &'static str> {
        let (application_id, chat_number) = self.slot.chat;
        let latest = tokio::select! {
            () = self.shutdown.cancelled() => return Err("shutdown"),
            latest = self.service.last_change_sequence(application_id, chat_number) => latest,
        };
        latest.map_err(|_| "storage_error")
    }

    /// The event of a change; it is the last one sent from now on.
    fn event_of(&mut self, change: &MessageChange) -> SseEvent {
        self.last_sent = Some(change.sequence);
        SseEvent::default()
            .id(change.sequence.to_string())
            .event(change.kind.as_str())
            .json_data(StreamedMessage::from(change))
            .expect("a message serializes")
    }
}

/// The `data:` of a stream event (JSON).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamedMessage {
    number: u64,
    /// Empty for a deleted message.
    body: String,
    /// 1 when created, one more with each update and the deletion.
    version: u64,
    #[serde(serialize_with = "chatcore::domain::serialize_timestamp")]
    created_at: chrono::DateTime<chrono::Utc>,
    /// When it was last updated, or deleted.
    #[serde(serialize_with = "chatcore::domain::serialize_timestamp")]
    updated_at: chrono::DateTime<chrono::Utc>,
    #[serde(flatten)]
    details: chatcore::feed::MessageDetails,
}

impl From<&MessageChange> for StreamedMessage {
    fn from(change: &MessageChange) -> Self {
        Self {
            number: change.number.get(),
            body: change.body.clone(),
            version: change.version,
            created_at: change.created_at,
            updated_at: change.updated_at,
            details: chatcore::feed::MessageDetails {
                sender: change.sender.clone(),
                metadata: change.metadata.clone(),
                edited_at: change.edited_at,
            },
        }
    }
}
