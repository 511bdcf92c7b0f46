//! Every request body is read whole before routing, within `CHAT_BODY_TIMEOUT_MS` and
//! `CHAT_MAX_REQUEST_BYTES`. A body over the limit is read to its end (up to [`DRAIN_LIMIT_BYTES`])
//! before the 413 is sent: closing a socket with unread data resets the connection, and the
//! client would see the reset instead of the answer.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tokio::time::Instant;

use crate::http::error::ApiError;
use crate::http::state::AppState;

/// How much of an oversized body is read (and dropped) so its client can read the 413; a larger
/// upload is cut off.
const DRAIN_LIMIT_BYTES: usize = 16 * 1024 * 1024;

enum Reading {
    Complete(Bytes),
    TooLarge,
    TimedOut,
}

/// Middleware: buffers the body, or answers 413 or 408 (and closes the connection).
pub async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let settings = state.settings();
    let max_bytes = settings.max_request_bytes;
    let deadline = Instant::now() + settings.body_timeout;
    let (parts, body) = request.into_parts();
    let declared: Option<usize> = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok());
    let reading = match declared {
        // A client that waits for `100 Continue` sends nothing: answer at once.
        Some(length) if length > max_bytes && parts.headers.contains_key(header::EXPECT) => {
            Reading::TooLarge
        }
        Some(length) if length > max_bytes => {
            drain(body, deadline).await;
            Reading::TooLarge
        }
        _ => read_within(body, max_bytes, deadline).await,
    };
    match reading {
        Reading::Complete(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Reading::TooLarge => closing(ApiError::PayloadTooLarge),
        Reading::TimedOut => closing(ApiError::BodyTimedOut(settings.body_timeout.as_millis())),
    }
}

async fn read_within(mut body: Body, max_bytes: usize, deadline: Instant) -> Reading {
    let mut buffer = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Reading::TimedOut,
            Ok(None) => return Reading::Complete(buffer.freeze()),
            // The client broke off; nothing will read the answer.
            Ok(Some(Err(_))) => return Reading::TimedOut,
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buffer.len() + data.len() > max_bytes {
            drain(body, deadline).await;
            return Reading::TooLarge;
        }
        buffer.extend_from_slice(&data);
    }
}

/// Reads and drops the rest of a body, up to [`DRAIN_LIMIT_BYTES`] or the deadline.
async fn drain(mut body: Body, deadline: Instant) {
    let mut drained = 0;
    while drained < DRAIN_LIMIT_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                drained += frame.data_ref().map_or(0, Bytes::len);
            }
            _ => return,
        }
    }
}

fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
