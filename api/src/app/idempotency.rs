//! `Idempotency-Key` on the POSTs that create chats and messages: a retry with the same key (and
//! the same body) gets the number of the first attempt and creates nothing new, also when the
//! first attempt's answer was an ambiguous 503 or the api died on the way.
//!
//! Per parent (application or chat) and key, the shared state (Redis, or the embedded `state.db`)
//! holds a [`Recorded`]: the first request claims the key (set-if-absent, a lease of
//! `CHAT_IDEMPOTENCY_LEASE_SECONDS`) before it hands out a number, so two concurrent retries can
//! never both create (the loser gets 409 and retries); then it records the number with its event
//! before publishing, so a retry after a 503 publishes that same event again (the consumers
//! collapse duplicates) instead of handing out a second number; then it records the number as
//! done for `CHAT_IDEMPOTENCY_TTL_SECONDS` (a day). A failure before a number was handed out
//! releases the key. Keys are lost with Redis' data, like the counters; the embedded ones survive
//! restarts.
//!
//! Here: the protocol; the header is read by the http layer (`http::idempotency_key`).

use std::sync::Arc;
use std::time::Duration;

use chatcore::domain::Number;
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::numbering::Scope;
use chatcore::retry::{self, Backoff, Stopped};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{AppError, ChatService};

/// Writes of the record of an accepted event before the request fails (see `allocate_and_publish`),
/// with a growing pause between them.
const ACCEPTED_RECORD_ATTEMPTS: u32 = 3;
const ACCEPTED_RECORD_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
/// The share of the idempotency lease the work of a claimed request may take.
const LEASE_SHARE: f64 = 0.9;

impl ChatService {
    /// Hands out the next number of the scope and publishes the event that carries it, once per
    /// idempotency key (see [`crate::idempotency`]).
    pub(super) async fn accept_once_per_key(
        self: Arc<Self>,
        idempotency_key: Option<String>,
        scope: &Scope,
        body: &[u8],
        trace: &TraceContext,
        payload: impl FnOnce(Number) -> EventPayload + Send + 'static,
    ) -> Result<Number, AppError> {
        let Some(key) = idempotency_key else {
            let number = self.allocator.allocate(scope).await?;
            return self
                .publish_accepted(&Event::new(payload(number)), trace)
                .await;
        };
        let record_key = format!("{}:idempotency:{}:{key}", self.key_prefix, scope.id());
        let fingerprint = fingerprint(body);
        let claim = Recorded::Claimed {
            fingerprint: fingerprint.clone(),
        };
        let claimed = self
            .state
            .set_if_absent(
                &record_key,
                &claim.encode(),
                self.settings.idempotency_lease,
            )
            .await?;
        if !claimed {
            let recorded = self.state.get(&record_key).await?;
            return match recorded.as_deref().and_then(Recorded::parse) {
                Some(recorded) if recorded.fingerprint() != fingerprint => {
                    Err(AppError::IdempotencyKeyReused)
                }
                Some(Recorded::Done { number, .. }) => Ok(number),
                // Maybe durable, maybe not: the same event again.
                Some(Recorded::Accepted { event, .. }) => {
                    self.publish_recorded(&record_key, fingerprint, &event, trace)
                        .await
                }
                // Claimed by a request still running (or one that died: the lease runs out), or
                // expired between the claim and the read.
                Some(Recorded::Claimed { .. }) | None => Err(AppError::IdempotencyKeyInUse),
            };
        }
        // The claim is ours: the rest runs to its end in a task of its own, even when the request
        // is cancelled meanwhile (its timeout, a dropped connection). Cut off between the
        // allocation and the record of the event, the number would be lost, and the client's
        // retry with the same key would get the next one: a number skipped.
        let (service, scope, trace) = (Arc::clone(&self), *scope, trace.clone());
        let completion = async move {
            service
                .allocate_and_publish(&record_key, fingerprint, &scope, &trace, payload)
                .await
        };
        // Bounded by the claim's lease: past it, a retry may claim the key anew and must not
        // race with this one.
        let lease = self.settings.idempotency_lease;
        let completion = tokio::time::timeout(lease.mul_f64(LEASE_SHARE), completion);
        tokio::spawn(completion.in_current_span())
            .await
            .map_err(|error| AppError::Internal(error.into()))?
            .map_err(|_elapsed| AppError::TimedOut(lease.as_millis()))?
    }

