//! The publishing side of one RabbitMQ channel in publisher-confirm mode: every publish of the
//! process goes through one task, and every confirm is settled by one other task, both in the
//! order the broker numbers them. Two reasons, both found under concurrent load:
//!
//! - lapin numbers a publish for its confirm (the delivery tag) and queues its frames in two
//!   steps; publishes started at once on two runtime threads can be numbered in one order and
//!   sent in the other, each then answered by the other's confirm.
//! - lapin hands a returned (unroutable, `mandatory`) message to whichever pending confirm it
//!   completes next, and completes the confirms of a multiple-ack in no particular order: the
//!   "returned" can reach another publish's confirm. So a publish's own confirm does not say
//!   whether *it* was returned; the settling task collects every returned message (by message
//!   id) before it answers a publish, which it can because the broker always sends a message's
//!   return before its ack.
//!
//! A request waits for its own [`Outcome`] only. Events published at the same time (what the
//! publisher task finds waiting when it is free) with the same exchange and routing key go out as
//! one message (an [`envelope`](super::envelope), up to the size of the largest single event), so
//! one stored message and one confirm answer all of them.

use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};

use super::envelope;

/// Publishes waiting for the publisher task; callers wait (back-pressure) beyond it.
const PUBLICATIONS_QUEUED: usize = 4096;
/// Publishes started together before their frames are awaited.
const STARTED_TOGETHER: usize = 256;
/// Scheduler turns the publisher task waits for more publishes before it sends what it has.
const LINGER_TURNS: usize = 4;

/// How the broker answered one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Confirmed: routed to every queue bound to its key and, if persistent, on disk there.
    Stored,
    /// A `mandatory` publish that no queue is bound for (confirmed, but stored nowhere).
    Returned,
    /// Refused by the broker (nack).
    Refused,
}

/// One publish handed to the publisher task.
pub struct Publication {
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub properties: BasicProperties,
    pub mandatory: bool,
    /// For an event: its trace context. Events may share one message (their trace contexts
    /// travel inside it); other publications always go alone.
    pub event_trace: Option<String>,
}

/// Where a publication's answer goes; counted as unanswered until it is sent or dropped.
struct Reply {
    answer: oneshot::Sender<Result<Outcome, lapin::Error>>,
    unanswered: Unanswered,
}

impl Reply {
    fn send(self, outcome: Result<Outcome, lapin::Error>) {
        self.unanswered.0.answered();
        // The caller may have stopped waiting (its timeout): nobody to tell.
        let _ = self.answer.send(outcome);
    }
}

/// The publications handed to the tasks and not answered yet, and when the tasks last answered
/// one (or, if none was waiting, when one began to wait).
struct Progress {
    unanswered: AtomicUsize,
    /// Milliseconds since `since`.
    last_answer: AtomicU64,
    since: Instant,
}

impl Progress {
    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn answered(&self) {
        self.last_answer.store(self.now(), Ordering::Relaxed);
    }
}

/// One unanswered publication. Dropped unanswered (a publisher that stopped, a caller that gave up
/// before handing it over) it is no progress.
struct Unanswered(Arc<Progress>);

impl Unanswered {
    fn new(progress: &Arc<Progress>) -> Self {
        if progress.unanswered.fetch_add(1, Ordering::Relaxed) == 0 {
            progress.answered();
        }
        Self(Arc::clone(progress))
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.unanswered.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Publications that go out as one message, and whom to answer.
struct Outgoing {
    publication: Publication,
    replies: Vec<Reply>,
}

/// The handle of a channel's publisher: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Publisher {
    publications: mpsc::Sender<(Publication, Reply)>,
    progress: Arc<Progress>,
}

/// The publisher task stopped (its channel or connection is gone).
#[derive(Debug, thiserror::Error)]
#[error("the publisher of this rabbitmq channel stopped")]
pub struct PublisherStopped;

impl Publisher {
    /// Starts the two tasks of `channel` (which must be in confirm mode); events sharing a
    /// message make it at most `max_message_bytes`. They end when every handle is dropped and
    /// the publishes in flight are settled.
    pub fn start(channel: Channel, max_message_bytes: usize) -> Self {
        let (publications, incoming) = mpsc::channel(PUBLICATIONS_QUEUED);
        let (in_flight, to_settle) = mpsc::unbounded_channel();
        tokio::spawn(publish_in_order(
            channel,
            incoming,
            in_flight,
            max_message_bytes,
        ));
        tokio::spawn(settle_in_order(to_settle));
        Self {
            publications,
            progress: Arc::new(Progress {
                unanswered: AtomicUsize::new(0),
                last_answer: AtomicU64::new(0),
                since: Instant::now(),
            }),
        }
    }

