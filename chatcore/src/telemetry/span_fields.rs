//! The log layer's span fields, written as a JSON object straight into the span's string.
//!
//! The JSON log layer formats the fields of every span it is enabled for when the span is created,
//! whether or not anything is logged inside it (the log lines of a request carry its span's
//! fields). tracing-subscriber's own `JsonFields` gathers them in a map, serializes it through an
//! adaptor that checks each write is UTF-8, and parses the object back and serializes it again for
//! every field recorded later (a request's span records three): together about a twentieth of the
//! api's CPU per request. Here each field is appended as it comes, escaped on the fly, and a field
//! recorded later is appended to the object. The object may then name a field twice (recorded
//! again): the log line's formatter reads it with serde_json, where the last one wins, as it did.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::Writer;

/// The `FormatFields` of the JSON log layer's spans.
pub struct SpanFieldsJson;

impl<'writer> FormatFields<'writer> for SpanFieldsJson {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = String::from("{");
        write_fields(&mut object, true, fields)?;
        object.push('}');
        writer.write_str(&object)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let object = &mut current.fields;
        if object.pop() != Some('}') {
            // Empty (or not an object): start one.
            object.clear();
            object.push('{');
        }
        let first = object.ends_with('{');
        write_fields(object, first, fields)?;
        object.push('}');
        Ok(())
    }
}

fn write_fields<R: RecordFields>(object: &mut String, first: bool, fields: R) -> fmt::Result {
    let mut visitor = FieldsVisitor {
        object,
        first,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result
}

/// Appends `"name":value` for each field visited.
struct FieldsVisitor<'a> {
    object: &'a mut String,
    first: bool,
    result: fmt::Result,
}

impl FieldsVisitor<'_> {
    /// Writes the separator and the field's name; `value` writes its JSON value.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        if !self.first {
            self.object.push(',');
        }
        self.first = false;
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = write_json_string(self.object, format_args!("{name}")).and_then(|()| {
            self.object.push(':');
            value(self.object)
        });
    }
}

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |object| {
            write_json_string(object, format_args!("{value}"))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |object| write!(object, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |object| write!(object, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |object| write!(object, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |object| {
            if value.is_finite() {
                write!(object, "{value}")
            } else {
                // As serde_json writes what JSON has no number for.
                object.push_str("null");
                Ok(())
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |object| {
            write_json_string(object, format_args!("{value:?}"))
        });
    }
}

/// Writes `value` as a JSON string: quoted, with `"`, `\` and control characters escaped.
fn write_json_string(object: &mut String, value: fmt::Arguments<'_>) -> fmt::Result {
    object.push('"');
    Escaping(object).write_fmt(value)?;
    object.push('"');
    Ok(())
}

/// Escapes what it is written for a JSON string.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for character in text.chars() {
            match character {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                control if control < ' ' => write!(self.0, "\\u{:04x}", u32::from(control))?,
                other => self.0.push(other),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Log lines written into a shared buffer.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .expect("not poisoned")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_line_carries_its_spans_fields_as_created_and_as_recorded_later() {
        let lines = Lines::default();
        let writer = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .fmt_fields(SpanFieldsJson)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("outer", empty = tracing::field::Empty);
            let _outer = outer.enter();
            let span = tracing::info_span!(
                "request",
                http.route = "/a \"quoted\" \\ path\n",
                count = 3_u64,
                below = -2_i64,
                ok = true,
                ratio = 0.5,
                error.r#type = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            span.record("trace_id", "abc");
            span.record("error.type", "503");
            span.record("count", 4_u64);
            let _entered = span.enter();
            tracing::info!(shown = %"yes", "inside");
        });
        let written =
            String::from_utf8(lines.0.lock().expect("not poisoned").clone()).expect("utf-8");
        let line: serde_json::Value = serde_json::from_str(written.trim()).expect("one JSON line");
        let span = &line["span"];
        assert_eq!(span["name"], "request", "{line}");
        assert_eq!(span["http.route"], "/a \"quoted\" \\ path\n");
        assert_eq!(span["count"], 4, "recorded again: the last value");
        assert_eq!(span["below"], -2);
        assert_eq!(span["ok"], true);
        assert_eq!(span["ratio"], 0.5);
        assert_eq!(span["trace_id"], "abc");
        assert_eq!(span["error.type"], "503");
        assert_eq!(line["spans"][0]["name"], "outer", "{line}");
        assert_eq!(line["shown"], "yes");
    }
}
