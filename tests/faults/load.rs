//! The load of a scenario: careful clients that post messages into one chat and, every few
//! messages, edit one of their messages, delete another, and create a chat (with a first message
//! of its own), each request retried until it is acknowledged; and the ledger of what each client
//! was told, against which the audit reads the services back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use system_tests::{Client, Reply, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::stack::Apis;

/// Concurrent careful clients; each posts about 40 messages a second.
pub(crate) const CLIENTS: usize = 8;
const PAUSE_BETWEEN_POSTS: Duration = Duration::from_millis(25);
/// How long one request is retried before the load gives up on it (and the scenario fails).
const PATIENCE: Duration = Duration::from_secs(120);

/// In every `EDIT_EVERY` messages a client edits its message before the last one (often not
/// written yet: `409 not_persisted_yet`, retried).
const EDIT_EVERY: usize = 4;
/// In every `DELETE_EVERY` messages it deletes its message `DELETE_BACK` back (one it edited).
const DELETE_EVERY: usize = 8;
const DELETE_BACK: usize = 6;
/// In every `CHAT_EVERY` messages it creates a chat and posts a first message into it.
const CHAT_EVERY: usize = 32;

/// A message as its client knows it.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) chat: u64,
    pub(crate) number: u64,
    /// What the client posted: also its `Idempotency-Key`, and one word (found by a search).
    pub(crate) first_body: String,
    /// The last body acknowledged (`202` of the post, `200` of a `PUT`).
    pub(crate) body: String,
    pub(crate) edited: bool,
    /// The `DELETE` was acknowledged (`204`, or `404` after an attempt whose answer was lost).
    pub(crate) deleted: bool,
}

/// What the clients were told: every acknowledged message, chat, edit and deletion.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) messages: Vec<Sent>,
    /// Chats accepted during the load: their number and the title they were created with.
    pub(crate) chats: Vec<(u64, String)>,
    pub(crate) edits: usize,
    pub(crate) deletes: usize,
    /// Deletions the client saw only as a `404` after a `503` or a dropped answer: stored, but
    /// their event may never have reached the index (README, "Messages": counter-sync repairs
    /// them, a repeated `DELETE` does not).
    pub(crate) unconfirmed_deletes: usize,
}

/// Careful clients at work until stopped.
pub(crate) struct Load {
    stop: CancellationToken,
    clients: Vec<tokio::task::JoinHandle<anyhow::Result<Ledger>>>,
    work: Arc<Work>,
}

/// What the clients share.
struct Work {
    apis: Arc<Apis>,
    token: String,
    chat: u64,
    round: usize,
    /// Whether the clients also edit, delete and create chats, or only post.
    mixed: bool,
    /// The highest message number of `chat` a client was given so far.
    highest: AtomicU64,
    /// 5xx answers the clients retried.
    server_errors: AtomicU64,
}

impl Load {
    /// Starts the clients on `chat`; `round` tells the keys of a load apart from an earlier one's.
    pub(crate) fn start(apis: Arc<Apis>, token: &str, chat: u64, round: usize) -> Self {
        Self::with_work(apis, token, chat, round, CLIENTS, true)
    }

    /// `clients` that only post messages into `chat` (no edits, deletions or chats), each about
    /// 40 a second.
    pub(crate) fn posting_only(apis: Arc<Apis>, token: &str, chat: u64, clients: usize) -> Self {
        Self::with_work(apis, token, chat, 0, clients, false)
    }

