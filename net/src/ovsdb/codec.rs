//! Splitting the byte stream into JSON texts.
//!
//! OVSDB (like every JSON-RPC over a stream) sends JSON objects back to back with no separator: a read may return
//! half a message, or three and a bit. [`Framer`] finds where each top-level value ends by tracking nesting depth
//! and strings, incrementally (each byte is looked at once however the reads split it), and hands out complete
//! texts for serde to parse. Pure code over bytes, so the framing rules are unit-tested without a socket.

use std::ops::Range;

/// Why the stream cannot be framed any more. Either way the connection must be dropped: the position of the next
/// message is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// Something other than an object or array at the top level.
    #[error("unexpected byte {byte:#04x} between messages")]
    Unexpected { byte: u8 },
    /// A message grew past the limit.
    #[error("message longer than {max} bytes")]
    TooLong { max: usize },
}

/// An incremental splitter of concatenated JSON objects and arrays.
#[derive(Debug)]
pub(crate) struct Framer {
    buf: Vec<u8>,
    /// Start of the message being scanned (or of unscanned input between messages).
    start: usize,
    /// Bytes before this were scanned already.
    scanned: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    max: usize,
}

/// Room made before each read.
const READ_CHUNK: usize = 64 * 1024;

impl Framer {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
            scanned: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            max,
        }
    }

    /// The buffer to read more input into (append only). Consumed messages are dropped from its front first.
    pub(crate) fn read_buf(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }

    /// The next complete message, if the input holds one. Call until `Ok(None)`, then read more.
    pub(crate) fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        match self.scan()? {
            Some(range) => Ok(Some(&self.buf[range])),
            None => Ok(None),
        }
    }

    fn scan(&mut self) -> Result<Option<Range<usize>>, FrameError> {
        while self.scanned < self.buf.len() {
            let byte = self.buf[self.scanned];
            self.scanned += 1;
            if self.depth == 0 {
                match byte {
                    b' ' | b'\t' | b'\r' | b'\n' => self.start = self.scanned,
                    b'{' | b'[' => self.depth = 1,
                    byte => return Err(FrameError::Unexpected { byte }),
                }
                continue;
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let frame = self.start..self.scanned;
                        self.start = self.scanned;
                        return Ok(Some(frame));
                    }
                }
                _ => {}
            }
        }
        if self.depth > 0 && self.buf.len() - self.start > self.max {
            return Err(FrameError::TooLong { max: self.max });
        }
        Ok(None)
    }

    /// Bytes of an unfinished message held, for a log line when the peer closes mid-message.
    pub(crate) fn partial_len(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut Framer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(frame) = framer.next_frame().unwrap() {
            out.push(String::from_utf8(frame.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn back_to_back_messages_split() {
        let mut f = Framer::new(1 << 20);
        f.read_buf().extend_from_slice(br#"{"id":1,"result":[]}{"id":null,"method":"update2"}  [1,2]"#);
        assert_eq!(frames(&mut f), [r#"{"id":1,"result":[]}"#, r#"{"id":null,"method":"update2"}"#, "[1,2]"]);
        assert_eq!(f.partial_len(), 0);
    }

    #[test]
    fn braces_and_quotes_inside_strings_do_not_count() {
        let text = r#"{"a":"}{\"]","b":"\\","c":["x\"{"]}"#;
        let mut f = Framer::new(1 << 20);
        f.read_buf().extend_from_slice(text.as_bytes());
        f.read_buf().extend_from_slice(b"\n{}");
        assert_eq!(frames(&mut f), [text, "{}"]);
        let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(parsed["b"], "\\");
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_messages() {
        let input = r#"{"id":1,"result":{"Interface":{"u":{"initial":{"name":"p\"1}","ofport":1}}}},"error":null} {"method":"echo","params":[],"id":"echo"}[{"count":1}]"#;
        let mut whole = Framer::new(1 << 20);
        whole.read_buf().extend_from_slice(input.as_bytes());
        let expected = frames(&mut whole);
        assert_eq!(expected.len(), 3);
        for chunk in 1..=7 {
            let mut f = Framer::new(1 << 20);
            let mut got = Vec::new();
            for piece in input.as_bytes().chunks(chunk) {
                f.read_buf().extend_from_slice(piece);
                got.extend(frames(&mut f));
            }
            assert_eq!(got, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn garbage_between_messages_is_an_error() {
        let mut f = Framer::new(1 << 20);
        f.read_buf().extend_from_slice(b"{}x{}");
        assert!(f.next_frame().unwrap().is_some());
        assert_eq!(f.next_frame().unwrap_err(), FrameError::Unexpected { byte: b'x' });
    }

    #[test]
    fn long_messages_are_refused() {
        let mut f = Framer::new(16);
        f.read_buf().extend_from_slice(br#"{"a":"0123456789abcdef"#);
        assert_eq!(f.next_frame().unwrap_err(), FrameError::TooLong { max: 16 });
        let mut f = Framer::new(16);
        f.read_buf().extend_from_slice(br#"{"a":"0123"}"#);
        assert!(f.next_frame().unwrap().is_some());
    }

    #[test]
    fn unfinished_message_is_kept_for_the_next_read() {
        let mut f = Framer::new(1 << 20);
        f.read_buf().extend_from_slice(br#"{"id":1}{"id":"#);
        assert_eq!(frames(&mut f), [r#"{"id":1}"#]);
        assert_eq!(f.partial_len(), 6);
        f.read_buf().extend_from_slice(b"2}");
        assert_eq!(frames(&mut f), [r#"{"id":2}"#]);
    }
}
