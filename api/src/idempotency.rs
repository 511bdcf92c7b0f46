//! `Idempotency-Key` on the POSTs that create chats and messages: a retry with the same key (and
//! the same body) gets the number of the first attempt and creates nothing new.
//!
//! Keys live in the shared state (Redis, or the embedded `state.db`) for
//! `CHAT_IDEMPOTENCY_TTL_SECONDS` (a day), per parent (application or chat). The first request
//! claims the key (set-if-absent, in [`crate::service::ChatService`]) before it allocates a
//! number, so two concurrent retries can never both create; the loser gets 409 and retries. A failed attempt (503) releases the key.
//! Keys are lost with Redis' data, like the counters; the embedded ones survive restarts.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chatcore::domain::{InvalidInput, Number};

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

/// FNV-1a: a fingerprint of the request body that stays the same across processes and versions.
pub(crate) fn fingerprint(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

pub(crate) enum Recorded {
    Done { fingerprint: String, number: Number },
    Pending { fingerprint: String },
}

pub(crate) fn parse_recorded(value: &str) -> Option<Recorded> {
    let mut parts = value.split(':');
    match (parts.next()?, parts.next()?, parts.next()) {
        ("done", fingerprint, Some(number)) => Some(Recorded::Done {
            fingerprint: fingerprint.to_owned(),
            number: number.parse().ok().and_then(Number::new)?,
        }),
        ("pending", fingerprint, None) => Some(Recorded::Pending {
            fingerprint: fingerprint.to_owned(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
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
    fn recorded_values_parse() {
        assert!(
            matches!(parse_recorded("done:ab:7"), Some(Recorded::Done { number, .. }) if number.get() == 7)
        );
        assert!(matches!(
            parse_recorded("pending:ab"),
            Some(Recorded::Pending { .. })
        ));
        assert!(parse_recorded("done:ab:0").is_none());
        assert!(parse_recorded("garbage").is_none());
    }
}