    /// Publishes and waits for the broker's answer to this publish.
    pub async fn publish(
        &self,
        publication: Publication,
    ) -> Result<Result<Outcome, lapin::Error>, PublisherStopped> {
        let (answer, answered) = oneshot::channel();
        let reply = Reply {
            answer,
            unanswered: Unanswered::new(&self.progress),
        };
        self.publications
            .send((publication, reply))
            .await
            .map_err(|_| PublisherStopped)?;
        answered.await.map_err(|_| PublisherStopped)
    }

    /// True when publications have waited longer than `limit` without the broker answering any:
    /// a connection that died without closing (a node lost under load) can look open to lapin
    /// while nothing it sends is ever confirmed.
    pub fn stalled(&self, limit: Duration) -> bool {
        let progress = &self.progress;
        progress.unanswered.load(Ordering::Relaxed) > 0
            && progress
                .now()
                .saturating_sub(progress.last_answer.load(Ordering::Relaxed))
                > u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A publish sent to the broker, waiting for its confirm.
struct InFlight {
    message_id: Option<ShortString>,
    mandatory: bool,
    confirm: Settling,
    replies: Vec<Reply>,
}

enum Settling {
    Waiting(PublisherConfirm),
    /// Acknowledged (true) or refused by the broker.
    Confirmed(Result<bool, lapin::Error>),
}

/// Takes the publishes in arrival order, starts each message (numbered and queued) before the
/// next, then waits for their frames to be written and hands them to the settling task in the
/// same order.
async fn publish_in_order(
    channel: Channel,
    mut incoming: mpsc::Receiver<(Publication, Reply)>,
    in_flight: mpsc::UnboundedSender<InFlight>,
    max_message_bytes: usize,
) {
    let mut waiting = Vec::with_capacity(STARTED_TOGETHER);
    while incoming.recv_many(&mut waiting, STARTED_TOGETHER).await > 0 {
        // A few turns of the scheduler (microseconds, no timer) let requests that are about to
        // publish join the same message.
        for _ in 0..LINGER_TURNS {
            if waiting.len() >= STARTED_TOGETHER {
                break;
            }
            tokio::task::yield_now().await;
            while waiting.len() < STARTED_TOGETHER
                && let Ok(next) = incoming.try_recv()
            {
                waiting.push(next);
            }
        }
        let mut started = Vec::new();
        for outgoing in together(waiting.drain(..), max_message_bytes) {
            let Outgoing {
                publication,
                replies,
            } = outgoing;
            let message_id = publication.properties.message_id().clone();
            let mandatory = publication.mandatory;
            let mut sending = Box::pin(send(channel.clone(), publication));
            // The first poll numbers the publish and queues its frames; done here, one publish
            // after the other, so the numbers follow the order on the wire.
            let first = sending
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
            started.push((message_id, mandatory, first, sending, replies));
        }
        for (message_id, mandatory, first, sending, replies) in started {
            let sent = match first {
                Poll::Ready(sent) => sent,
                Poll::Pending => sending.await,
            };
            match sent {
                Ok(confirm) => {
                    let entry = InFlight {
                        message_id,
                        mandatory,
                        confirm: Settling::Waiting(confirm),
                        replies,
                    };
                    // Only fails when the settling task is gone; the dropped replies then tell
                    // the callers that the publisher stopped.
                    let _ = in_flight.send(entry);
                }
                Err(error) => {
                    for reply in replies {
                        reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// Groups the waiting publications into messages: events with the same exchange, routing key and
/// `mandatory` share one envelope (in arrival order, up to `max_message_bytes`); everything else,
/// and an event alone, goes as it is.
fn together(
    waiting: impl Iterator<Item = (Publication, Reply)>,
    max_message_bytes: usize,
) -> Vec<Outgoing> {
    let mut groups: Vec<(Vec<(Publication, Reply)>, usize)> = Vec::new();
    for (publication, reply) in waiting {
        let size = envelope::framed_size(publication.event_trace.as_deref(), &publication.payload);
        let joins = publication.event_trace.as_ref().and_then(|_| {
            groups.iter().rposition(|(group, bytes)| {
                let first = &group[0].0;
                first.event_trace.is_some()
                    && first.exchange == publication.exchange
                    && first.routing_key == publication.routing_key
                    && first.mandatory == publication.mandatory
                    && bytes + size <= max_message_bytes
            })
        });
        match joins {
            Some(index) => {
                groups[index].0.push((publication, reply));
                groups[index].1 += size;
            }
            None => groups.push((vec![(publication, reply)], size)),
        }
    }
    groups
        .into_iter()
        .map(|(group, _)| into_outgoing(group))
        .collect()
}

/// One message for a group: the publication itself when it is alone, else an envelope of all.
fn into_outgoing(group: Vec<(Publication, Reply)>) -> Outgoing {
    let mut members = group.into_iter();
    let (first, first_reply) = members.next().expect("a group has a first member");
    let mut rest = members.peekable();
    if rest.peek().is_none() {
        return Outgoing {
            publication: first,
            replies: vec![first_reply],
        };
    }
    let mut body = Vec::new();
    envelope::push(&mut body, first.event_trace.as_deref(), &first.payload);
    let mut replies = vec![first_reply];
    for (publication, reply) in rest {
        envelope::push(
            &mut body,
            publication.event_trace.as_deref(),
            &publication.payload,
        );
        replies.push(reply);
    }
    Outgoing {
        publication: Publication {
            payload: body,
            // The first event's id names the envelope (for its return, if any).
            properties: first
                .properties
                .with_content_type(ShortString::from(envelope::CONTENT_TYPE)),
            ..first
        },
        replies,
    }
}

async fn send(
    channel: Channel,
    publication: Publication,
) -> Result<PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            publication.exchange.as_str().into(),
            publication.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: publication.mandatory,
                ..BasicPublishOptions::default()
            },
            &publication.payload,
            publication.properties,
        )
        .await
}

/// Answers the publishes in the order they were sent. A publish is answered only once every
/// confirm resolved no later than its own has been looked at, so a returned message attached to
/// another publish's confirm is known by then.
async fn settle_in_order(mut to_settle: mpsc::UnboundedReceiver<InFlight>) {
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut returned: HashSet<ShortString> = HashSet::new();
    let mut open = true;
    poll_fn(|cx| {
        while open {
            match to_settle.poll_recv(cx) {
                Poll::Ready(Some(entry)) => in_flight.push_back(entry),
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        // Confirmed in the first pass: their returned message, wherever lapin put it, was on a
        // confirm resolved no later than theirs, which the second pass sees for sure.
        let settleable = look_at_confirms(&mut in_flight, &mut returned, cx);
        look_at_confirms(&mut in_flight, &mut returned, cx);
        for _ in 0..settleable {
            let entry = in_flight.pop_front().expect("counted above");
            answer(entry, &mut returned);
        }
        if !open && in_flight.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Polls every confirm still waiting, records the returned messages they carry, and returns how
/// many publishes at the front of `in_flight` are confirmed.
fn look_at_confirms(
    in_flight: &mut VecDeque<InFlight>,
    returned: &mut HashSet<ShortString>,
    cx: &mut Context<'_>,
) -> usize {
    for entry in in_flight.iter_mut() {
        if let Settling::Waiting(confirm) = &mut entry.confirm
            && let Poll::Ready(confirmation) = Pin::new(confirm).poll(cx)
        {
            if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) =
                &confirmation
                && let Some(id) = message.properties.message_id()
            {
                returned.insert(id.clone());
            }
            entry.confirm = Settling::Confirmed(
                confirmation.map(|confirmation| matches!(confirmation, Confirmation::Ack(_))),
            );
        }
    }
    in_flight
        .iter()
        .take_while(|entry| matches!(entry.confirm, Settling::Confirmed(_)))
        .count()
}

fn answer(entry: InFlight, returned: &mut HashSet<ShortString>) {
    let Settling::Confirmed(confirmation) = entry.confirm else {
        unreachable!("only confirmed publishes are answered");
    };
    let was_returned = entry
        .message_id
        .as_ref()
        .is_some_and(|id| returned.remove(id));
    let outcome = confirmation.map(|acknowledged| match acknowledged {
        true if entry.mandatory && was_returned => Outcome::Returned,
        true => Outcome::Stored,
        false => Outcome::Refused,
    });
    for reply in entry.replies {
        reply.send(outcome.clone());
    }
}
