//! What a use case can fail with, in domain terms; the http layer maps each to its answer
//! (`http::error`, one place).

use std::time::Duration;

use chatcore::numbering::AllocationError;
use chatcore::queue::QueueError;
use chatcore::search::SearchError;
use chatcore::state::StateError;
use chatcore::store::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The message number was accepted but the message is not written yet.
    #[error("message {0} was accepted but is not persisted yet")]
    NotPersistedYet(u64),
    /// Another request with this Idempotency-Key is being processed.
    #[error("a request with this Idempotency-Key is in progress")]
    IdempotencyKeyInUse,
    /// The Idempotency-Key was used before with a different request body.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// The application has as many chats as `CHAT_MAX_CHATS_PER_APPLICATION` allows.
    #[error("the application has reached its quota of {0} chats")]
    ChatQuotaExceeded(u64),
    /// The application posted its quota of messages this minute.
    #[error("the application has posted its quota of {quota} messages this minute")]
    MessageQuotaExceeded { quota: u64, retry_after: Duration },
    /// The work of a claimed idempotency key outlived its share of the lease (milliseconds).
    #[error("the request did not finish within {0} ms")]
    TimedOut(u128),
    /// The application has as many webhook endpoints as
    /// `CHAT_WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION` allows.
    #[error("the application has reached its quota of {0} webhook endpoints")]
    WebhookQuotaExceeded(u64),
    /// A value the request gave breaks a rule found only by looking further (a webhook URL that
    /// resolves to a private address).
    #[error(transparent)]
    Invalid(chatcore::domain::InvalidInput),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Allocation(#[from] AllocationError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Internal(anyhow::Error),
}
