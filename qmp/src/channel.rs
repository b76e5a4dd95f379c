//! [`Channel`]: one JSON-lines connection to a QEMU-style peer (QMP or the guest agent), shared by cheap clones.
//!
//! What QMP and QGA have in common lives here: line framing, request ids, per-command timeouts, file descriptors
//! passed with `SCM_RIGHTS`, an event stream, and a clean error for every waiting command when the peer goes. The
//! greeting and capabilities negotiation (QMP) and the `guest-sync-delimited` resynchronisation (QGA) are the front
//! ends' business ([`crate::QmpClient`], [`crate::qga::QgaClient`]).
//!
//! Three parts cooperate:
//! - a reader task owns the read half, splits it into lines and routes replies to their waiting command by id and
//!   events to a broadcast channel;
//! - a writer task owns the write half and writes one message at a time, so a command whose caller gave up (timeout,
//!   dropped future) is still written whole and the stream never carries half a command;
//! - [`Shared`] holds what both the tasks and the callers touch: the pending commands, the event sender and whether
//!   the connection is closed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::Error;
use crate::fdpass;
use crate::protocol::{self, ErrorReply, Event, Message, QmpEvent};

/// Events a subscriber may fall behind by before it sees `RecvError::Lagged`.
const EVENT_CAPACITY: usize = 256;
/// The longest line accepted from the peer. `query-qmp-schema`, the largest QMP reply in practice, is well under
/// 1 MiB; a longer line means the peer is not QEMU, and the connection is closed since framing is lost.
pub(crate) const MAX_MESSAGE_LEN: usize = 16 << 20;
/// Messages queued for the writer task before callers wait for room.
const WRITE_QUEUE: usize = 64;
/// Retry delays while the socket does not exist yet or refuses connections (QEMU still starting).
const CONNECT_BACKOFF_START: Duration = Duration::from_millis(5);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// How much of a malformed line goes into a log message.
pub(crate) const LOG_EXCERPT: usize = 200;

/// A JSON-lines channel to a QMP or QGA peer, after any greeting.
///
/// Clones share the connection. Commands may be issued concurrently from any number of tasks; replies are matched
/// by id. When the last clone is dropped, the connection is closed and its tasks stop. It must be created inside a
/// tokio runtime, which runs its reader and writer tasks.
#[derive(Clone)]
pub(crate) struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writes: mpsc::Sender<WriteRequest>,
    reader: AbortHandle,
    next_id: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader task holds only `Shared`, never `Inner`, so this runs; aborting it drops the read half. The
        // writer task ends by itself when `writes` is dropped with `Inner`.
        self.reader.abort();
        self.shared.shutdown("the client was dropped".to_owned());
    }
}

