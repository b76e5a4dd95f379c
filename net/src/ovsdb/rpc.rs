//! JSON-RPC 1.0 as OVSDB uses it (RFC 7047 §4): requests `{"method", "params", "id"}`, responses
//! `{"result", "error", "id"}`, and notifications, which are requests with `"id": null`.

use serde::Serialize;
use serde_json::{json, Value as Json};

/// An error response's `error` member: a string (`"unknown method"`) or an object with `error` and `details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RpcError {
    pub error: String,
    pub details: Option<String>,
}

impl RpcError {
    fn from_json(json: Json) -> Self {
        match json {
            Json::String(error) => Self { error, details: None },
            Json::Object(mut members) => {
                let error = match members.remove("error") {
                    Some(Json::String(error)) => error,
                    Some(other) => other.to_string(),
                    None => Json::Object(members.clone()).to_string(),
                };
                let details = match members.remove("details") {
                    Some(Json::String(details)) => Some(details),
                    Some(other) => Some(other.to_string()),
                    None => None,
                };
                Self { error, details }
            }
            other => Self { error: other.to_string(), details: None },
        }
    }
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    /// A request the server makes of us (`echo`).
    Request { id: Json, method: String, params: Json },
    /// A notification (`update`, `update2`, `update3`, `locked`, `stolen`).
    Notification { method: String, params: Json },
    /// The answer to one of our requests.
    Response { id: Json, result: Result<Json, RpcError> },
}

/// Why a message from the server is not JSON-RPC.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("not JSON")]
    Json(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotObject,
    #[error("`method` is not a string")]
    MethodNotString,
    #[error("neither a request nor a response (members {members:?})")]
    Unknown { members: Vec<String> },
}

/// Classifies one message.
pub(crate) fn parse_message(bytes: &[u8]) -> Result<Message, ParseError> {
    let json: Json = serde_json::from_slice(bytes).map_err(ParseError::Json)?;
    let Json::Object(mut members) = json else {
        return Err(ParseError::NotObject);
    };
    let id = members.remove("id").unwrap_or(Json::Null);
    if let Some(method) = members.remove("method") {
        let Json::String(method) = method else {
            return Err(ParseError::MethodNotString);
        };
        let params = members.remove("params").unwrap_or(Json::Null);
        return Ok(if id.is_null() {
            Message::Notification { method, params }
        } else {
            Message::Request { id, method, params }
        });
    }
    if members.contains_key("result") || members.contains_key("error") {
        let error = members.remove("error").unwrap_or(Json::Null);
        let result = if error.is_null() {
            Ok(members.remove("result").unwrap_or(Json::Null))
        } else {
            Err(RpcError::from_json(error))
        };
        return Ok(Message::Response { id, result });
    }
    Err(ParseError::Unknown { members: members.keys().cloned().collect() })
}

/// A request or notification, serialized from borrowed parts (a large transaction's params are not copied).
#[derive(Serialize)]
struct Request<'a> {
    method: &'a str,
    params: &'a Json,
    /// `None` (null) for a notification.
    id: Option<u64>,
}

/// A request with a numeric id.
pub(crate) fn encode_request(method: &str, params: &Json, id: u64) -> Vec<u8> {
    serde_json::to_vec(&Request { method, params, id: Some(id) }).expect("a JSON value always serializes")
}

/// A notification (`"id": null`).
pub(crate) fn encode_notification(method: &str, params: &Json) -> Vec<u8> {
    serde_json::to_vec(&Request { method, params, id: None }).expect("a JSON value always serializes")
}

/// A successful response to the server's request `id`.
pub(crate) fn encode_response(id: &Json, result: &Json) -> Vec<u8> {
    serde_json::to_vec(&json!({"result": result, "error": null, "id": id})).expect("a JSON value always serializes")
}

/// An error response to the server's request `id`.
pub(crate) fn encode_error_response(id: &Json, error: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"result": null, "error": error, "id": id})).expect("a JSON value always serializes")
}

/// At most `max` bytes of a message, lossily decoded, for log lines.
pub(crate) fn excerpt(bytes: &[u8], max: usize) -> String {
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    if bytes.len() > max {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        assert_eq!(
            parse_message(br#"{"id":1,"result":[{"count":1}],"error":null}"#).unwrap(),
            Message::Response { id: json!(1), result: Ok(json!([{"count": 1}])) }
        );
        assert_eq!(
            parse_message(br#"{"id":7,"error":"unknown method"}"#).unwrap(),
            Message::Response { id: json!(7), result: Err(RpcError { error: "unknown method".into(), details: None }) }
        );
        assert_eq!(
            parse_message(br#"{"id":5,"error":{"syntax":"[]","details":"no db Nope","error":"unknown database"}}"#)
                .unwrap(),
            Message::Response {
                id: json!(5),
                result: Err(RpcError { error: "unknown database".into(), details: Some("no db Nope".into()) })
            }
        );
    }

    #[test]
    fn requests_and_notifications_parse() {
        assert_eq!(
            parse_message(br#"{"id":"echo","method":"echo","params":[]}"#).unwrap(),
            Message::Request { id: json!("echo"), method: "echo".into(), params: json!([]) }
        );
        assert_eq!(
            parse_message(br#"{"id":null,"method":"update2","params":["m",{}]}"#).unwrap(),
            Message::Notification { method: "update2".into(), params: json!(["m", {}]) }
        );
        assert_eq!(
            parse_message(br#"{"method":"locked","params":["l"]}"#).unwrap(),
            Message::Notification { method: "locked".into(), params: json!(["l"]) }
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [&b"[1]"[..], b"nope", br#"{"method":1,"id":1}"#, br#"{"id":1}"#] {
            assert!(parse_message(bad).is_err(), "{}", excerpt(bad, 50));
        }
    }

    #[test]
    fn encodings() {
        let v: Json = serde_json::from_slice(&encode_request("list_dbs", &json!([]), 3)).unwrap();
        assert_eq!(v, json!({"method": "list_dbs", "params": [], "id": 3}));
        let v: Json = serde_json::from_slice(&encode_notification("cancel", &json!([3]))).unwrap();
        assert_eq!(v, json!({"method": "cancel", "params": [3], "id": null}));
        let v: Json = serde_json::from_slice(&encode_response(&json!("e"), &json!(["x"]))).unwrap();
        assert_eq!(v, json!({"result": ["x"], "error": null, "id": "e"}));
        let v: Json = serde_json::from_slice(&encode_error_response(&json!(1), "unknown method")).unwrap();
        assert_eq!(v["error"], "unknown method");
        assert_eq!(excerpt(b"abcdef", 3), "abc…");
    }
}
