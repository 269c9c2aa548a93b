//! The access log's own formatter: a tracing layer that writes the `access` events (human
//! text, or one JSON object per line) straight into the log writer. tracing-subscriber's
//! general formatter cost too much throughput for a line per request (docs/performance.md);
//! this one formats each line in a reused buffer, with the date part of the timestamp cached
//! per second.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};

/// The target access lines are logged under.
pub const ACCESS_TARGET: &str = "access";

/// Writes `access` events; other events are left to the general formatter.
pub struct AccessLayer<W> {
    writer: W,
    json: bool,
}

impl<W> AccessLayer<W> {
    /// A layer writing to `writer`, as JSON when `json`.
    pub fn new(writer: W, json: bool) -> Self {
        AccessLayer { writer, json }
    }
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
    static CLOCK: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC) for now.
fn timestamp(out: &mut String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    CLOCK.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.1.clear();
            if let Ok(t) = time::OffsetDateTime::from_unix_timestamp(secs as i64) {
                let _ = write!(
                    c.1,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                );
            }
            c.0 = secs;
        }
        out.push_str(&c.1);
    });
    let _ = write!(out, ".{:06}Z", now.subsec_micros());
}

/// A line the process writes outside the log (the readiness line on stdout, the demo's
/// instructions, the last error on stderr): `message key=value ...` as text, or under
/// `--log-format json` one JSON object shaped like the log's, since a log shipper reads
/// stdout and stderr alike.
pub fn process_line(json: bool, level: &str, message: &str, fields: &[(&str, &str)]) -> String {
    let mut line = String::new();
    if json {
        line.push_str("{\"timestamp\":\"");
        timestamp(&mut line);
        let _ = write!(line, "\",\"level\":\"{level}\",\"target\":\"logon_gate\"");
        for (k, v) in [("message", message)].iter().chain(fields) {
            line.push_str(",\"");
            escape_json(&mut line, k);
            line.push_str("\":\"");
            escape_json(&mut line, v);
            line.push('"');
        }
        line.push('}');
    } else {
        line.push_str(message);
        for (k, v) in fields {
            let _ = write!(line, " {k}={v}");
        }
    }
    line
}

/// Appends `s` as the inside of a JSON string.
fn escape_json(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

struct Fields<'a> {
    out: &'a mut String,
    json: bool,
}

impl Fields<'_> {
    fn key(&mut self, field: &Field) {
        if self.json {
            self.out.push_str(",\"");
            self.out.push_str(field.name());
            self.out.push_str("\":");
        } else {
            self.out.push(' ');
            self.out.push_str(field.name());
            self.out.push('=');
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        self.out.push('"');
        if self.json {
            escape_json(self.out, value);
        } else {
            self.out.push_str(value);
        }
        self.out.push('"');
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        if self.json {
            let mut s = String::new();
            let _ = write!(s, "{value:?}");
            self.out.push('"');
            escape_json(self.out, &s);
            self.out.push('"');
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }
}

impl<S, W> Layer<S> for AccessLayer<W>
where
    S: Subscriber,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != ACCESS_TARGET {
            return;
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            if self.json {
                line.push_str("{\"timestamp\":\"");
                timestamp(&mut line);
                line.push_str("\",\"level\":\"INFO\",\"target\":\"access\"");
            } else {
                timestamp(&mut line);
                line.push_str("  INFO access:");
            }
            event.record(&mut Fields {
                out: &mut line,
                json: self.json,
            });
            line.push_str(if self.json { "}\n" } else { "\n" });
            let _ = self.writer.make_writer().write_all(line.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_lines_are_text_or_one_json_object() {
        let fields = [("https", "127.0.0.1:1"), ("http", "off")];
        assert_eq!(
            process_line(false, "INFO", "listening", &fields),
            "listening https=127.0.0.1:1 http=off"
        );
        let line = process_line(true, "INFO", "listening", &fields);
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(v["message"], "listening");
        assert_eq!(v["https"], "127.0.0.1:1");
        assert_eq!(v["http"], "off");
        assert_eq!(v["level"], "INFO");
        let text = process_line(true, "INFO", "demo", &[("instructions", "a \"b\"\nc")]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
        assert_eq!(v["instructions"], "a \"b\"\nc");
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        escape_json(&mut s, "a\"b\\c\nd");
        assert_eq!(s, "a\\\"b\\\\c\\u000ad");
    }

    #[test]
    fn timestamp_has_the_rfc3339_shape() {
        let mut s = String::new();
        timestamp(&mut s);
        assert_eq!(s.len(), "2026-11-26T14:33:55.251726Z".len(), "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    }
}