impl Channel {
    /// Starts the reader and writer tasks over a connected stream whose greeting (if any) was read through
    /// `reader`. Request ids start at `first_id`: a peer that may still answer an earlier connection's commands
    /// (a guest agent behind a virtio-serial port) must get ids it cannot have seen.
    pub(crate) fn start(
        reader: BufReader<OwnedReadHalf>,
        write: OwnedWriteHalf,
        label: &'static str,
        first_id: u64,
    ) -> Self {
        let shared = Arc::new(Shared::new(label));
        let reader = tokio::spawn(read_loop(reader, shared.clone())).abort_handle();
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_loop(write, queue, shared.clone()));
        Channel { inner: Arc::new(Inner { shared, writes, reader, next_id: AtomicU64::new(first_id) }) }
    }

    /// Sends `command` (with `fd` riding on its first byte, if given) and waits at most `timeout` for its reply.
    ///
    /// On timeout the command may still run on the peer; its late reply is dropped.
    pub(crate) async fn request(
        &self,
        command: &str,
        arguments: Option<&Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let closed = || Error::Closed { command: command.to_owned() };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = protocol::encode_command(command, arguments, Some(id))
            .map_err(|source| Error::Encode { command: command.to_owned(), source })?;
        let shared = &self.inner.shared;
        let reply = shared.register(id, command).ok_or_else(closed)?;
        // Removes the pending entry however this future ends: timeout, error, or the caller dropping it.
        let _pending = PendingGuard { shared, id };

        let exchange = async {
            self.write(command, Some(id), bytes, fd).await?;
            match reply.await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(ErrorReply { class, desc })) => Err(Error::Command { command: command.to_owned(), class, desc }),
                Err(_) => Err(closed()),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                debug!(channel = shared.label, command, id, ?timeout, "command timed out");
                Err(Error::Timeout { command: command.to_owned(), timeout })
            }
        }
    }

    /// Sends `command` and returns once it is written, waiting for no reply: for commands that never answer on
    /// success (QGA's `guest-shutdown`). The message carries no id, so an error reply is dropped unread.
    pub(crate) async fn notify(
        &self,
        command: &str,
        arguments: Option<&Value>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let bytes = protocol::encode_command(command, arguments, None)
            .map_err(|source| Error::Encode { command: command.to_owned(), source })?;
        self.send_bytes(command, bytes, timeout).await
    }

    /// Writes `bytes` as they are (QGA's 0xFF parser reset), within `timeout`; `what` names it in errors.
    pub(crate) async fn send_bytes(&self, what: &str, bytes: Vec<u8>, timeout: Duration) -> Result<(), Error> {
        match tokio::time::timeout(timeout, self.write(what, None, bytes, None)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout { command: what.to_owned(), timeout }),
        }
    }

    async fn write(&self, command: &str, id: Option<u64>, bytes: Vec<u8>, fd: Option<OwnedFd>) -> Result<(), Error> {
        let closed = || Error::Closed { command: command.to_owned() };
        let (done_tx, done_rx) = oneshot::channel();
        let request = WriteRequest { command: command.to_owned(), id, bytes, fd, done: done_tx };
        self.inner.writes.send(request).await.map_err(|_| closed())?;
        match done_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(WriteError::Io(source))) => Err(Error::Send { command: command.to_owned(), source }),
            Ok(Err(WriteError::FdPass(source))) => Err(Error::FdPass { command: command.to_owned(), source }),
            Ok(Err(WriteError::Closed)) | Err(_) => Err(closed()),
        }
    }

    /// Subscribes to events. Each receiver gets every event emitted after it subscribed, then exactly one
    /// [`Event::Closed`] when the connection closes (at once if it already has), then `RecvError::Closed`.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.subscribe()
    }

    /// Whether the connection is closed: the peer closed it or exited, reading or writing failed.
    pub(crate) fn is_closed(&self) -> bool {
        *self.inner.shared.closed_tx.borrow()
    }

    /// Resolves when the connection is closed; at once if it already is.
    pub(crate) async fn closed(&self) {
        let mut closed = self.inner.shared.closed_tx.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive, so this only fails if it is already gone anyway.
        let _ = closed.wait_for(|closed| *closed).await;
    }

    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        self.inner.shared.lock().pending.len()
    }
}

/// Connects to the unix socket at `path`, retrying with a short backoff while it does not exist yet or refuses
/// connections (QEMU still starting), until `deadline`.
pub(crate) async fn connect_with_retry(path: &Path, deadline: Instant) -> Result<UnixStream, Error> {
    let mut backoff = CONNECT_BACKOFF_START;
    loop {
        let error = match tokio::time::timeout_at(deadline, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error)) => error,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect did not complete before the timeout"),
        };
        let retryable = matches!(error.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused);
        let now = Instant::now();
        if !retryable || now >= deadline {
            return Err(Error::Connect { path: path.to_owned(), source: error });
        }
        tokio::time::sleep_until(deadline.min(now + backoff)).await;
        backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
    }
}

type Reply = Result<Value, ErrorReply>;

struct Pending {
    command: Box<str>,
    reply: oneshot::Sender<Reply>,
}

/// State shared by the channel handles and the reader and writer tasks.
struct Shared {
    /// `QMP` or `QGA`, for logs.
    label: &'static str,
    state: Mutex<State>,
    /// `true` once closed; also what [`Channel::closed`] waits on.
    closed_tx: watch::Sender<bool>,
}

struct State {
    pending: HashMap<u64, Pending>,
    /// `None` once closed, so receivers see `RecvError::Closed` after [`Event::Closed`].
    events: Option<broadcast::Sender<Event>>,
    /// Why the connection closed, once it has.
    closed: Option<String>,
}

impl Shared {
    fn new(label: &'static str) -> Self {
        Self {
            label,
            state: Mutex::new(State {
                pending: HashMap::new(),
                events: Some(broadcast::channel(EVENT_CAPACITY).0),
                closed: None,
            }),
            closed_tx: watch::Sender::new(false),
        }
    }

