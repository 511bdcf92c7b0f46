//! The `Idempotency-Key` header (the protocol behind it: `app::idempotency`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chatcore::domain::InvalidInput;

use crate::http::error::ApiError;

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
