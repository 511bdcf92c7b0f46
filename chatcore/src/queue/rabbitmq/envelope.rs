//! Several events in one AMQP message: the api publishes the events of concurrent requests
//! together, so that one message (stored once, routed and delivered once per queue) and one
//! confirm answer all of them. Each event keeps its own id, trace context and body, and the
//! consumer treats each alone: decoded, handled, dead-lettered or handed back one by one.
//!
//! Body: for each event, its `traceparent` (u16 big-endian length, then the bytes) and its
//! encoded JSON (u32 big-endian length, then the bytes). The content type tells it apart from a
//! message of one event.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::events::{
    Event, SCHEMA_VERSION, SCHEMA_VERSION_HEADER, TRACEPARENT_HEADER, TraceContext,
};

/// AMQP delivery mode of messages written to disk.
const PERSISTENT: u8 = 2;

/// Content type of a message carrying several events.
pub const CONTENT_TYPE: &str = "application/vnd.chat.events";

/// One event inside an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enveloped {
    pub trace: Option<TraceContext>,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a batch of events is cut short at byte {0}")]
pub struct Truncated(usize);

/// Appends one event to an envelope body being built.
pub fn push(body: &mut Vec<u8>, trace: Option<&str>, data: &[u8]) {
    let trace = trace.unwrap_or_default().as_bytes();
    let trace_length = u16::try_from(trace.len()).expect("a traceparent is 55 bytes");
    let data_length = u32::try_from(data.len()).expect("an event is far below 4 GiB");
    body.extend_from_slice(&trace_length.to_be_bytes());
    body.extend_from_slice(trace);
    body.extend_from_slice(&data_length.to_be_bytes());
    body.extend_from_slice(data);
}

/// The bytes an event adds to an envelope.
pub fn framed_size(trace: Option<&str>, data: &[u8]) -> usize {
    2 + trace.map_or(0, str::len) + 4 + data.len()
}

/// The events of an envelope body, in order.
pub fn unpack(body: &[u8]) -> Result<Vec<Enveloped>, Truncated> {
    let mut events = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let trace_length = read_length::<2>(body, &mut at)?;
        let trace = take(body, &mut at, trace_length)?;
        let data_length = read_length::<4>(body, &mut at)?;
        let data = take(body, &mut at, data_length)?;
        events.push(Enveloped {
            trace: std::str::from_utf8(trace)
                .ok()
                .and_then(TraceContext::parse),
            data: data.to_vec(),
        });
    }
    Ok(events)
}

fn read_length<const BYTES: usize>(body: &[u8], at: &mut usize) -> Result<usize, Truncated> {
    let bytes = take(body, at, BYTES)?;
    Ok(bytes
        .iter()
        .fold(0usize, |length, byte| (length << 8) | usize::from(*byte)))
}

fn take<'a>(body: &'a [u8], at: &mut usize, length: usize) -> Result<&'a [u8], Truncated> {
    let end = at.checked_add(length).filter(|end| *end <= body.len());
    let Some(end) = end else {
        return Err(Truncated(*at));
    };
    let taken = &body[*at..end];
    *at = end;
    Ok(taken)
}

/// AMQP properties of an event: persistent, JSON, with schema version and trace context headers.
pub fn event_properties(event: &Event, trace: &TraceContext) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        TRACEPARENT_HEADER.into(),
        AMQPValue::LongString(trace.as_str().into()),
    );
    headers.insert(
        SCHEMA_VERSION_HEADER.into(),
        AMQPValue::LongUInt(SCHEMA_VERSION),
    );
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(event.event_id.to_string()))
        .with_headers(headers)
}

/// Reads the trace context of a delivery, if it carries a valid one.
pub(super) fn trace_context_of(properties: &BasicProperties) -> Option<TraceContext> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(TRACEPARENT_HEADER)? {
        AMQPValue::LongString(value) => {
            TraceContext::parse(std::str::from_utf8(value.as_bytes()).ok()?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_as_they_went_in() {
        let trace = TraceContext::child_of(None);
        let mut body = Vec::new();
        push(&mut body, Some(trace.as_str()), b"{\"first\":1}");
        push(&mut body, None, b"");
        push(&mut body, Some(trace.as_str()), &[7; 70_000]);
        assert_eq!(
            body.len(),
            framed_size(Some(trace.as_str()), b"{\"first\":1}")
                + framed_size(None, b"")
                + framed_size(Some(trace.as_str()), &[7; 70_000])
        );
        let events = unpack(&body).expect("well formed");
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].trace.as_ref(), Some(&trace));
        assert_eq!(events[0].data, b"{\"first\":1}");
        assert_eq!(events[1].trace, None);
        assert!(events[1].data.is_empty());
        assert_eq!(events[2].data.len(), 70_000);
    }

    #[test]
    fn a_cut_body_is_refused() {
        let mut body = Vec::new();
        push(&mut body, None, b"{\"event\":true}");
        for cut in 1..body.len() {
            assert!(unpack(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(unpack(&[]), Ok(Vec::new()));
    }
}