    /// For a claimed idempotency key: allocates the number, records the event under the key, then
    /// publishes it (see [`Self::publish_recorded`]).
    async fn allocate_and_publish(
        &self,
        record_key: &str,
        fingerprint: String,
        scope: &Scope,
        trace: &TraceContext,
        payload: impl FnOnce(Number) -> EventPayload,
    ) -> Result<Number, AppError> {
        let number = match self.allocator.allocate(scope).await {
            Ok(number) => number,
            Err(error) => {
                // Nothing was handed out: the client may retry with the same key at once.
                if let Err(release) = self.state.delete(record_key).await {
                    tracing::warn!(error = %release, "could not release an idempotency key");
                }
                return Err(error.into());
            }
        };
        let event = Event::new(payload(number));
        let accepted = Recorded::Accepted {
            fingerprint: fingerprint.clone(),
            event: event.clone(),
        }
        .encode();
        // The number is handed out: without its record the client's retry would get another one,
        // so a failed write (a timeout of an overloaded Redis) is tried again.
        let record = || {
            self.state
                .set(record_key, &accepted, self.settings.idempotency_ttl)
        };
        retry::retry(
            ACCEPTED_RECORD_BACKOFF,
            &CancellationToken::new(),
            record,
            |error, attempt, _delay| {
                let again = attempt < ACCEPTED_RECORD_ATTEMPTS;
                if again {
                    tracing::warn!(%error, attempt, "could not record an accepted event, retrying");
                }
                again
            },
        )
        .await
        .map_err(|stopped| match stopped {
            Stopped::GaveUp(error) => AppError::from(error),
            Stopped::Interrupted => AppError::Internal(anyhow::anyhow!("never cancelled")),
        })?;
        self.publish_recorded(record_key, fingerprint, &event, trace)
            .await
    }

    /// Publishes an event recorded for an idempotency key, then records its number as done. A
    /// failed publish leaves the record as it is, for the retry.
    async fn publish_recorded(
        &self,
        record_key: &str,
        fingerprint: String,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<Number, AppError> {
        let number = self.publish_accepted(event, trace).await?;
        let done = Recorded::Done {
            fingerprint,
            number,
        };
        self.state
            .set(record_key, &done.encode(), self.settings.idempotency_ttl)
            .await?;
        Ok(number)
    }
}

/// FNV-1a: a fingerprint of the request body that stays the same across processes and versions.
pub(crate) fn fingerprint(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// What the shared state holds for one key.
#[derive(Debug)]
pub(crate) enum Recorded {
    /// Claimed by a request that has not handed out a number yet; a short lease, so a request
    /// that died here does not block the key for long.
    Claimed { fingerprint: String },
    /// A number was handed out and this is its event; it may or may not be durable yet (a 503
    /// after the publish frame went out is ambiguous). A retry publishes this same event again.
    Accepted { fingerprint: String, event: Event },
    /// The event is durable: a retry gets the number at once.
    Done { fingerprint: String, number: Number },
}

impl Recorded {
    pub(crate) fn fingerprint(&self) -> &str {
        match self {
            Self::Claimed { fingerprint }
            | Self::Accepted { fingerprint, .. }
            | Self::Done { fingerprint, .. } => fingerprint,
        }
    }

    pub(crate) fn encode(&self) -> String {
        match self {
            Self::Claimed { fingerprint } => format!("pending:{fingerprint}"),
            Self::Accepted { fingerprint, event } => format!(
                "accepted:{fingerprint}:{}",
                String::from_utf8_lossy(&event.encode())
            ),
            Self::Done {
                fingerprint,
                number,
            } => format!("done:{fingerprint}:{number}"),
        }
    }

    pub(crate) fn parse(value: &str) -> Option<Self> {
        let mut parts = value.splitn(3, ':');
        let (state, fingerprint) = (parts.next()?, parts.next()?.to_owned());
        match (state, parts.next()) {
            ("pending", None) => Some(Self::Claimed { fingerprint }),
            ("accepted", Some(event)) => Some(Self::Accepted {
                fingerprint,
                event: Event::decode(event.as_bytes()).ok()?,
            }),
            ("done", Some(number)) => Some(Self::Done {
                fingerprint,
                number: number.parse().ok().and_then(Number::new)?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use chatcore::events::EventPayload;

    use super::*;

    #[test]
    fn fingerprints_are_stable_and_tell_bodies_apart() {
        assert_eq!(fingerprint(b""), "cbf29ce484222325");
        assert_eq!(fingerprint(b"a"), "af63dc4c8601ec8c");
        assert_ne!(
            fingerprint(b"{\"body\":\"x\"}"),
            fingerprint(b"{\"body\":\"y\"}")
        );
    }

    #[test]
    fn records_round_trip() {
        let event = Event::new(EventPayload::ChatCreated {
            application_id: 3,
            chat_number: Number::new(9).expect("positive"),
            created_at: chatcore::store::now(),
            title: None,
            metadata: None,
        });
        let records = [
            Recorded::Claimed {
                fingerprint: "ab".into(),
            },
            Recorded::Accepted {
                fingerprint: "ab".into(),
                event: event.clone(),
            },
            Recorded::Done {
                fingerprint: "ab".into(),
                number: Number::new(7).expect("positive"),
            },
        ];
        for record in records {
            let parsed = Recorded::parse(&record.encode()).expect("parses");
            assert_eq!(parsed.encode(), record.encode());
            assert_eq!(parsed.fingerprint(), "ab");
        }
        assert!(
            matches!(Recorded::parse(&format!("accepted:ab:{}", String::from_utf8_lossy(&event.encode()))), Some(Recorded::Accepted { event: parsed, .. }) if parsed == event)
        );
        assert!(Recorded::parse("done:ab:0").is_none());
        assert!(Recorded::parse("accepted:ab:{not json").is_none());
        assert!(Recorded::parse("garbage").is_none());
    }
}