    fn with_work(
        apis: Arc<Apis>,
        token: &str,
        chat: u64,
        round: usize,
        clients: usize,
        mixed: bool,
    ) -> Self {
        let work = Arc::new(Work {
            apis,
            token: token.to_owned(),
            chat,
            round,
            mixed,
            highest: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let clients = (0..clients)
            .map(|client| tokio::spawn(Arc::clone(&work).client(client, stop.clone())))
            .collect();
        Self {
            stop,
            clients,
            work,
        }
    }

    /// The highest message number of the load's chat handed out so far.
    pub(crate) fn highest_number(&self) -> u64 {
        self.work.highest.load(Ordering::Relaxed)
    }

    /// Stops the clients (each finishes what it has at hand): the ledger of all of them and the
    /// 5xx answers met on the way.
    pub(crate) async fn stop(self) -> anyhow::Result<(Ledger, u64)> {
        self.stop.cancel();
        let mut ledger = Ledger::default();
        for client in self.clients {
            let own = client.await??;
            ledger.messages.extend(own.messages);
            ledger.chats.extend(own.chats);
            ledger.edits += own.edits;
            ledger.deletes += own.deletes;
            ledger.unconfirmed_deletes += own.unconfirmed_deletes;
        }
        Ok((ledger, self.work.server_errors.load(Ordering::Relaxed)))
    }
}

impl Work {
    async fn client(
        self: Arc<Self>,
        client: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<Ledger> {
        let mut ledger = Ledger::default();
        // Indexes into `ledger.messages` of this client's messages of the load's chat, in order.
        let mut in_chat: Vec<usize> = Vec::new();
        let mut sequence = 0;
        while !stop.is_cancelled() {
            let body = format!("r{}c{client}s{sequence}", self.round);
            let number = self.post_message(self.chat, &body, false).await?;
            self.highest.fetch_max(number, Ordering::Relaxed);
            in_chat.push(ledger.messages.len());
            ledger
                .messages
                .push(Sent::new(self.chat, number, body.clone()));
            sequence += 1;
            if !self.mixed {
                tokio::time::sleep(PAUSE_BETWEEN_POSTS).await;
                continue;
            }
            if sequence % EDIT_EVERY == 0 {
                let message = &mut ledger.messages[in_chat[sequence - 2]];
                message.body = format!("{}e{sequence}", message.first_body);
                self.edit(message).await?;
                message.edited = true;
                ledger.edits += 1;
            }
            if sequence % DELETE_EVERY == 0 {
                let message = &mut ledger.messages[in_chat[sequence - DELETE_BACK]];
                let confirmed = self.delete(message).await?;
                message.deleted = true;
                ledger.deletes += 1;
                ledger.unconfirmed_deletes += usize::from(!confirmed);
            }
            if sequence % CHAT_EVERY == CHAT_EVERY / 2 {
                let title = format!("{body}chat");
                let chat = self.create_chat(&title).await?;
                ledger.chats.push((chat, title));
                let first = format!("{body}first");
                let number = self.post_message(chat, &first, true).await?;
                ledger.messages.push(Sent::new(chat, number, first));
            }
            tokio::time::sleep(PAUSE_BETWEEN_POSTS).await;
        }
        Ok(ledger)
    }

    fn messages_path(&self, chat: u64) -> String {
        format!("/applications/{}/chats/{chat}/messages", self.token)
    }

    /// Posts `body` (its own `Idempotency-Key`) until it is accepted; its number. Into a chat
    /// accepted a moment ago a `404` is retried too: when Redis loses its data it forgets the
    /// chat until the ingest-worker has written it (README, "Numbering").
    async fn post_message(&self, chat: u64, body: &str, new_chat: bool) -> anyhow::Result<u64> {
        let path = self.messages_path(chat);
        self.until_acknowledged(
            body,
            |client| {
                client
                    .request(reqwest::Method::POST, &path)
                    .header("idempotency-key", body)
                    .json(&serde_json::json!({ "body": body }))
            },
            |reply, _| {
                if new_chat && reply.status == StatusCode::NOT_FOUND {
                    return Some(None);
                }
                number_of(reply).map(Some)
            },
        )
        .await
    }

    async fn create_chat(&self, title: &str) -> anyhow::Result<u64> {
        let path = format!("/applications/{}/chats", self.token);
        self.until_acknowledged(
            title,
            |client| {
                client
                    .request(reqwest::Method::POST, &path)
                    .header("idempotency-key", title)
                    .json(&serde_json::json!({ "title": title }))
            },
            |reply, _| number_of(reply).map(Some),
        )
        .await
    }

    /// `PUT` of the message's new body until `200`.
    async fn edit(&self, message: &Sent) -> anyhow::Result<()> {
        let path = format!("{}/{}", self.messages_path(message.chat), message.number);
        let what = format!("the edit of {}", message.first_body);
        self.until_acknowledged(
            &what,
            |client| {
                client
                    .request(reqwest::Method::PUT, &path)
                    .json(&serde_json::json!({ "body": message.body }))
            },
            |reply, _| (reply.status == StatusCode::OK).then_some(Some(())),
        )
        .await
    }

    /// `DELETE` until `204` (true), or `404` after an attempt whose answer was lost (false: it
    /// did delete, but may not have published the deletion).
    async fn delete(&self, message: &Sent) -> anyhow::Result<bool> {
        let path = format!("{}/{}", self.messages_path(message.chat), message.number);
        let what = format!("the deletion of {}", message.first_body);
        self.until_acknowledged(
            &what,
            |client| client.request(reqwest::Method::DELETE, &path),
            |reply, ambiguous| match reply.status {
                StatusCode::NO_CONTENT => Some(Some(true)),
                StatusCode::NOT_FOUND if ambiguous => Some(Some(false)),
                _ => None,
            },
        )
        .await
    }

    /// Sends the request (to the next api replica each time) until `acknowledged` takes the
    /// answer: `Some(Some(value))` ends, `Some(None)` tries again. A 5xx, a 409 (a twin in
    /// progress, a message not written yet) and a dropped connection are tried again; any other
    /// answer fails the load. `acknowledged` is told whether an earlier attempt may have done the
    /// work without the client hearing of it.
    async fn until_acknowledged<T>(
        &self,
        what: &str,
        request: impl Fn(&Client) -> reqwest::RequestBuilder,
        acknowledged: impl Fn(&Reply, bool) -> Option<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut ambiguous = false;
        loop {
            match self.apis.send(&request).await {
                Ok(reply) => match acknowledged(&reply, ambiguous) {
                    Some(Some(value)) => return Ok(value),
                    Some(None) => {}
                    None if reply.status.is_server_error() => {
                        self.server_errors.fetch_add(1, Ordering::Relaxed);
                        ambiguous = true;
                    }
                    None if reply.status == StatusCode::CONFLICT => {}
                    None => anyhow::bail!("{what}: {reply:?}"),
                },
                // The api is down or restarting.
                Err(_) => ambiguous = true,
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{what} was never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Sent {
    fn new(chat: u64, number: u64, body: String) -> Self {
        Self {
            chat,
            number,
            first_body: body.clone(),
            body,
            edited: false,
            deleted: false,
        }
    }
}

/// The number of a `202`.
fn number_of(reply: &Reply) -> Option<u64> {
    (reply.status == StatusCode::ACCEPTED)
        .then(|| reply.body["number"].as_u64())
        .flatten()
}
