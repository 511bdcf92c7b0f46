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

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chatcore::domain::{InvalidInput, Number};
use chatcore::events::Event;

use crate::error::ApiError;

pub const HEADER: &str = "idempotency-key";
const MAX_KEY_LENGTH: usize = 255;

/// The optional `Idempotency-Key` header: 1..=255 visible ASCII characters.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(HEADER) else {
            return Ok(Self(None));
        };
        let key = value
            .to_str()
            .ok()
            .filter(|key| {
                !key.is_empty()
                    && key.len() <= MAX_KEY_LENGTH
                    && key.bytes().all(|b| b.is_ascii_graphic())
            })
            .ok_or_else(|| {
                ApiError::bad_parameter(InvalidInput::new(
                    "Idempotency-Key",
                    format!("must be 1 to {MAX_KEY_LENGTH} visible ASCII characters"),
                ))
            })?;
        Ok(Self(Some(key.to_owned())))
    }
}

/// The header as an OpenAPI parameter, with the rules the extractor enforces (a generated client
/// exposes it as an argument of the POSTs that take it).
impl utoipa::IntoParams for IdempotencyKey {
    fn into_params(
        _parameter_in: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::Required;
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{ObjectBuilder, Type};

        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_KEY_LENGTH))
            .pattern(Some("^[!-~]+$"));
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "Chosen by the client (e.g. a UUID), 1 to 255 visible ASCII characters. A \
                     retry with the same key and body gets the first attempt's number and creates \
                     nothing; the same key with another body is a 422 `idempotency_key_reused`; \
                     while the first attempt runs a twin gets a 409 `idempotency_key_in_use`. \
                     Keys are kept for a day. Retry a 503 with the same key.",
                ))
                .schema(Some(schema))
                .build(),
        ]
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
