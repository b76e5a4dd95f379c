//! The QMP wire format, which QGA shares: the greeting, command encoding, and classifying each line the peer sends.
//!
//! Pure functions over bytes, so the framing rules are unit-tested without a socket.

use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// QEMU's greeting, sent once when a client connects, before capabilities negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU major version (7 for QEMU 7.2).
    pub major: u64,
    /// QEMU minor version.
    pub minor: u64,
    /// QEMU micro version.
    pub micro: u64,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18`; empty if QEMU sent none.
    pub package: String,
    /// Capabilities QEMU offers, e.g. `["oob"]`. This client enables none of them.
    pub capabilities: Vec<String>,
}

/// An asynchronous event QEMU emitted, e.g. `STOP`, `RESUME`, `SHUTDOWN`, `DEVICE_DELETED`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// The event's `data` member; `Value::Null` for events without data (such as `STOP`).
    pub data: Value,
    /// Seconds part of QEMU's host-clock timestamp; 0 if QEMU sent none.
    pub seconds: i64,
    /// Microseconds part of the timestamp; 0 if QEMU sent none.
    pub microseconds: i64,
}

/// What an event subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An event QEMU emitted.
    Qemu(QmpEvent),
    /// The connection is closed; sent once to every subscriber, and nothing follows it.
    Closed {
        /// Why, e.g. the peer closed the socket (QEMU exited) or a read failed.
        reason: String,
    },
}

/// QEMU's answer to a command that failed: `{"error": {"class": .., "desc": ..}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorReply {
    pub class: String,
    pub desc: String,
}

/// One message from the server, after the greeting.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    /// A reply; `id` is whatever QEMU echoed (this client always sends an unsigned integer).
    Reply { id: Option<Value>, result: Result<Value, ErrorReply> },
    /// An asynchronous event.
    Event(QmpEvent),
}

/// Why a line from the server was not a QMP message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("not JSON")]
    Json(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotObject,
    #[error("`error` member is not an object")]
    ErrorNotObject,
    #[error("`event` member is not a string")]
    EventNotString,
    #[error("a second greeting")]
    UnexpectedGreeting,
    #[error("unknown message with members {members:?}")]
    Unknown { members: Vec<String> },
}

#[derive(Deserialize)]
struct RawGreeting {
    #[serde(rename = "QMP")]
    qmp: RawGreetingBody,
}

#[derive(Deserialize)]
struct RawGreetingBody {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: RawTriple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct RawTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

/// Parses the first line QEMU sends: `{"QMP": {"version": {"qemu": {..}, "package": ..}, "capabilities": [..]}}`.
pub(crate) fn parse_greeting(line: &[u8]) -> Result<Greeting, serde_json::Error> {
    let raw: RawGreeting = serde_json::from_slice(line)?;
    let RawGreetingBody { version, capabilities } = raw.qmp;
    Ok(Greeting {
        major: version.qemu.major,
        minor: version.qemu.minor,
        micro: version.qemu.micro,
        package: version.package,
        capabilities,
    })
}

#[derive(Serialize)]
struct Execute<'a> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
}

/// Encodes one command as a newline-terminated JSON line; without `id` for a command whose reply nobody awaits.
pub(crate) fn encode_command(
    command: &str,
    arguments: Option<&Value>,
    id: Option<u64>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = serde_json::to_vec(&Execute { execute: command, arguments, id })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Classifies one line (without caring about the trailing `\r\n`) as a reply or an event.
pub(crate) fn parse_message(line: &[u8]) -> Result<Message, ParseError> {
    let value: Value = serde_json::from_slice(line).map_err(ParseError::Json)?;
    let Value::Object(mut map) = value else {
        return Err(ParseError::NotObject);
    };
    if let Some(value) = map.remove("return") {
        return Ok(Message::Reply { id: map.remove("id"), result: Ok(value) });
    }
    if let Some(error) = map.remove("error") {
        let Value::Object(error) = error else {
            return Err(ParseError::ErrorNotObject);
        };
        return Ok(Message::Reply { id: map.remove("id"), result: Err(error_reply(error)) });
    }
    if let Some(name) = map.remove("event") {
        let Value::String(name) = name else {
            return Err(ParseError::EventNotString);
        };
        let timestamp = map.get("timestamp");
        let field = |key: &str| timestamp.and_then(|t| t.get(key)).and_then(Value::as_i64).unwrap_or(0);
        return Ok(Message::Event(QmpEvent {
            seconds: field("seconds"),
            microseconds: field("microseconds"),
            data: map.remove("data").unwrap_or(Value::Null),
            name,
        }));
    }
    if map.contains_key("QMP") {
        return Err(ParseError::UnexpectedGreeting);
    }
    Err(ParseError::Unknown { members: map.keys().cloned().collect() })
}

/// A malformed error object still fails its command, rather than leaving it to time out.
fn error_reply(mut error: Map<String, Value>) -> ErrorReply {
    let class = match error.remove("class") {
        Some(Value::String(class)) => class,
        _ => String::new(),
    };
    let desc = match error.remove("desc") {
        Some(Value::String(desc)) => desc,
        _ => String::new(),
    };
    ErrorReply { class, desc }
}

/// Reads one `\n`-terminated line into `buf` (cleared first). Returns `Ok(false)` at end of file; an unterminated
/// tail at end of file is dropped. A line longer than `max` bytes is an `InvalidData` error: the framing is lost.
pub(crate) async fn read_line<R>(reader: &mut R, buf: &mut Vec<u8>, max: usize) -> io::Result<bool>
where
    R: AsyncBufRead + Unpin,
{
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if !buf.is_empty() {
                tracing::warn!(bytes = buf.len(), "QMP socket closed in the middle of a message; dropping it");
            }
            return Ok(false);
        }
        let (used, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        if buf.len() + used > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("QMP message longer than {max} bytes")));
        }
        buf.extend_from_slice(&available[..used]);
        reader.consume(used);
        if complete {
            return Ok(true);
        }
    }
}

