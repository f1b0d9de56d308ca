//! An incremental parser for `text/event-stream` (server-sent events).
//!
//! The parser is pure: feed it the body's bytes in whatever chunks the network delivers
//! ([`SseParser::push`]) and it returns the events completed so far. It follows the
//! WHATWG event-stream rules that matter to a client:
//!
//! * lines end with LF, CRLF or a lone CR (a CRLF split across two chunks is one ending);
//! * a blank line dispatches the event; an event without `data` is not dispatched;
//! * several `data:` lines are joined with `\n`;
//! * lines starting with `:` are comments;
//! * one space after the colon is removed from the value;
//! * `id` persists from one event to the next until changed;
//! * an event left incomplete when the stream ends is discarded;
//! * a leading UTF-8 byte-order mark is ignored, invalid UTF-8 is replaced.

/// The longest line the parser buffers before giving up, in bytes.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// One dispatched server-sent event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type (`event:` field), if the server set one.
    pub event: Option<String>,
    /// The data, `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id seen on the stream (`id:` field), if any.
    pub id: Option<String>,
}

/// Why the event stream could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line was longer than [`MAX_LINE_BYTES`].
    #[error("a server-sent event line is longer than {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// Incremental event-stream parser. See the module documentation.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line being received (without its terminator).
    line: Vec<u8>,
    /// The previous byte was a CR: an LF right after it belongs to the same line ending.
    after_cr: bool,
    /// No line has been processed yet (a byte-order mark may start the stream).
    seen_first_line: bool,
    /// The data buffer of the event being assembled, each line followed by `\n`.
    data: String,
    /// The event type of the event being assembled.
    event: Option<String>,
    /// The last event id buffer; persists across events.
    last_id: Option<String>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// The last event id seen so far (what a reconnecting client sends as `Last-Event-ID`).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Feeds the next chunk of the body and returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(pos) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.extend_line(&rest[..pos])?;
            if rest[pos] == b'\r' {
                match rest.get(pos + 1) {
                    Some(b'\n') => rest = &rest[pos + 2..],
                    Some(_) => rest = &rest[pos + 1..],
                    None => {
                        self.after_cr = true;
                        rest = &[];
                    }
                }
            } else {
                rest = &rest[pos + 1..];
            }
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.process_line(&line) {
                events.push(event);
            }
        }
        self.extend_line(rest)?;
        Ok(events)
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            self.line.clear();
            return Err(SseError::LineTooLong { limit: MAX_LINE_BYTES });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, raw: &[u8]) -> Option<SseEvent> {
        let mut raw = raw;
        if !self.seen_first_line {
            self.seen_first_line = true;
            if let Some(stripped) = raw.strip_prefix(b"\xEF\xBB\xBF") {
                raw = stripped;
            }
        }
        let line = String::from_utf8_lossy(raw);
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => {
                self.last_id = (!value.is_empty()).then(|| value.to_owned());
            }
            // `retry` and unknown fields are ignored.
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if self.data.is_empty() {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // The `\n` after the last data line.
        Some(SseEvent {
            event,
            data,
            id: self.last_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(id, data)` of an event with no event type.
    type Expected<'a> = (Option<&'a str>, &'a str);

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        chunks.iter().flat_map(|c| parser.push(c).unwrap()).collect()
    }

    /// Parses `input` whole, then split at every single byte position, then one byte at
    /// a time, and checks every way gives `expected`.
    fn check(input: &str, expected: &[Expected]) {
        let want: Vec<SseEvent> = expected
            .iter()
            .map(|(id, data)| SseEvent {
                event: None,
                data: (*data).to_owned(),
                id: id.map(str::to_owned),
            })
            .collect();
        let bytes = input.as_bytes();
        assert_eq!(parse_chunks(&[bytes]), want, "whole input {input:?}");
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(parse_chunks(&[a, b]), want, "input {input:?} split at {i}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_chunks(&singles), want, "input {input:?} byte by byte");
    }

    #[test]
    fn single_event() {
        check(
            "id: ready\ndata: {\"status\":\"ready\"}\n\n",
            &[(Some("ready"), "{\"status\":\"ready\"}")],
        );
    }

    #[test]
    fn several_events() {
        check(
            "id: scheduled\ndata: a\n\nid: loading\ndata: b\n\n",
            &[(Some("scheduled"), "a"), (Some("loading"), "b")],
        );
    }

    #[test]
    fn line_endings() {
        check("id: x\r\ndata: a\r\n\r\n", &[(Some("x"), "a")]);
        check("id: x\rdata: a\r\r", &[(Some("x"), "a")]);
        check("data: a\r\n\rdata: b\n\r\n", &[(None, "a"), (None, "b")]);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_ending() {
        // If the LF after a CR were a second line ending, this would dispatch early.
        let events = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(
            events,
            vec![SseEvent {
                event: None,
                data: "a\nb".into(),
                id: None
            }]
        );
    }

    #[test]
    fn multi_line_data() {
        check(
            "data: one\ndata: two\ndata:\ndata: three\n\n",
            &[(None, "one\ntwo\n\nthree")],
        );
    }

    #[test]
    fn comments_are_ignored() {
        check(": keep-alive\n\n:\ndata: a\n: inside\n\n: trailing\n\n", &[(None, "a")]);
    }

    #[test]
    fn value_spacing() {
        check("data:a\n\n", &[(None, "a")]);
        check("data:  a \n\n", &[(None, " a ")]);
        check("data: a: b\n\n", &[(None, "a: b")]);
    }

    #[test]
    fn field_without_colon() {
        // `data` alone appends an empty line; the event is dispatched with empty data.
        check("data\n\n", &[(None, "")]);
        check("data\ndata\n\n", &[(None, "\n")]);
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        check("id: a\n\nevent: ping\n\nretry: 10\n\n", &[]);
        // ... but the id is kept for the next event.
        check("id: a\n\ndata: x\n\n", &[(Some("a"), "x")]);
    }

    #[test]
    fn id_persists_and_resets() {
        check(
            "id: a\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n",
            &[(Some("a"), "1"), (Some("a"), "2"), (None, "3")],
        );
        // An id with a NUL is ignored.
        check("id: a\n\nid: b\0c\ndata: x\n\n", &[(Some("a"), "x")]);
    }

    #[test]
    fn event_type() {
        let events = parse_chunks(&[b"event: status\ndata: 1\n\ndata: 2\n\n"]);
        assert_eq!(events[0].event.as_deref(), Some("status"));
        assert_eq!(events[1].event, None, "the event type does not persist");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        check("foo: bar\ndata: a\nDATA: b\n\n", &[(None, "a")]);
    }

    #[test]
    fn incomplete_event_at_end_is_not_dispatched() {
        check("data: a\n\ndata: b\n", &[(None, "a")]);
        check("data: a\n\ndata: b", &[(None, "a")]);
    }

    #[test]
    fn byte_order_mark() {
        check("\u{feff}data: a\n\n", &[(None, "a")]);
        // Only at the very start.
        let events = parse_chunks(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]);
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn utf8_split_across_chunks() {
        check("data: héllo → 世界\n\n", &[(None, "héllo → 世界")]);
        let events = parse_chunks(&[b"data: \xFF\n\n"]);
        assert_eq!(events[0].data, "\u{fffd}");
    }

    #[test]
    fn last_event_id_accessor() {
        let mut p = SseParser::new();
        assert_eq!(p.last_event_id(), None);
        p.push(b"id: ready\ndata: x\n\n").unwrap();
        assert_eq!(p.last_event_id(), Some("ready"));
    }

    #[test]
    fn long_lines_are_refused() {
        let mut p = SseParser::new();
        let big = vec![b'a'; MAX_LINE_BYTES / 2 + 1];
        p.push(&big).unwrap();
        assert_eq!(p.push(&big), Err(SseError::LineTooLong { limit: MAX_LINE_BYTES }));
        // Many short lines are fine.
        let many = "data: x\n\n".repeat(200_000);
        assert_eq!(SseParser::new().push(many.as_bytes()).unwrap().len(), 200_000);
    }
}
