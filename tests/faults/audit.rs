//! The audit of a scenario: what the services hold after the drain, read back from MySQL, the
//! search index, the API, the webhook receiver and the dead-letter queues, against the ledger of
//! what the clients were told; and the report line.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Context as _;
use chatcore::config::Topology;
use chatcore::events::Consumer;
use futures_util::StreamExt as _;
use serde_json::Value;
use sqlx::Row as _;
use system_tests::webhook_receiver::WebhookReceiver;
use system_tests::{StatusCode, TestEnv};

use crate::load::{Ledger, Sent};
use crate::stack::Apis;

/// A message as a reader finds it: its body, or gone (deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Body(String),
    Deleted,
}

impl Found {
    /// What the client was last told the message is.
    fn expected(sent: &Sent) -> Self {
        if sent.deleted {
            Self::Deleted
        } else {
            Self::Body(sent.body.clone())
        }
    }
}

type Key = (u64, u64);

/// One reading of everything the scenario's application holds.
struct Reading {
    /// MySQL: every message row by (chat, number).
    stored: BTreeMap<Key, Found>,
    /// MySQL: every chat's title.
    chats: BTreeMap<u64, Option<String>>,
    /// Elasticsearch: every document (a deleted message is an empty tombstone).
    indexed: BTreeMap<Key, Found>,
    webhooks: WebhookCheck,
}

impl Reading {
    async fn take(env: &TestEnv, token: &str, receiver: &WebhookReceiver) -> anyhow::Result<Self> {
        let application_id = env.application_id(token).await?;
        Ok(Self {
            stored: stored_messages(env, application_id).await?,
            chats: stored_chats(env, application_id).await?,
            indexed: indexed_messages(env, application_id).await?,
            webhooks: WebhookCheck::of(receiver, crate::WEBHOOKS).await?,
        })
    }
}

/// The outcome of a scenario: one line of the report.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) strikes: usize,
    /// Message numbers handed to clients (a number given twice counts twice).
    pub(crate) accepted: usize,
    pub(crate) stored: usize,
    pub(crate) indexed: usize,
    /// Accepted messages whose `message.created` webhook arrived.
    pub(crate) hooked: usize,
    /// Accepted messages that MySQL, the index, the webhooks (and, edited or deleted, the API)
    /// all show as their client last had it acknowledged.
    pub(crate) bodies_ok: usize,
    pub(crate) chats: usize,
    pub(crate) chats_ok: usize,
    pub(crate) edits: usize,
    pub(crate) deletes: usize,
    /// Deletions acknowledged only by a `404` after a lost answer (that retry republished them).
    pub(crate) unconfirmed_deletes: usize,
    /// Numbers (of messages or chats) given to two clients.
    pub(crate) duplicates: usize,
    /// Accepted, but not stored or not indexed.
    pub(crate) lost: usize,
    /// Stored messages and chats no client was given.
    pub(crate) extra: usize,
    pub(crate) extra_bound: usize,
    pub(crate) dead_lettered: usize,
    pub(crate) server_errors: u64,
    pub(crate) redelivered: usize,
    /// From the stack's start to the end of the audit (CI's time goes mostly to this suite).
    pub(crate) took: std::time::Duration,
    /// What broke a promise, one line each.
    pub(crate) problems: Vec<String>,
}

