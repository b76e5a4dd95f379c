//! [`QmpClient`]: the QMP front end on a [`Channel`]: the greeting, `qmp_capabilities`, and commands raw or typed.
//!
//! Line framing, ids, timeouts, fd passing and events are the channel's; this file adds what only QMP has.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::BufReader;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::debug;

use crate::channel::{self, Channel, LOG_EXCERPT, MAX_MESSAGE_LEN};
use crate::error::Error;
use crate::events::Status;
use crate::protocol::{self, Event, Greeting};

/// Timeouts for [`QmpClient::connect`] and [`QmpClient::from_stream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// How long to keep trying to connect and to wait for the greeting. Default: 5 s.
    pub connect_timeout: Duration,
    /// How long each command waits for its reply, unless given its own timeout
    /// ([`QmpClient::execute_raw_timeout`]). Also bounds capabilities negotiation. Default: 30 s.
    pub command_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(5), command_timeout: Duration::from_secs(30) }
    }
}

/// What `add-fd` returns: the fd set the descriptor went into and its number inside QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddFdInfo {
    /// The fd set's id; pass `/dev/fdset/<fdset_id>` as a file name to QEMU.
    pub fdset_id: i64,
    /// The descriptor's number in the QEMU process.
    pub fd: i64,
}

/// An async QMP client over a unix socket, negotiated and ready for commands.
///
/// Clones share the connection. Commands may be issued concurrently from any number of tasks; replies are matched
/// by id. When the last clone is dropped, the connection is closed and its tasks stop.
///
/// It must be created inside a tokio runtime, which runs its reader and writer tasks.
#[derive(Clone)]
pub struct QmpClient {
    channel: Channel,
    info: Arc<Info>,
}

