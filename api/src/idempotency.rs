//! `Idempotency-Key` on the POSTs that create chats and messages: a retry with the same key (and
//! the same body) gets the number of the first attempt and creates nothing new.
//!
//! Keys live in the shared state (Redis, or the embedded `state.db`) for
//! `CHAT_IDEMPOTENCY_TTL_SECONDS` (a day), per parent (application or chat). The first request
//! claims the key (set-if-absent) before it allocates a number, so two concurrent retries can
//! never both create; the loser gets 409 and retries. A failed attempt (503) releases the key.
//! Keys are lost with Redis' data, like the counters; the embedded ones survive restarts.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chatcore::domain::{InvalidInput, Number};
use chatcore::numbering::Scope;

use crate::AppState;
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
fn fingerprint(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

enum Recorded {
    Done { fingerprint: String, number: Number },
    Pending { fingerprint: String },
}

fn parse_recorded(value: &str) -> Option<Recorded> {
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

impl AppState {
    /// Runs `accept` once per key: a repeated key returns the first number.
    pub(crate) async fn accept_once<F, Fut>(
        &self,
        key: IdempotencyKey,
        scope: &Scope,
        body: &[u8],
        accept: F,
    ) -> Result<Number, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Number, ApiError>>,
    {
        let Some(key) = key.0 else {
            return accept().await;
        };
        let state_key = format!(
            "{}:idempotency:{}:{key}",
            self.config().redis_key_prefix,
            scope.id()
        );
        let fingerprint = fingerprint(body);
        let ttl = self.config().api.idempotency_ttl;
        let state = &self.inner.state;
        let claimed = state
            .set_if_absent(&state_key, &format!("pending:{fingerprint}"), ttl)
            .await?;
        if !claimed {
            let recorded = state.get(&state_key).await?;
            return match recorded.as_deref().and_then(parse_recorded) {
                Some(Recorded::Done {
                    fingerprint: first,
                    number,
                }) if first == fingerprint => Ok(number),
                Some(Recorded::Pending { fingerprint: first }) if first == fingerprint => {
                    Err(ApiError::IdempotencyKeyInUse)
                }
                Some(_) => Err(ApiError::IdempotencyKeyReused),
                // Expired between the claim and the read: treat as in progress, the retry will
                // claim it.
                None => Err(ApiError::IdempotencyKeyInUse),
            };
        }
        match accept().await {
            Ok(number) => {
                state
                    .set(&state_key, &format!("done:{fingerprint}:{number}"), ttl)
                    .await?;
                Ok(number)
            }
            Err(error) => {
                // Nothing was accepted: the client may retry with the same key.
                if let Err(release) = state.delete(&state_key).await {
                    tracing::warn!(error = %release, "could not release an idempotency key");
                }
                Err(error)
            }
        }
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