impl Outcome {
    /// Compares a reading with the ledger. `main_chat` was created before the load (no client
    /// was given it).
    fn of(ledger: &Ledger, main_chat: u64, reading: &Reading) -> Self {
        let mut outcome = Self {
            accepted: ledger.messages.len(),
            stored: reading.stored.len(),
            indexed: reading.indexed.len(),
            chats: ledger.chats.len(),
            edits: ledger.edits,
            deletes: ledger.deletes,
            unconfirmed_deletes: ledger.unconfirmed_deletes,
            redelivered: reading.webhooks.redelivered,
            problems: reading.webhooks.problems.clone(),
            ..Self::default()
        };
        let mut given: HashMap<Key, &Sent> = HashMap::new();
        for sent in &ledger.messages {
            if given.insert((sent.chat, sent.number), sent).is_some() {
                outcome.duplicates += 1;
                outcome.problems.push(format!(
                    "message {}:{} was given to two clients",
                    sent.chat, sent.number
                ));
            }
        }
        let given_chats: BTreeMap<u64, &str> = ledger
            .chats
            .iter()
            .map(|(number, title)| (*number, title.as_str()))
            .collect();
        outcome.duplicates += ledger.chats.len() - given_chats.len();
        for (&key, sent) in &given {
            let expected = Found::expected(sent);
            let stored = reading.stored.get(&key);
            let indexed = reading.indexed.get(&key);
            if stored.is_none() || indexed.is_none() {
                outcome.lost += 1;
            }
            let hooked = reading.webhooks.last.get(&key);
            if hooked.is_some() {
                outcome.hooked += 1;
            }
            if stored == Some(&expected) && indexed == Some(&expected) && hooked == Some(&expected)
            {
                outcome.bodies_ok += 1;
            } else {
                outcome.problems.push(format!(
                    "message {}:{} ({}) should be {expected:?}: stored {stored:?}, indexed \
                     {indexed:?}, last webhook {hooked:?}",
                    key.0, key.1, sent.first_body
                ));
            }
        }
        // The index holds what MySQL holds, nothing else.
        let keys: BTreeSet<&Key> = reading
            .stored
            .keys()
            .chain(reading.indexed.keys())
            .collect();
        for key in keys {
            let (stored, indexed) = (reading.stored.get(key), reading.indexed.get(key));
            if stored != indexed {
                outcome.problems.push(format!(
                    "message {}:{} is {stored:?} in MySQL, {indexed:?} in the index",
                    key.0, key.1
                ));
            }
        }
        // A stored message no client was given can only be the first attempt of a retried
        // post whose idempotency record Redis lost: the same body under an earlier number.
        let first_bodies: BTreeSet<&str> = given
            .values()
            .map(|sent| sent.first_body.as_str())
            .collect();
        for (key, found) in &reading.stored {
            if given.contains_key(key) {
                continue;
            }
            outcome.extra += 1;
            let copy = matches!(found, Found::Body(body) if first_bodies.contains(body.as_str()));
            if !copy {
                outcome.problems.push(format!(
                    "message {}:{} is {found:?}, which no client sent",
                    key.0, key.1
                ));
            }
        }
        for (number, title) in &reading.chats {
            match given_chats.get(number) {
                Some(given) if title.as_deref() == Some(*given) => outcome.chats_ok += 1,
                Some(given) => outcome
                    .problems
                    .push(format!("chat {number} should be {given}: stored {title:?}")),
                None if *number == main_chat => {}
                None => outcome.extra += 1,
            }
        }
        outcome
    }

    /// Everything accepted is where it belongs, with its last acknowledged body.
    fn settled(&self) -> bool {
        self.lost == 0
            && self.bodies_ok + self.duplicates == self.accepted
            && self.chats_ok == self.chats
            && self.problems.is_empty()
    }

    pub(crate) fn report(&self, name: &str) -> String {
        format!(
            "fault {name:<34} strikes {}  accepted {:>5}  stored {:>5}  indexed {:>5}  hooked {:>5}  \
             bodies ok {:>5}  chats {:>3}  edits {:>4}  deletes {:>4} ({} unconfirmed)  duplicates {}  lost {}  \
             extra {} (at most {})  dead-lettered {}  5xx {}  redelivered {}  took {} s",
            self.strikes,
            self.accepted,
            self.stored,
            self.indexed,
            self.hooked,
            self.bodies_ok,
            self.chats,
            self.edits,
            self.deletes,
            self.unconfirmed_deletes,
            self.duplicates,
            self.lost,
            self.extra,
            self.extra_bound,
            self.dead_lettered,
            self.server_errors,
            self.redelivered,
            self.took.as_secs(),
        )
    }

    /// Fails the scenario on any broken promise.
    pub(crate) fn assert_kept(&self, name: &str) -> anyhow::Result<()> {
        for problem in self.problems.iter().take(20) {
            println!("fault {name}: {problem}");
        }
        anyhow::ensure!(
            self.duplicates == 0,
            "{name}: a number was handed out twice"
        );
        anyhow::ensure!(
            self.lost == 0,
            "{name}: {} accepted messages lost",
            self.lost
        );
        anyhow::ensure!(
            self.extra <= self.extra_bound,
            "{name}: {} messages or chats stored that no client was answered for, at most {} \
             expected",
            self.extra,
            self.extra_bound
        );
        anyhow::ensure!(
            self.dead_lettered == 0,
            "{name}: {} events dead-lettered",
            self.dead_lettered
        );
        anyhow::ensure!(
            self.settled(),
            "{name}: {} problems, the first: {:?}",
            self.problems.len(),
            self.problems.first()
        );
        Ok(())
    }
}

