//! Errors as one line, for protocols that carry a message rather than a chain (gRPC, logs of a failed stage).

/// `error` and each of its causes, joined by `: `, each said once: a cause whose text already ends the message
/// (some transport errors repeat their source) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("starting VM web1")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to QMP: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn chain_joins_causes_once() {
        let error = Outer(Middle(std::io::Error::other("no such file")));
        assert_eq!(error_chain(&error), "starting VM web1: connecting to QMP: no such file");
    }

    #[test]
    fn single_error_is_its_message() {
        assert_eq!(error_chain(&std::io::Error::other("boom")), "boom");
    }
}