/// At most `max` bytes of a line, lossily decoded, for log messages and errors.
pub(crate) fn excerpt(line: &[u8], max: usize) -> String {
    let line = line.trim_ascii();
    let mut text = String::from_utf8_lossy(&line[..line.len().min(max)]).into_owned();
    if line.len() > max {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn greeting_parses() {
        let greeting = parse_greeting(GREETING).unwrap();
        assert_eq!(
            greeting,
            Greeting {
                major: 7,
                minor: 2,
                micro: 22,
                package: "Debian 1:7.2+dfsg-7+deb12u18".into(),
                capabilities: vec!["oob".into()],
            }
        );
    }

    #[test]
    fn greeting_without_package_or_capabilities_parses() {
        let greeting =
            parse_greeting(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}}}}"#).unwrap();
        assert_eq!((greeting.major, greeting.package.as_str()), (9, ""));
        assert!(greeting.capabilities.is_empty());
    }

    #[test]
    fn greeting_rejects_other_messages() {
        assert!(parse_greeting(br#"{"return": {}}"#).is_err());
        assert!(parse_greeting(b"garbage").is_err());
        assert!(parse_greeting(br#"{"QMP": {"version": {"qemu": {"major": "7"}}}}"#).is_err());
    }

    #[test]
    fn command_encodes_as_one_line() {
        let bytes = encode_command("getfd", Some(&json!({"fdname": "tap0"})), Some(7)).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value, json!({"execute": "getfd", "arguments": {"fdname": "tap0"}, "id": 7}));

        let bytes = encode_command("query-status", None, Some(8)).unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value, json!({"execute": "query-status", "id": 8}));
    }

    #[test]
    fn argument_strings_with_newlines_stay_on_one_line() {
        let bytes = encode_command("human-monitor-command", Some(&json!({"command-line": "a\nb"})), Some(1)).unwrap();
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn return_parses() {
        let message = parse_message(b"{\"return\": {\"running\": true}, \"id\": 3}\r\n").unwrap();
        assert_eq!(message, Message::Reply { id: Some(json!(3)), result: Ok(json!({"running": true})) });
    }

    #[test]
    fn error_parses() {
        let message = parse_message(
            br#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
        )
        .unwrap();
        assert_eq!(
            message,
            Message::Reply {
                id: Some(json!(4)),
                result: Err(ErrorReply {
                    class: "CommandNotFound".into(),
                    desc: "The command nope has not been found".into()
                }),
            }
        );
    }

    #[test]
    fn error_without_class_still_fails_the_command() {
        let message = parse_message(br#"{"id": 4, "error": {}}"#).unwrap();
        assert_eq!(
            message,
            Message::Reply {
                id: Some(json!(4)),
                result: Err(ErrorReply { class: String::new(), desc: String::new() })
            }
        );
    }

    #[test]
    fn event_parses() {
        let message = parse_message(
            br#"{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
        )
        .unwrap();
        assert_eq!(
            message,
            Message::Event(QmpEvent {
                name: "SHUTDOWN".into(),
                data: json!({"guest": true, "reason": "guest-shutdown"}),
                seconds: 1_700_000_000,
                microseconds: 123_456,
            })
        );
    }

    #[test]
    fn event_without_data_has_null_data() {
        let Message::Event(event) =
            parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#).unwrap()
        else {
            panic!("not an event");
        };
        assert_eq!((event.name.as_str(), event.data, event.seconds), ("STOP", Value::Null, 1));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for line in [
            &b"not json"[..],
            b"[1, 2]",
            b"42",
            br#"{"error": "string"}"#,
            br#"{"event": 5}"#,
            br#"{"something": "else"}"#,
            GREETING,
            b"{\"return\": \xff}",
            b"",
        ] {
            assert!(parse_message(line).is_err(), "{}", excerpt(line, 100));
        }
    }

    #[tokio::test]
    async fn read_line_splits_lines_and_reports_eof() {
        let mut input: &[u8] = b"{\"a\": 1}\r\n{\"b\": 2}\npartial";
        let mut buf = Vec::new();
        assert!(read_line(&mut input, &mut buf, 1024).await.unwrap());
        assert_eq!(buf, b"{\"a\": 1}\r\n");
        assert!(read_line(&mut input, &mut buf, 1024).await.unwrap());
        assert_eq!(buf, b"{\"b\": 2}\n");
        assert!(!read_line(&mut input, &mut buf, 1024).await.unwrap());
    }

    #[tokio::test]
    async fn read_line_limits_length() {
        let long = [b'x'; 100];
        let mut input: &[u8] = &long;
        let mut buf = Vec::new();
        let err = read_line(&mut input, &mut buf, 64).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn excerpt_truncates() {
        assert_eq!(excerpt(b"  abcdef\r\n", 3), "abc…");
        assert_eq!(excerpt(b"abc\r\n", 3), "abc");
    }
}