/// Waits (up to `patience`) until the services show everything the ledger holds, then audits
/// them: MySQL, the index, the webhooks, the API's reads and searches of every edited or deleted
/// message, and the dead-letter queues.
pub(crate) async fn audit(
    env: &TestEnv,
    apis: &Apis,
    receiver: &WebhookReceiver,
    token: &str,
    main_chat: u64,
    ledger: &Ledger,
    patience: std::time::Duration,
) -> anyhow::Result<Outcome> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut outcome = loop {
        let outcome = match Reading::take(env, token, receiver).await {
            Ok(reading) => Outcome::of(ledger, main_chat, &reading),
            Err(error) if tokio::time::Instant::now() < deadline => {
                println!("reading the services failed (trying again): {error:#}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        if outcome.settled() || tokio::time::Instant::now() >= deadline {
            break outcome;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    outcome
        .problems
        .extend(read_back_through_the_api(apis, token, ledger).await?);
    let dead_letters = dead_letters(env).await?;
    outcome.dead_lettered = dead_letters.len();
    outcome.problems.extend(dead_letters);
    Ok(outcome)
}

/// Every edited or deleted message through the API: a `GET` shows the last acknowledged body
/// (a deleted one is `404`), and a search for that body finds it (a deleted one: not).
async fn read_back_through_the_api(
    apis: &Apis,
    token: &str,
    ledger: &Ledger,
) -> anyhow::Result<Vec<String>> {
    let changed = ledger
        .messages
        .iter()
        .filter(|sent| sent.edited || sent.deleted);
    let findings: Vec<anyhow::Result<Option<String>>> = futures_util::stream::iter(changed)
        .map(|sent| async move {
            let path = format!(
                "/applications/{token}/chats/{}/messages/{}",
                sent.chat, sent.number
            );
            let read = apis
                .read(|client| client.request(reqwest::Method::GET, &path))
                .await?;
            let read_ok = if sent.deleted {
                read.status == StatusCode::NOT_FOUND
            } else {
                read.status == StatusCode::OK && read.body["body"] == sent.body.as_str()
            };
            let search = format!("/applications/{token}/chats/{}/messages/search", sent.chat);
            let hits = apis
                .read(|client| {
                    client
                        .request(reqwest::Method::GET, &search)
                        .query(&[("query", sent.body.as_str())])
                })
                .await?;
            anyhow::ensure!(hits.status == StatusCode::OK, "search: {hits:?}");
            let found = hits.body["messages"]
                .as_array()
                .context("hits")?
                .iter()
                .any(|hit| hit["number"].as_u64() == Some(sent.number));
            Ok((!read_ok || found == sent.deleted).then(|| {
                format!(
                    "the API shows {} ({sent:?}) as {} and its search {}",
                    sent.first_body,
                    read.status,
                    if found { "finds it" } else { "does not" }
                )
            }))
        })
        .buffer_unordered(8)
        .collect()
        .await;
    findings.into_iter().filter_map(Result::transpose).collect()
}

/// Every message row of the application.
async fn stored_messages(
    env: &TestEnv,
    application_id: u64,
) -> anyhow::Result<BTreeMap<Key, Found>> {
    let rows = sqlx::query(
        "SELECT c.number, m.number, m.body, CAST(m.deleted_at IS NOT NULL AS SIGNED) \
         FROM messages m JOIN chats c ON c.id = m.chat_id WHERE c.application_id = ?",
    )
    .bind(application_id)
    .fetch_all(env.mysql())
    .await?;
    rows.iter()
        .map(|row| {
            let found = if row.try_get::<i64, _>(3)? == 1 {
                Found::Deleted
            } else {
                Found::Body(row.try_get(2)?)
            };
            Ok(((row.try_get(0)?, row.try_get(1)?), found))
        })
        .collect()
}

async fn stored_chats(
    env: &TestEnv,
    application_id: u64,
) -> anyhow::Result<BTreeMap<u64, Option<String>>> {
    let rows = sqlx::query("SELECT number, title FROM chats WHERE application_id = ?")
        .bind(application_id)
        .fetch_all(env.mysql())
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Every document of the application in the index (after a refresh), in pages after the last
/// one seen.
async fn indexed_messages(
    env: &TestEnv,
    application_id: u64,
) -> anyhow::Result<BTreeMap<Key, Found>> {
    let http = reqwest::Client::new();
    let index = format!("{}/{}-messages", env.settings["ELASTICSEARCH_URL"], env.id);
    http.post(format!("{index}/_refresh"))
        .send()
        .await?
        .error_for_status()?;
    let mut documents = BTreeMap::new();
    let mut after: Option<Value> = None;
    loop {
        let mut query = serde_json::json!({
            "size": 10_000,
            "_source": ["chat_number", "number", "body"],
            "query": {"term": {"application_id": application_id}},
            "sort": [{"chat_number": "asc"}, {"number": "asc"}],
        });
        if let Some(after) = after.take() {
            query["search_after"] = after;
        }
        let response: Value = http
            .post(format!("{index}/_search"))
            .json(&query)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let hits = response["hits"]["hits"].as_array().context("hits")?;
        let Some(last) = hits.last() else {
            return Ok(documents);
        };
        after = Some(last["sort"].clone());
        for hit in hits {
            let source = &hit["_source"];
            let key = (
                source["chat_number"].as_u64().context("chat_number")?,
                source["number"].as_u64().context("number")?,
            );
            // A deleted message stays as a document with an empty body (its version guards it).
            let found = match source["body"].as_str().context("body")? {
                "" => Found::Deleted,
                body => Found::Body(body.to_owned()),
            };
            documents.insert(key, found);
        }
    }
}

/// The events in the dead-letter queues of the ingest-worker and the indexer, one line each
/// (read without taking them: they go back to their queue).
async fn dead_letters(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    let config = env.config();
    let mut found = Vec::new();
    for consumer in [Consumer::Ingest, Consumer::Index] {
        let queue = Topology::dead_letter_queue(config.topology.queue(consumer));
        if env.queue_depth(&queue).await? == 0 {
            continue;
        }
        let connection = env.amqp_connection().await?;
        let channel = connection.create_channel().await?;
        while let Some(message) = channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await?
        {
            let body = String::from_utf8_lossy(&message.delivery.data);
            found.push(format!("dead-lettered in {queue}: {body:.300}"));
        }
        // Closing without acknowledging puts them back.
        connection.close(200, "read".into()).await?;
    }
    Ok(found)
}

/// What the webhook receiver got for the scenario's endpoint, and which promises the deliveries
/// broke.
struct WebhookCheck {
    /// The last change delivered of each message (in the order of its chat's sequence).
    last: BTreeMap<Key, Found>,
    /// Deliveries of a change delivered before.
    redelivered: usize,
    problems: Vec<String>,
}

impl WebhookCheck {
    /// Reads the deliveries in arrival order: each must verify, carry the next change sequence of
    /// its chat or repeat an earlier one (a redelivery) with that one's `webhook-id`.
    async fn of(receiver: &WebhookReceiver, name: &str) -> anyhow::Result<Self> {
        let mut check = Self {
            last: BTreeMap::new(),
            redelivered: 0,
            problems: Vec::new(),
        };
        let mut ids: HashMap<(u64, u64), String> = HashMap::new();
        let mut highest: HashMap<u64, u64> = HashMap::new();
        for delivery in receiver.deliveries(Some(name)).await? {
            if delivery.answered.is_none_or(|status| status >= 300) {
                continue;
            }
            let data = &delivery.body["data"];
            let chat = data["chat_number"].as_u64().unwrap_or_default();
            let sequence = data["sequence"].as_u64().unwrap_or_default();
            if !delivery.verified {
                check
                    .problems
                    .push(format!("{} did not verify", delivery.webhook_id));
            }
            let first_id = ids
                .entry((chat, sequence))
                .or_insert_with(|| delivery.webhook_id.clone());
            if *first_id != delivery.webhook_id {
                check
                    .problems
                    .push(format!("chat {chat} sequence {sequence} came with two ids"));
            }
            let highest = highest.entry(chat).or_default();
            if sequence <= *highest {
                check.redelivered += 1;
                continue;
            }
            if sequence != *highest + 1 {
                check.problems.push(format!(
                    "chat {chat} sequence {sequence} came after {highest}"
                ));
            }
            *highest = sequence;
            let message = &data["message"];
            let found = match data["type"].as_str() {
                Some("message.deleted") => Found::Deleted,
                _ => Found::Body(message["body"].as_str().unwrap_or_default().to_owned()),
            };
            if let Some(number) = message["number"].as_u64() {
                check.last.insert((chat, number), found);
            }
        }
        Ok(check)
    }
}