struct Info {
    greeting: Greeting,
    opts: ConnectOptions,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.info.greeting)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects to the QMP unix socket at `path`, reads the greeting and negotiates capabilities (none enabled).
    ///
    /// While the socket does not exist yet or refuses connections, as while QEMU is starting, connecting is
    /// retried with a short backoff until `opts.connect_timeout`, which also bounds waiting for the greeting.
    pub async fn connect(path: impl AsRef<Path>, opts: ConnectOptions) -> Result<Self, Error> {
        let path = path.as_ref();
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = channel::connect_with_retry(path, deadline).await?;
        debug!(path = %path.display(), "QMP socket connected");
        Self::handshake(stream, opts, deadline).await
    }

    /// Like [`connect`](Self::connect), over a stream the caller connected (or received) itself.
    pub async fn from_stream(stream: UnixStream, opts: ConnectOptions) -> Result<Self, Error> {
        let deadline = Instant::now() + opts.connect_timeout;
        Self::handshake(stream, opts, deadline).await
    }

    async fn handshake(stream: UnixStream, opts: ConnectOptions, deadline: Instant) -> Result<Self, Error> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = read_greeting(&mut reader, opts.connect_timeout, deadline).await?;
        debug!(
            version = %format_args!("{}.{}.{}", greeting.major, greeting.minor, greeting.micro),
            package = %greeting.package,
            capabilities = ?greeting.capabilities,
            "QMP greeting received"
        );
        // QEMU answers only the connection that sent a command, so ids need not be unique beyond it.
        let channel = Channel::start(reader, write, "QMP", 0);
        let client = QmpClient { channel, info: Arc::new(Info { greeting, opts }) };
        client
            .execute_raw("qmp_capabilities", None)
            .await
            .map_err(|source| Error::Negotiate { source: Box::new(source) })?;
        Ok(client)
    }

    /// QEMU's greeting, as received on connect.
    pub fn greeting(&self) -> &Greeting {
        &self.info.greeting
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns QEMU's `return` value, waiting at most
    /// `command_timeout` for it.
    ///
    /// This is the path for commands whose shape the typed `qapi-qmp` definitions get wrong for QEMU 7.2; the
    /// places that need it are listed in [`crate::commands`].
    pub async fn execute_raw(&self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.execute_raw_timeout(command, arguments, self.info.opts.command_timeout).await
    }

    /// Like [`execute_raw`](Self::execute_raw) with its own timeout, e.g. for a long `blockdev-*` job.
    ///
    /// On timeout the command may still run in QEMU; its late reply is dropped.
    pub async fn execute_raw_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.channel.request(command, arguments.as_ref(), None, timeout).await
    }

    /// Runs a typed command (any [`qapi_spec::Command`]: `qapi-qmp`'s, or this crate's [`crate::commands`] where
    /// `qapi-qmp` and QEMU 7.2 disagree), waiting at most `command_timeout`.
    ///
    /// `qapi-qmp` 0.15 follows QEMU 9.1's schema, so on older QEMU a reply can fail to decode
    /// ([`Error::Decode`]) even though the command succeeded.
    pub async fn execute<C: qapi_spec::Command>(&self, command: C) -> Result<C::Ok, Error> {
        self.execute_timeout(command, self.info.opts.command_timeout).await
    }

    /// Like [`execute`](Self::execute) with its own timeout.
    pub async fn execute_timeout<C: qapi_spec::Command>(&self, command: C, timeout: Duration) -> Result<C::Ok, Error> {
        let arguments = encode_arguments(&command)?;
        let reply = self.channel.request(C::NAME, arguments.as_ref(), None, timeout).await?;
        decode_reply::<C>(reply)
    }

    /// Runs `command` with `fd` passed by `SCM_RIGHTS` in the same `sendmsg` as the command's first bytes, which is
    /// how QEMU associates a descriptor with a command. The descriptor is duplicated for the send, so the caller
    /// keeps ownership of `fd`.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, Error> {
        // The writer task may send after this future is gone (it always finishes a command it started), so it gets
        // a descriptor of its own rather than a borrow the caller could close underneath it.
        let fd = fd.try_clone_to_owned().map_err(|source| Error::FdPass { command: command.to_owned(), source })?;
        self.channel.request(command, arguments.as_ref(), Some(fd), self.info.opts.command_timeout).await
    }

    /// `getfd`: hands `fd` to QEMU under `fdname`, for later commands that take an fd name (`netdev_add` with
    /// `fd=...`, `add_client`, ...).
    pub async fn getfd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": fdname })), fd).await?;
        Ok(())
    }

    /// `closefd`: closes the descriptor QEMU holds under `fdname`.
    pub async fn closefd(&self, fdname: &str) -> Result<(), Error> {
        self.execute(qapi_qmp::closefd { fdname: fdname.to_owned() }).await.map(drop)
    }

    /// `add-fd`: adds `fd` to fd set `fdset_id` (a new set if `None`), with an optional `opaque` note shown by
    /// `query-fdsets`.
    pub async fn add_fd(
        &self,
        fdset_id: Option<i64>,
        opaque: Option<&str>,
        fd: BorrowedFd<'_>,
    ) -> Result<AddFdInfo, Error> {
        let command = qapi_qmp::add_fd { fdset_id, opaque: opaque.map(str::to_owned) };
        let arguments = encode_arguments(&command)?;
        let reply = self.execute_with_fd("add-fd", arguments, fd).await?;
        let qapi_qmp::AddfdInfo { fdset_id, fd } = decode_reply::<qapi_qmp::add_fd>(reply)?;
        Ok(AddFdInfo { fdset_id, fd })
    }

    /// `query-status`: whether the vCPUs run and QEMU's run state.
    pub async fn query_status(&self) -> Result<Status, Error> {
        let status = self.execute(qapi_qmp::query_status {}).await?;
        Ok(Status { running: status.running, state: status.status.into() })
    }

    /// Subscribes to events. Each receiver gets every event emitted after it subscribed, then exactly one
    /// [`Event::Closed`] when the connection closes (at once if it already has), then `RecvError::Closed`.
    /// [`crate::QmpEvent::typed`] reads an event's data into [`crate::QemuEvent`].
    ///
    /// A receiver more than 256 events behind gets `RecvError::Lagged` and misses the oldest ones.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.channel.subscribe()
    }

    /// Whether the connection is closed: QEMU closed it or exited, reading or writing failed.
    pub fn is_closed(&self) -> bool {
        self.channel.is_closed()
    }

    /// Resolves when the connection is closed; at once if it already is.
    pub async fn closed(&self) {
        self.channel.closed().await
    }

    #[cfg(test)]
    fn pending_len(&self) -> usize {
        self.channel.pending_len()
    }
}