    /// Poisoning only means another thread panicked while holding the lock; the map is still consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a command waiting for its reply; `None` if the connection is closed.
    fn register(&self, id: u64, command: &str) -> Option<oneshot::Receiver<Reply>> {
        let mut state = self.lock();
        if state.closed.is_some() {
            return None;
        }
        let (reply, receiver) = oneshot::channel();
        state.pending.insert(id, Pending { command: command.into(), reply });
        Some(receiver)
    }

    fn unregister(&self, id: u64) {
        let removed = self.lock().pending.remove(&id);
        drop(removed);
    }

    fn complete(&self, id: u64, reply: Reply) {
        let label = self.label;
        let pending = self.lock().pending.remove(&id);
        match pending {
            Some(Pending { command, reply: sender }) => {
                match &reply {
                    Ok(_) => debug!(channel = label, command = &*command, id, "reply received"),
                    Err(error) => {
                        debug!(channel = label, command = &*command, id, class = %error.class, "error reply received")
                    }
                }
                // The caller may have just given up; then nobody wants the reply.
                let _ = sender.send(reply);
            }
            None => debug!(channel = label, id, "reply for a command no longer waiting (timed out, stale); dropped"),
        }
    }

    fn publish(&self, event: QmpEvent) {
        debug!(
            channel = self.label,
            event = %event.name,
            seconds = event.seconds,
            microseconds = event.microseconds,
            "event received"
        );
        if let Some(events) = &self.lock().events {
            // An error only means nobody is subscribed.
            let _ = events.send(Event::Qemu(event));
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        let state = self.lock();
        match (&state.events, &state.closed) {
            (Some(events), _) => events.subscribe(),
            (None, reason) => {
                // Closed already: a receiver that still gets its one `Closed`, then ends.
                let (sender, receiver) = broadcast::channel(1);
                let reason = reason.clone().unwrap_or_default();
                let _ = sender.send(Event::Closed { reason });
                receiver
            }
        }
    }

    /// Closes the connection's shared state: fails every pending command with `Closed` (by dropping its sender),
    /// sends `Event::Closed` and wakes [`Channel::closed`]. Returns `false` if it was already closed.
    fn shutdown(&self, reason: String) -> bool {
        let (pending, events) = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return false;
            }
            state.closed = Some(reason.clone());
            (std::mem::take(&mut state.pending), state.events.take())
        };
        if !pending.is_empty() {
            debug!(
                channel = self.label,
                count = pending.len(),
                "failing commands still waiting, the connection closed"
            );
        }
        drop(pending);
        if let Some(events) = events {
            let _ = events.send(Event::Closed { reason });
        }
        self.closed_tx.send_replace(true);
        true
    }

    /// Routes one line from the socket. Malformed lines are logged and skipped.
    fn dispatch(&self, line: &[u8]) {
        // QGA puts 0xFF before its reply to `guest-sync-delimited`, so a client can find it after garbage.
        let start = line.iter().position(|&b| b != 0xFF).unwrap_or(line.len());
        let line = &line[start..];
        if line.trim_ascii().is_empty() {
            return;
        }
        match protocol::parse_message(line) {
            Ok(Message::Reply { id, result }) => match id.as_ref().and_then(Value::as_u64) {
                Some(id) => self.complete(id, result),
                // QGA answers the 0xFF reset with an id-less parse error; QMP one for a command it could not read.
                None => debug!(
                    channel = self.label,
                    id = ?id,
                    message = %protocol::excerpt(line, LOG_EXCERPT),
                    "ignoring a reply without an id this client sent"
                ),
            },
            Ok(Message::Event(event)) => self.publish(event),
            Err(error) => warn!(
                channel = self.label,
                error = %error,
                message = %protocol::excerpt(line, LOG_EXCERPT),
                "ignoring a malformed message"
            ),
        }
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let reason = loop {
        match protocol::read_line(&mut reader, &mut line, MAX_MESSAGE_LEN).await {
            Ok(true) => shared.dispatch(&line),
            Ok(false) => break format!("the peer closed the {} socket", shared.label),
            Err(error) => {
                warn!(channel = shared.label, %error, "reading the socket failed; closing the connection");
                break format!("reading the {} socket failed: {error}", shared.label);
            }
        }
        // One huge reply should not pin its buffer for the connection's lifetime.
        if line.capacity() > 1 << 20 {
            line = Vec::new();
        }
    };
    debug!(channel = shared.label, %reason, "connection closed");
    shared.shutdown(reason);
}

struct WriteRequest {
    command: String,
    id: Option<u64>,
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
    done: oneshot::Sender<Result<(), WriteError>>,
}

