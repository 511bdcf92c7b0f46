//! One module per resource, each with its own router (merged under `/api/v1` by `http`), and
//! what their handlers share.

pub(super) mod applications;
pub(super) mod changes;
pub(super) mod chats;
pub(super) mod client_tokens;
pub(super) mod health;
pub(super) mod messages;
pub(super) mod webhooks;

use chatcore::domain::Number;
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::error::ApiError;

fn parse_number(field: &'static str, raw: &str) -> Result<Number, ApiError> {
    Number::parse(field, raw).map_err(ApiError::bad_parameter)
}

/// `{"number": n}` of a 202.
#[derive(Debug, Serialize, ToSchema)]
struct Accepted {
    /// The number the chat or message will have.
    #[schema(value_type = u64, minimum = 1)]
    number: Number,
}