/// A typed command's arguments as the JSON object QMP wants; `None` for a command without any.
pub(crate) fn encode_arguments<C: qapi_spec::Command>(command: &C) -> Result<Option<Value>, Error> {
    let arguments =
        serde_json::to_value(command).map_err(|source| Error::Encode { command: C::NAME.to_owned(), source })?;
    Ok(match arguments {
        Value::Null => None,
        Value::Object(map) if map.is_empty() => None,
        arguments => Some(arguments),
    })
}

pub(crate) fn decode_reply<C: qapi_spec::Command>(reply: Value) -> Result<C::Ok, Error> {
    serde_json::from_value(reply).map_err(|source| Error::Decode { command: C::NAME.to_owned(), source })
}

async fn read_greeting(
    reader: &mut BufReader<OwnedReadHalf>,
    timeout: Duration,
    deadline: Instant,
) -> Result<Greeting, Error> {
    let mut line = Vec::new();
    let read = tokio::time::timeout_at(deadline, protocol::read_line(reader, &mut line, MAX_MESSAGE_LEN)).await;
    match read {
        Err(_) => Err(Error::Greeting { reason: format!("none received within {timeout:?}"), source: None }),
        Ok(Err(source)) => Err(Error::Greeting { reason: "reading it failed".to_owned(), source: Some(source) }),
        Ok(Ok(false)) => {
            Err(Error::Greeting { reason: "the socket closed before it arrived".to_owned(), source: None })
        }
        Ok(Ok(true)) => protocol::parse_greeting(&line).map_err(|source| Error::Greeting {
            reason: format!("not a QMP greeting: {}", protocol::excerpt(&line, LOG_EXCERPT)),
            source: Some(source.into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdpass;
    use crate::protocol::QmpEvent;
    use std::io;
    use std::os::fd::AsFd;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
    const WAIT: Duration = Duration::from_secs(5);

    fn opts() -> ConnectOptions {
        ConnectOptions { connect_timeout: Duration::from_secs(2), command_timeout: Duration::from_secs(5) }
    }

    /// The QEMU end of the socket, scripted by each test.
    struct FakeQemu {
        read: BufReader<OwnedReadHalf>,
        write: OwnedWriteHalf,
    }

    impl FakeQemu {
        fn new(stream: UnixStream) -> Self {
            let (read, write) = stream.into_split();
            Self { read: BufReader::new(read), write }
        }

        async fn send_line(&mut self, line: &str) {
            self.write.write_all(line.as_bytes()).await.unwrap();
            self.write.write_all(b"\r\n").await.unwrap();
        }

        async fn send(&mut self, message: Value) {
            self.send_line(&message.to_string()).await;
        }

        /// The next command the client sent, as JSON.
        async fn recv(&mut self) -> Value {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.read.read_line(&mut line)).await.expect("no command").unwrap();
            assert!(n > 0, "client closed the socket");
            assert!(line.ends_with('\n'));
            serde_json::from_str(&line).unwrap()
        }

        /// Reads a command and checks its name; returns its id.
        async fn expect(&mut self, command: &str) -> Value {
            let message = self.recv().await;
            assert_eq!(message["execute"], command, "{message}");
            message["id"].clone()
        }

        async fn reply(&mut self, id: Value, value: Value) {
            self.send(json!({"return": value, "id": id})).await;
        }

        async fn greet_and_negotiate(&mut self) {
            self.send_line(GREETING).await;
            let id = self.expect("qmp_capabilities").await;
            self.reply(id, json!({})).await;
        }

        /// Waits until the client side of the socket is closed.
        async fn expect_eof(&mut self) {
            let mut rest = Vec::new();
            tokio::time::timeout(WAIT, self.read.read_to_end(&mut rest))
                .await
                .expect("client kept the socket open")
                .unwrap();
        }
    }

    async fn connected() -> (QmpClient, FakeQemu) {
        let (client, server) = UnixStream::pair().unwrap();
        let mut qemu = FakeQemu::new(server);
        let (client, ()) = tokio::join!(QmpClient::from_stream(client, opts()), qemu.greet_and_negotiate());
        (client.unwrap(), qemu)
    }

    async fn next_event(events: &mut broadcast::Receiver<Event>) -> Event {
        tokio::time::timeout(WAIT, events.recv()).await.expect("no event").unwrap()
    }

    #[tokio::test]
    async fn greeting_and_negotiation() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut qemu = FakeQemu::new(server);
        let server = async {
            qemu.send_line(GREETING).await;
            let message = qemu.recv().await;
            assert_eq!(message["execute"], "qmp_capabilities");
            assert!(message.get("arguments").is_none(), "{message}");
            assert!(message["id"].is_u64(), "{message}");
            qemu.reply(message["id"].clone(), json!({})).await;
        };
        let (client, ()) = tokio::join!(QmpClient::from_stream(client, opts()), server);
        let client = client.unwrap();
        let greeting = client.greeting();
        assert_eq!((greeting.major, greeting.minor, greeting.micro), (7, 2, 22));
        assert_eq!(greeting.package, "Debian 1:7.2+dfsg-7+deb12u18");
        assert_eq!(greeting.capabilities, ["oob"]);
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn negotiation_error_is_reported() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut qemu = FakeQemu::new(server);
        let server = async {
            qemu.send_line(GREETING).await;
            let id = qemu.expect("qmp_capabilities").await;
            qemu.send(json!({"error": {"class": "GenericError", "desc": "nope"}, "id": id})).await;
        };
        let (result, ()) = tokio::join!(QmpClient::from_stream(client, opts()), server);
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Negotiate { .. }), "{err:?}");
        assert_eq!(err.class(), Some("GenericError"));
    }

    #[tokio::test]
    async fn bad_greetings_are_errors() {
        for line in ["not json", r#"{"return": {}}"#, r#"{"QMP": {"version": {}}}"#] {
            let (client, server) = UnixStream::pair().unwrap();
            let mut qemu = FakeQemu::new(server);
            qemu.send_line(line).await;
            let err = QmpClient::from_stream(client, opts()).await.unwrap_err();
            assert!(matches!(err, Error::Greeting { source: Some(_), .. }), "{line}: {err:?}");
        }

        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        let err = QmpClient::from_stream(client, opts()).await.unwrap_err();
        assert!(matches!(err, Error::Greeting { source: None, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn missing_greeting_times_out() {
        let (client, _server) = UnixStream::pair().unwrap();
        let opts = ConnectOptions { connect_timeout: Duration::from_millis(100), ..opts() };
        let started = std::time::Instant::now();
        let err = QmpClient::from_stream(client, opts).await.unwrap_err();
        assert!(matches!(err, Error::Greeting { source: None, .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn concurrent_commands_get_their_own_replies_out_of_order() {
        let (client, mut qemu) = connected().await;
        let server = async {
            let first = qemu.recv().await;
            let second = qemu.recv().await;
            assert_ne!(first["id"], second["id"]);
            // Answer in reverse order, each with its command's name in the reply.
            for message in [second, first] {
                qemu.reply(message["id"].clone(), json!({"for": message["execute"]})).await;
            }
        };
        let (a, b, ()) =
            tokio::join!(client.execute_raw("query-status", None), client.execute_raw("query-version", None), server);
        assert_eq!(a.unwrap(), json!({"for": "query-status"}));
        assert_eq!(b.unwrap(), json!({"for": "query-version"}));
        assert_eq!(client.pending_len(), 0);
    }

    #[tokio::test]
    async fn arguments_are_sent() {
        let (client, mut qemu) = connected().await;
        let server = async {
            let message = qemu.recv().await;
            assert_eq!(message["arguments"], json!({"device": "virtio-disk0"}));
            qemu.reply(message["id"].clone(), json!({})).await;
        };
        let (result, ()) =
            tokio::join!(client.execute_raw("device_del", Some(json!({"device": "virtio-disk0"}))), server);
        assert_eq!(result.unwrap(), json!({}));
    }

    #[tokio::test]
    async fn error_reply_is_a_command_error() {
        let (client, mut qemu) = connected().await;
        let server = async {
            let id = qemu.expect("nope").await;
            qemu.send(
                json!({"id": id, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}),
            )
            .await;
        };
        let (result, ()) = tokio::join!(client.execute_raw("nope", None), server);
        match result.unwrap_err() {
            Error::Command { command, class, desc } => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command nope has not been found");
            }
            err => panic!("{err:?}"),
        }
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn typed_execute() {
        let (client, mut qemu) = connected().await;
        let server = async {
            let message = qemu.recv().await;
            assert_eq!(message["execute"], "query-status");
            assert!(message.get("arguments").is_none(), "{message}");
            qemu.reply(message["id"].clone(), json!({"status": "paused", "singlestep": false, "running": false})).await;
        };
        let (status, ()) = tokio::join!(client.execute(qapi_qmp::query_status {}), server);
        let status = status.unwrap();
        assert!(!status.running);
        assert!(matches!(status.status, qapi_qmp::RunState::paused));
    }

    #[tokio::test]
    async fn typed_execute_reports_undecodable_replies() {
        let (client, mut qemu) = connected().await;
        let server = async {
            let id = qemu.expect("query-status").await;
            qemu.reply(id, json!({"running": "maybe"})).await;
        };
        let (status, ()) = tokio::join!(client.execute(qapi_qmp::query_status {}), server);
        assert!(matches!(status.unwrap_err(), Error::Decode { .. }));
    }

    #[tokio::test]
    async fn events_reach_every_subscriber() {
        let (client, mut qemu) = connected().await;
        let mut a = client.subscribe();
        let mut b = client.subscribe();
        qemu.send(json!({"timestamp": {"seconds": 10, "microseconds": 20}, "event": "STOP"})).await;
        qemu.send(json!({
            "timestamp": {"seconds": 11, "microseconds": 21},
            "event": "SHUTDOWN",
            "data": {"guest": true, "reason": "guest-shutdown"}
        }))
        .await;
        for events in [&mut a, &mut b] {
            let stop = next_event(events).await;
            assert_eq!(
                stop,
                Event::Qemu(QmpEvent { name: "STOP".into(), data: Value::Null, seconds: 10, microseconds: 20 })
            );
            let Event::Qemu(shutdown) = next_event(events).await else { panic!("not an event") };
            assert_eq!(shutdown.name, "SHUTDOWN");
            assert_eq!(shutdown.data["reason"], "guest-shutdown");
        }
    }

    #[tokio::test]
    async fn events_interleaved_with_replies() {
        let (client, mut qemu) = connected().await;
        let mut events = client.subscribe();
        let server = async {
            let id = qemu.expect("stop").await;
            qemu.send(json!({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"})).await;
            qemu.reply(id, json!({})).await;
        };
        let (result, ()) = tokio::join!(client.execute_raw("stop", None), server);
        result.unwrap();
        let Event::Qemu(event) = next_event(&mut events).await else { panic!("not an event") };
        assert_eq!(event.name, "STOP");
    }

    #[tokio::test]
    async fn eof_mid_command_fails_it_and_closes() {
        let (client, mut qemu) = connected().await;
        let mut events = client.subscribe();
        let server = async move {
            qemu.expect("query-status").await;
            // QEMU goes away without answering.
        };
        let (result, ()) = tokio::join!(client.execute_raw("query-status", None), server);
        match result.unwrap_err() {
            Error::Closed { command } => assert_eq!(command, "query-status"),
            err => panic!("{err:?}"),
        }
        let Event::Closed { reason } = next_event(&mut events).await else { panic!("expected Closed") };
        assert!(reason.contains("closed"), "{reason}");
        // Exactly once, then the channel ends.
        let end = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
        assert!(matches!(end, Err(broadcast::error::RecvError::Closed)), "{end:?}");

        assert!(client.is_closed());
        tokio::time::timeout(WAIT, client.closed()).await.unwrap();
        assert_eq!(client.pending_len(), 0);

        // Later commands fail at once, and late subscribers still learn that it closed.
        let err = tokio::time::timeout(WAIT, client.execute_raw("query-status", None)).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err:?}");
        let mut late = client.subscribe();
        assert!(matches!(next_event(&mut late).await, Event::Closed { .. }));
    }

    #[tokio::test]
    async fn closed_resolves_when_the_peer_goes() {
        let (client, qemu) = connected().await;
        let waiter = {
            let client = client.clone();
            tokio::spawn(async move { client.closed().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(qemu);
        tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn many_waiting_commands_all_fail_on_close() {
        let (client, mut qemu) = connected().await;
        let commands: Vec<_> = (0..10)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.execute_raw("query-status", None).await })
            })
            .collect();
        for _ in 0..10 {
            qemu.expect("query-status").await;
        }
        drop(qemu);
        for command in commands {
            let result = tokio::time::timeout(WAIT, command).await.unwrap().unwrap();
            assert!(matches!(result, Err(Error::Closed { .. })), "{result:?}");
        }
    }

    #[tokio::test]
    async fn malformed_lines_are_skipped() {
        let (client, mut qemu) = connected().await;
        let mut events = client.subscribe();
        let server = async {
            let id = qemu.expect("query-status").await;
            for line in [
                "not json at all",
                "[1, 2, 3]",
                "",
                r#"{"unexpected": true}"#,
                r#"{"event": 42}"#,
                r#"{"error": "not an object", "id": 0}"#,
                r#"{"return": {}}"#,
                r#"{"return": {}, "id": "a string"}"#,
                r#"{"return": {}, "id": 999999}"#,
                GREETING,
            ] {
                qemu.send_line(line).await;
            }
            qemu.send_line("{\"return\": \u{fffd}\u{fffd}").await;
            qemu.write.write_all(b"\xff\xfe\r\n").await.unwrap();
            qemu.reply(id, json!({"status": "running"})).await;
            qemu.send(json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}})).await;
        };
        let (result, ()) = tokio::join!(client.execute_raw("query-status", None), server);
        assert_eq!(result.unwrap(), json!({"status": "running"}));
        let Event::Qemu(event) = next_event(&mut events).await else { panic!("not an event") };
        assert_eq!(event.name, "RESUME");
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn oversized_message_closes_the_connection() {
        let (client, mut qemu) = connected().await;
        let writer = tokio::spawn(async move {
            // No newline, ever: the client must give up rather than buffer without bound.
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..(MAX_MESSAGE_LEN >> 20) + 2 {
                if qemu.write.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            qemu
        });
        tokio::time::timeout(Duration::from_secs(30), client.closed()).await.unwrap();
        // The socket itself is closed, not only marked so: the writer stops with an error instead of blocking.
        let _qemu = tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn timeout_removes_the_pending_command_and_ignores_the_late_reply() {
        let (client, mut qemu) = connected().await;
        let late = Duration::from_millis(50);
        let (result, id) =
            tokio::join!(client.execute_raw_timeout("query-status", None, late), qemu.expect("query-status"));
        match result.unwrap_err() {
            Error::Timeout { command, timeout } => {
                assert_eq!((command.as_str(), timeout), ("query-status", late))
            }
            err => panic!("{err:?}"),
        }
        assert_eq!(client.pending_len(), 0);

        qemu.reply(id, json!({"late": true})).await;
        let server = async {
            let id = qemu.expect("query-version").await;
            qemu.reply(id, json!({"on": "time"})).await;
        };
        let (result, ()) = tokio::join!(client.execute_raw("query-version", None), server);
        assert_eq!(result.unwrap(), json!({"on": "time"}));
    }

    #[tokio::test]
    async fn cancelled_command_is_still_written_whole() {
        let (client, mut qemu) = connected().await;
        let command = client.execute_raw("query-status", Some(json!({"padding": "x".repeat(100_000)})));
        // Poll once so the command is queued, then drop it.
        let _ = tokio::time::timeout(Duration::from_millis(1), command).await;
        assert_eq!(client.pending_len(), 0);
        let message = qemu.recv().await;
        assert_eq!(message["arguments"]["padding"].as_str().map(str::len), Some(100_000));

        let server = async {
            let id = qemu.expect("query-version").await;
            qemu.reply(id, json!({})).await;
        };
        let (result, ()) = tokio::join!(client.execute_raw("query-version", None), server);
        result.unwrap();
    }

    #[tokio::test]
    async fn fd_is_passed_with_the_command() {
        let (client, server) = UnixStream::pair().unwrap();
        let server_std = server.into_std().unwrap();
        let server = UnixStream::from_std(server_std.try_clone().unwrap()).unwrap();
        let mut qemu = FakeQemu::new(UnixStream::from_std(server_std).unwrap());
        let (client, ()) = tokio::join!(QmpClient::from_stream(client, opts()), qemu.greet_and_negotiate());
        let client = client.unwrap();

        let (pipe_read, _pipe_write) = rustix::pipe::pipe().unwrap();
        let fake = async {
            let mut buf = vec![0u8; 4096];
            let (n, fds) = fdpass::recv_with_fds(&server, &mut buf).await.unwrap();
            assert_eq!(fds.len(), 1, "the fd must arrive with the command's first bytes");
            let line = &buf[..n];
            assert!(line.ends_with(b"\n"), "whole command in one message here");
            let message: Value = serde_json::from_slice(line).unwrap();
            assert_eq!(message["execute"], "getfd");
            assert_eq!(message["arguments"], json!({"fdname": "tap0"}));
            let ours = rustix::fs::fstat(&pipe_read).unwrap();
            let theirs = rustix::fs::fstat(&fds[0]).unwrap();
            assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));
            qemu.reply(message["id"].clone(), json!({})).await;
        };
        let (result, ()) = tokio::join!(client.getfd("tap0", pipe_read.as_fd()), fake);
        result.unwrap();
        // The caller's descriptor is still its own and open.
        rustix::fs::fstat(&pipe_read).unwrap();
    }

    #[tokio::test]
    async fn add_fd_decodes_the_reply() {
        let (client, server) = UnixStream::pair().unwrap();
        let server_std = server.into_std().unwrap();
        let server = UnixStream::from_std(server_std.try_clone().unwrap()).unwrap();
        let mut qemu = FakeQemu::new(UnixStream::from_std(server_std).unwrap());
        let (client, ()) = tokio::join!(QmpClient::from_stream(client, opts()), qemu.greet_and_negotiate());
        let client = client.unwrap();

        let (pipe_read, _pipe_write) = rustix::pipe::pipe().unwrap();
        let fake = async {
            let mut buf = vec![0u8; 4096];
            let (n, fds) = fdpass::recv_with_fds(&server, &mut buf).await.unwrap();
            assert_eq!(fds.len(), 1);
            let message: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(message["execute"], "add-fd");
            assert_eq!(message["arguments"], json!({"fdset-id": 3, "opaque": "disk0"}));
            qemu.reply(message["id"].clone(), json!({"fdset-id": 3, "fd": 27})).await;
        };
        let (result, ()) = tokio::join!(client.add_fd(Some(3), Some("disk0"), pipe_read.as_fd()), fake);
        assert_eq!(result.unwrap(), AddFdInfo { fdset_id: 3, fd: 27 });
    }

    #[tokio::test]
    async fn dropping_the_last_clone_closes_the_socket() {
        let (client, mut qemu) = connected().await;
        let mut events = client.subscribe();
        let clone = client.clone();
        drop(client);
        assert!(!clone.is_closed());
        drop(clone);
        qemu.expect_eof().await;
        assert!(matches!(next_event(&mut events).await, Event::Closed { .. }));
    }

    #[tokio::test]
    async fn connect_retries_until_the_socket_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let listener = tokio::net::UnixListener::bind(&path).unwrap();
                let (stream, _) = listener.accept().await.unwrap();
                let mut qemu = FakeQemu::new(stream);
                qemu.greet_and_negotiate().await;
                qemu
            })
        };
        let client = QmpClient::connect(&path, opts()).await.unwrap();
        assert_eq!(client.greeting().major, 7);
        let _qemu = server.await.unwrap();
    }

    #[tokio::test]
    async fn connect_gives_up_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never.sock");
        let opts = ConnectOptions { connect_timeout: Duration::from_millis(200), ..opts() };
        let started = std::time::Instant::now();
        let err = QmpClient::connect(&path, opts).await.unwrap_err();
        let elapsed = started.elapsed();
        match err {
            Error::Connect { path: p, source } => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            err => panic!("{err:?}"),
        }
        assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn connect_does_not_retry_other_errors() {
        // Longer than `sun_path` holds: an error no amount of waiting fixes.
        let path = std::path::PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let started = std::time::Instant::now();
        let err = QmpClient::connect(&path, opts()).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn default_options() {
        let opts = ConnectOptions::default();
        assert_eq!((opts.connect_timeout, opts.command_timeout), (Duration::from_secs(5), Duration::from_secs(30)));
    }

    #[test]
    fn client_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<QmpClient>();
    }
}