enum WriteError {
    Io(io::Error),
    FdPass(io::Error),
    /// The connection was closed before or while writing.
    Closed,
}

async fn write_loop(mut half: OwnedWriteHalf, mut queue: mpsc::Receiver<WriteRequest>, shared: Arc<Shared>) {
    let label = shared.label;
    let mut closed = shared.closed_tx.subscribe();
    loop {
        // Once closed, this task ends and drops the write half; with the reader gone too, that closes the socket
        // rather than leaving it open until the last handle is dropped. Requests still queued fail `Closed` when
        // their `done` senders are dropped with the queue.
        let request = tokio::select! {
            biased;
            _ = closed.wait_for(|closed| *closed) => break,
            request = queue.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let result = write_message(&mut half, &request).await;
        match result {
            Ok(()) => {
                debug!(
                    channel = label,
                    command = %request.command,
                    id = request.id,
                    bytes = request.bytes.len(),
                    fd = request.fd.is_some(),
                    "sent"
                );
                let _ = request.done.send(Ok(()));
            }
            Err(failure) => {
                let (WriteError::Io(error) | WriteError::FdPass(error)) = &failure else {
                    let _ = request.done.send(Err(failure));
                    break;
                };
                if matches!(
                    error.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
                ) {
                    // The peer is gone. The reader closes the connection when it reaches end of file, after
                    // delivering whatever the peer sent before going (e.g. the reply to `quit`).
                    debug!(channel = label, command = %request.command, %error, "peer gone while sending");
                    let _ = request.done.send(Err(WriteError::Closed));
                    break;
                }
                if let WriteError::FdPass(_) = failure {
                    // sendmsg failed, so not a byte of this command went out and the stream is intact.
                    warn!(channel = label, command = %request.command, %error, "passing a file descriptor failed");
                    let _ = request.done.send(Err(failure));
                    continue;
                }
                // Part of the command may be on the wire; nothing sent after it could be parsed.
                warn!(channel = label, command = %request.command, %error, "writing failed; closing the connection");
                shared.shutdown(format!("writing to the {label} socket failed: {error}"));
                let _ = rustix::net::shutdown(half.as_ref(), rustix::net::Shutdown::Both);
                let _ = request.done.send(Err(failure));
                break;
            }
        }
    }
}

async fn write_message(half: &mut OwnedWriteHalf, request: &WriteRequest) -> Result<(), WriteError> {
    let mut bytes = &request.bytes[..];
    if let Some(fd) = &request.fd {
        let sent = fdpass::send_with_fd(half.as_ref(), bytes, fd.as_fd()).await.map_err(WriteError::FdPass)?;
        bytes = &bytes[sent..];
    }
    half.write_all(bytes).await.map_err(WriteError::Io)
}

#[cfg(test)]
mod tests {
    //! The channel alone, against a scripted peer: no greeting, as QGA has none. The QMP front end's tests
    //! (`client.rs`) cover the same machinery through `QmpClient`.

    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};

    const WAIT: Duration = Duration::from_secs(5);

    fn pair(first_id: u64) -> (Channel, BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (read, write) = ours.into_split();
        let channel = Channel::start(BufReader::new(read), write, "TEST", first_id);
        let (read, write) = theirs.into_split();
        (channel, BufReader::new(read), write)
    }

    async fn recv(read: &mut BufReader<OwnedReadHalf>) -> Value {
        let mut line = String::new();
        tokio::time::timeout(WAIT, read.read_line(&mut line)).await.unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[tokio::test]
    async fn ids_start_where_asked_and_replies_match_out_of_order() {
        let (channel, mut read, mut write) = pair(1 << 40);
        let a = channel.request("a", None, None, WAIT);
        let arguments = json!({"x": 1});
        let b = channel.request("b", Some(&arguments), None, WAIT);
        let peer = async {
            let first = recv(&mut read).await;
            let second = recv(&mut read).await;
            let ids = [first["id"].as_u64().unwrap(), second["id"].as_u64().unwrap()];
            assert!(ids.iter().all(|&id| id >= 1 << 40), "{ids:?}");
            // Answer the second first, with QGA's 0xFF in front of one of them.
            for message in [&second, &first] {
                let reply = json!({"return": message["execute"], "id": message["id"]});
                write.write_all(&[&[0xFF][..], format!("{reply}\n").as_bytes()].concat()).await.unwrap();
            }
        };
        let (a, b, ()) = tokio::join!(a, b, peer);
        assert_eq!((a.unwrap(), b.unwrap()), (json!("a"), json!("b")));
    }

    #[tokio::test]
    async fn leading_ff_bytes_are_skipped() {
        let (channel, mut read, mut write) = pair(0);
        let request = channel.request("guest-sync-delimited", None, None, WAIT);
        let peer = async {
            let message = recv(&mut read).await;
            write.write_all(b"\xff\xff").await.unwrap();
            write.write_all(format!("{}\n", json!({"return": 7, "id": message["id"]})).as_bytes()).await.unwrap();
        };
        let (reply, ()) = tokio::join!(request, peer);
        assert_eq!(reply.unwrap(), json!(7));
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_times_out_and_stays_usable() {
        let (channel, mut read, mut write) = pair(0);
        let short = Duration::from_millis(50);
        let err = channel.request("guest-ping", None, None, short).await.unwrap_err();
        assert!(matches!(&err, Error::Timeout { command, timeout } if command == "guest-ping" && *timeout == short));
        assert_eq!(channel.pending_len(), 0);
        assert!(!channel.is_closed());
        let stale = recv(&mut read).await;
        let request = channel.request("guest-info", None, None, WAIT);
        let peer = async {
            let message = recv(&mut read).await;
            // The stale answer first: it must not be taken for this one.
            write.write_all(format!("{}\n", json!({"return": "stale", "id": stale["id"]})).as_bytes()).await.unwrap();
            write.write_all(format!("{}\n", json!({"return": "fresh", "id": message["id"]})).as_bytes()).await.unwrap();
        };
        let (reply, ()) = tokio::join!(request, peer);
        assert_eq!(reply.unwrap(), json!("fresh"));
    }

    #[tokio::test]
    async fn notify_sends_without_an_id_and_waits_for_nothing() {
        let (channel, mut read, _write) = pair(0);
        channel.notify("guest-shutdown", Some(&json!({"mode": "powerdown"})), WAIT).await.unwrap();
        let message = recv(&mut read).await;
        assert_eq!(message, json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}));
        assert_eq!(channel.pending_len(), 0);
    }

    #[tokio::test]
    async fn raw_bytes_go_out_as_they_are() {
        let (channel, mut read, _write) = pair(0);
        channel.send_bytes("0xFF", vec![0xFF], WAIT).await.unwrap();
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, read.read_exact(&mut byte)).await.unwrap().unwrap();
        assert_eq!(byte, [0xFF]);
    }

    #[tokio::test]
    async fn events_then_closed_when_the_peer_goes() {
        let (channel, mut read, mut write) = pair(0);
        let mut events = channel.subscribe();
        let waiting = channel.request("query-status", None, None, WAIT);
        let peer = async move {
            recv(&mut read).await;
            write.write_all(b"{\"event\": \"RESET\", \"data\": {\"guest\": true}}\n").await.unwrap();
            // Gone without answering.
        };
        let (result, ()) = tokio::join!(waiting, peer);
        assert!(matches!(result, Err(Error::Closed { .. })), "{result:?}");
        let Ok(Event::Qemu(event)) = events.recv().await else { panic!("no event") };
        assert_eq!(event.name, "RESET");
        let Ok(Event::Closed { reason }) = events.recv().await else { panic!("no close") };
        assert!(reason.contains("TEST"), "{reason}");
        assert!(channel.is_closed());
        let err = channel.request("query-status", None, None, WAIT).await.unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err:?}");
        let err = channel.notify("guest-shutdown", None, WAIT).await.unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn fds_ride_on_the_command() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (read, write) = ours.into_split();
        let channel = Channel::start(BufReader::new(read), write, "TEST", 0);
        let (pipe_read, _pipe_write) = rustix::pipe::pipe().unwrap();
        let fd = pipe_read.try_clone().unwrap();
        let arguments = json!({"fdname": "x"});
        let request = channel.request("getfd", Some(&arguments), Some(fd), WAIT);
        let peer = async {
            let mut buf = vec![0u8; 4096];
            let (n, fds) = fdpass::recv_with_fds(&theirs, &mut buf).await.unwrap();
            assert_eq!(fds.len(), 1);
            let message: Value = serde_json::from_slice(&buf[..n]).unwrap();
            let reply = format!("{}\n", json!({"return": {}, "id": message["id"]}));
            theirs.writable().await.unwrap();
            theirs.try_write(reply.as_bytes()).unwrap();
        };
        let (reply, ()) = tokio::join!(request, peer);
        assert_eq!(reply.unwrap(), json!({}));
    }
}
