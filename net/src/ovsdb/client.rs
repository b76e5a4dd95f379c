//! [`Client`]: one OVSDB session, shared by cheap clones, that outlives connections.
//!
//! Four parts cooperate:
//! - a supervisor task owns the connection's lifecycle: it connects (again, with backoff, after a loss), and while
//!   connected it is the writer: it takes requests from the callers' queue, registers them as pending just before
//!   writing them, and coalesces whatever is queued into one write;
//! - a reader task per connection splits the byte stream into messages ([`Framer`]), completes pending requests by
//!   id, applies monitor replies and updates in order, and answers the server's `echo`;
//! - a control channel per connection carries what must not wait behind the callers' queue: echo replies, `cancel`,
//!   `monitor_cancel`, and re-establishing monitors after a reconnect;
//! - [`Shared`] holds what all of them touch: the pending requests, the monitors, the schema cache, and the
//!   connection state.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::codec::Framer;
use super::error::Error;
use super::monitor::{Monitor, MonitorInner, MonitorRequest, Version};
use super::ops::{Operation, OperationResult};
use super::rpc::{self, Message, RpcError};
use super::schema::Schema;

/// Requests queued for the writer before callers wait for room.
const QUEUE: usize = 4096;
/// The most bytes coalesced into one write.
const MAX_WRITE: usize = 256 * 1024;
/// Delays while the socket does not exist yet or refuses connections during the first connect.
const CONNECT_RETRY_START: Duration = Duration::from_millis(10);
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(200);
/// A connection that lived at least this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(2);
/// How much of a malformed message goes into a log line.
const LOG_EXCERPT: usize = 200;
/// The id of our inactivity probes, whose replies nobody waits for.
const PROBE_ID: &str = "qx-probe";

/// Where ovsdb-server listens, in OVS notation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:PATH`, e.g. `unix:/run/openvswitch/db.sock`.
    Unix(PathBuf),
    /// `tcp:HOST:PORT`, e.g. `tcp:127.0.0.1:6640`.
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = Error;

    /// Parses `unix:PATH`, `tcp:HOST:PORT`, or an absolute path (a unix socket).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || Error::Endpoint { value: text.to_owned() };
        if let Some(path) = text.strip_prefix("unix:") {
            return if path.is_empty() { Err(bad()) } else { Ok(Endpoint::Unix(path.into())) };
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            return Ok(Endpoint::Tcp(addr.to_owned()));
        }
        if text.starts_with('/') {
            return Ok(Endpoint::Unix(text.into()));
        }
        Err(bad())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Reconnect delays: `initial`, doubling up to `max`; reset after a connection that stayed up a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay. Default: 100 ms.
    pub initial: Duration,
    /// Longest delay. Default: 5 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

/// Options for [`Client::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long the first connect keeps trying while the socket is missing or refuses. Default: 5 s.
    pub connect_timeout: Duration,
    /// How long a request waits for its reply, queueing included. Default: 30 s.
    pub request_timeout: Duration,
    /// Reconnecting after a loss; `None` closes the client instead. Default: `Some(Backoff::default())`.
    pub reconnect: Option<Backoff>,
    /// After this long without a message, send an `echo`; drop the connection if another interval passes in
    /// silence. Default: `None` (a unix socket does not go silent; set it for TCP).
    pub probe_interval: Option<Duration>,
    /// The largest message accepted. Default: 256 MiB (big OVN databases send large initial monitor replies).
    pub max_message_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            reconnect: Some(Backoff::default()),
            probe_interval: None,
            max_message_size: 256 << 20,
        }
    }
}

/// The state of the client's connection, from [`Client::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected; `generation` counts connections, 1 for the first.
    Connected {
        /// Which connection.
        generation: u64,
    },
    /// The connection was lost; reconnecting with backoff. Requests queue meanwhile (bounded by their timeout).
    Reconnecting {
        /// The connection that was lost.
        generation: u64,
        /// Why.
        reason: String,
    },
    /// Closed for good.
    Closed {
        /// Why.
        reason: String,
    },
}

/// Why a request did not get a result.
#[derive(Debug)]
enum Failure {
    Rpc(RpcError),
    Disconnected,
    Closed(String),
}

type Reply = Result<Json, Failure>;

struct Pending {
    method: Box<str>,
    reply: oneshot::Sender<Reply>,
    /// For a monitor request: the monitor its reply initializes.
    monitor: Option<Arc<MonitorInner>>,
}

struct Outgoing {
    id: u64,
    method: Box<str>,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Reply>,
    monitor: Option<Arc<MonitorInner>>,
}

/// State shared by the client handles, the supervisor and the reader.
pub(crate) struct Shared {
    state: Mutex<State>,
    status: watch::Sender<ConnectionState>,
    next_id: AtomicU64,
    endpoint: Endpoint,
    opts: ClientOptions,
}

struct State {
    pending: HashMap<u64, Pending>,
    monitors: HashMap<String, Arc<MonitorInner>>,
    /// The live connection's control channel; `None` while disconnected.
    control: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Schemas fetched on this connection.
    schemas: HashMap<String, Arc<Schema>>,
    /// Why the client closed, once it has.
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoning only means a thread panicked while holding the lock; the maps are still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes `bytes` ahead of the callers' queue; dropped if disconnected.
    fn send_control(&self, bytes: Vec<u8>) -> bool {
        match &self.lock().control {
            Some(control) => control.send(bytes).is_ok(),
            None => false,
        }
    }

    /// Sends a request over the control channel and returns where its reply will arrive.
    fn control_request(
        &self,
        method: &str,
        params: &Json,
        monitor: Option<Arc<MonitorInner>>,
    ) -> Option<oneshot::Receiver<Reply>> {
        let id = self.next_id();
        let bytes = rpc::encode_request(method, params, id);
        let (reply, receiver) = oneshot::channel();
        let mut state = self.lock();
        let control = state.control.clone()?;
        state.pending.insert(id, Pending { method: method.into(), reply, monitor });
        drop(state);
        control.send(bytes).ok()?;
        Some(receiver)
    }

    /// Removes a pending request; whether it was there (sent, no reply yet).
    fn unregister(&self, id: u64) -> bool {
        let removed = self.lock().pending.remove(&id);
        removed.is_some()
    }

    /// Moves a queued request to the pending map (unless its caller gave up) and appends its bytes to `buf`.
    fn register_outgoing(&self, out: Outgoing, buf: &mut Vec<u8>) {
        if out.reply.is_closed() {
            return;
        }
        self.lock().pending.insert(out.id, Pending { method: out.method, reply: out.reply, monitor: out.monitor });
        debug!(id = out.id, bytes = out.bytes.len(), "OVSDB request sent");
        buf.extend_from_slice(&out.bytes);
    }

    fn complete(&self, id: u64, result: Result<Json, RpcError>) {
        let Some(pending) = self.lock().pending.remove(&id) else {
            debug!(id, "OVSDB reply for a request no longer waiting (timed out or canceled); dropped");
            return;
        };
        debug!(method = &*pending.method, id, ok = result.is_ok(), "OVSDB reply received");
        if let (Some(monitor), Ok(json)) = (&pending.monitor, &result) {
            // Applied here, in stream order, so the updates that follow the reply find the rows they change.
            monitor.apply_reply(json);
            let mut state = self.lock();
            if monitor.cancelled.load(Ordering::Acquire) {
                drop(state);
                self.send_control(rpc::encode_request("monitor_cancel", &json!([monitor.id]), self.next_id()));
            } else {
                state.monitors.insert(monitor.id.clone(), monitor.clone());
            }
        }
        // The caller may have just given up.
        let _ = pending.reply.send(result.map_err(Failure::Rpc));
    }

    /// Routes one message from the server.
    fn dispatch(&self, frame: &[u8], control: &mpsc::UnboundedSender<Vec<u8>>) {
        match rpc::parse_message(frame) {
            Ok(Message::Response { id, result }) => match id.as_u64() {
                Some(id) => self.complete(id, result),
                None if id == PROBE_ID => debug!("OVSDB echo probe answered"),
                None => warn!(id = %id, "ignoring OVSDB reply with an id this client never sent"),
            },
            Ok(Message::Notification { method, params }) => match method.as_str() {
                "update" | "update2" | "update3" => {
                    let id = params.get(0).and_then(Json::as_str).unwrap_or_default();
                    let monitor = self.lock().monitors.get(id).cloned();
                    match monitor {
                        Some(monitor) => monitor.apply_notification(&method, &params),
                        None => debug!(monitor = id, "OVSDB update for an unknown or canceled monitor; dropped"),
                    }
                }
                _ => debug!(%method, "OVSDB notification ignored"),
            },
            Ok(Message::Request { id, method, params }) => {
                let reply = if method == "echo" {
                    debug!("answering OVSDB echo");
                    rpc::encode_response(&id, &params)
                } else {
                    warn!(%method, "OVSDB server sent a request this client does not implement");
                    rpc::encode_error_response(&id, "unknown method")
                };
                let _ = control.send(reply);
            }
            Err(error) => warn!(
                %error,
                message = %rpc::excerpt(frame, LOG_EXCERPT),
                "ignoring malformed OVSDB message"
            ),
        }
    }

    /// The connection is gone: fails what waits for a reply, tells the monitors.
    fn disconnected(&self, generation: u64, reason: &str) {
        let (pending, monitors) = {
            let mut state = self.lock();
            state.control = None;
            state.schemas.clear();
            (std::mem::take(&mut state.pending), state.monitors.values().cloned().collect::<Vec<_>>())
        };
        // Monitors first, so that a caller whose request fails below finds them already out of sync.
        for monitor in monitors {
            monitor.disconnected();
        }
        if !pending.is_empty() {
            debug!(count = pending.len(), "failing OVSDB requests in flight: the connection was lost");
        }
        for (_, pending) in pending {
            let _ = pending.reply.send(Err(Failure::Disconnected));
        }
        self.status.send_replace(ConnectionState::Reconnecting { generation, reason: reason.to_owned() });
    }

    /// Closes for good: fails everything waiting, ends the monitors' streams. Returns `false` if already closed.
    fn shutdown(&self, reason: &str) -> bool {
        let (pending, monitors) = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return false;
            }
            state.closed = Some(reason.to_owned());
            state.control = None;
            (std::mem::take(&mut state.pending), std::mem::take(&mut state.monitors))
        };
        for (_, pending) in pending {
            let _ = pending.reply.send(Err(Failure::Closed(reason.to_owned())));
        }
        for (_, monitor) in monitors {
            monitor.close();
        }
        self.status.send_replace(ConnectionState::Closed { reason: reason.to_owned() });
        true
    }
}

/// An async OVSDB client (RFC 7047 JSON-RPC) over a unix socket or TCP.
///
/// Clones share the session. Requests may be issued concurrently from any number of tasks; they are pipelined on
/// the one connection and matched by id. If the connection drops, requests in flight fail with
/// [`Error::Disconnected`], new ones wait for the reconnect (within their timeout), and monitors are re-established
/// by themselves. When the last clone (and the last [`Monitor`]) is dropped, the session ends.
///
/// It must be created inside a tokio runtime, which runs its tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Outgoing>,
    supervisor: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The supervisor holds only `Shared`, never `Inner`, so this runs; aborting it drops the connection.
        self.supervisor.abort();
        self.shared.shutdown("the OVSDB client was dropped");
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.inner.shared.endpoint)
            .field("state", &*self.inner.shared.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to ovsdb-server at `endpoint`, retrying while the socket is missing or refuses connections (as
    /// while the server starts) until `opts.connect_timeout`.
    pub async fn connect(endpoint: Endpoint, opts: ClientOptions) -> Result<Self, Error> {
        let deadline = Instant::now() + opts.connect_timeout;
        let conn = connect_with_retry(&endpoint, deadline).await?;
        debug!(%endpoint, "OVSDB connected");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                monitors: HashMap::new(),
                control: None,
                schemas: HashMap::new(),
                closed: None,
            }),
            status: watch::Sender::new(ConnectionState::Connected { generation: 1 }),
            next_id: AtomicU64::new(1),
            endpoint,
            opts,
        });
        let (queue, requests) = mpsc::channel(QUEUE);
        let supervisor = tokio::spawn(supervise(shared.clone(), requests, conn)).abort_handle();
        Ok(Client { inner: Arc::new(Inner { shared, queue, supervisor }) })
    }

    /// The endpoint it connects to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.shared.endpoint
    }

    /// The connection state, as a watch: `borrow()` for now, `changed()` to wait for the next transition.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.shared.status.subscribe()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.inner.shared.status.borrow(), ConnectionState::Connected { .. })
    }

    pub(crate) fn closed_reason(&self) -> Option<String> {
        self.inner.shared.lock().closed.clone()
    }

    /// Any JSON-RPC method, with raw JSON params and result: for what has no wrapper (`get_server_id`, `lock`, ...).
    pub async fn call(&self, method: &str, params: Json) -> Result<Json, Error> {
        self.submit(method, &params, None, false).await?.wait().await
    }

    /// `list_dbs`: the databases the server holds.
    pub async fn list_dbs(&self) -> Result<Vec<String>, Error> {
        let result = self.call("list_dbs", json!([])).await?;
        serde_json::from_value(result).map_err(|e| Error::Decode { method: "list_dbs".into(), reason: e.to_string() })
    }

    /// `get_schema`, cached for the life of the connection.
    pub async fn get_schema(&self, db: &str) -> Result<Arc<Schema>, Error> {
        if let Some(schema) = self.inner.shared.lock().schemas.get(db) {
            return Ok(schema.clone());
        }
        let json = self.call("get_schema", json!([db])).await?;
        let schema = Arc::new(Schema::from_json(&json).map_err(|reason| Error::Schema { db: db.to_owned(), reason })?);
        self.inner.shared.lock().schemas.insert(db.to_owned(), schema.clone());
        Ok(schema)
    }

    /// `echo`: the server returns `params`. A round trip that proves the connection works.
    pub async fn echo(&self, params: Vec<Json>) -> Result<Vec<Json>, Error> {
        let result = self.call("echo", Json::Array(params)).await?;
        serde_json::from_value(result).map_err(|e| Error::Decode { method: "echo".into(), reason: e.to_string() })
    }

    /// `transact`: runs `ops` atomically on `db`. If any operation fails, nothing takes effect and the error
    /// names the operation ([`Error::Transaction`]).
    ///
    /// Dropping the future (or its timing out) before the reply sends `cancel` for it, so a transaction blocked in
    /// a `wait` does not linger at the server.
    pub async fn transact(&self, db: &str, ops: &[Operation]) -> Result<Vec<OperationResult>, Error> {
        self.start_transact(db, ops).await?.wait().await
    }

    /// Queues a `transact` and returns a handle to await or [`cancel`](PendingTransact::cancel) it. Starting many
    /// before awaiting any pipelines them on the connection.
    pub async fn start_transact(&self, db: &str, ops: &[Operation]) -> Result<PendingTransact, Error> {
        let mut params = Vec::with_capacity(ops.len() + 1);
        params.push(Json::from(db));
        for op in ops {
            params
                .push(serde_json::to_value(op).map_err(|source| Error::Encode { method: "transact".into(), source })?);
        }
        let call = self.submit("transact", &Json::Array(params), None, true).await?;
        Ok(PendingTransact { call, db: db.to_owned(), kinds: ops.iter().map(Operation::kind).collect() })
    }

    /// `monitor`: a monitor with `update` notifications. Conditions are refused; use
    /// [`monitor_cond`](Self::monitor_cond) for those.
    pub async fn monitor(&self, db: &str, request: MonitorRequest) -> Result<Monitor, Error> {
        if request.tables.values().any(|t| t.conditions.is_some()) {
            return Err(Error::Request { method: "monitor".into(), reason: "conditions need monitor_cond".into() });
        }
        self.start_monitor(db, request, Version::V1).await
    }

    /// `monitor_cond`: a monitor with conditions and `update2` notifications, which carry only the changed
    /// columns (and only the changed elements of sets and maps).
    pub async fn monitor_cond(&self, db: &str, request: MonitorRequest) -> Result<Monitor, Error> {
        self.start_monitor(db, request, Version::V2).await
    }

    async fn start_monitor(&self, db: &str, request: MonitorRequest, version: Version) -> Result<Monitor, Error> {
        let schema = self.get_schema(db).await?;
        let id = format!("qx-mon-{}", self.inner.shared.next_id());
        let inner = Arc::new(MonitorInner::new(id, db, version, &request, schema));
        let events = inner.subscribe();
        // Made before the request, so that if this future is dropped or fails, dropping the handle cancels the
        // monitor at the server should the reply still arrive.
        let monitor = Monitor::new(inner.clone(), self.clone(), events);
        let call = self.submit(version.method(), &inner.params(), Some(inner.clone()), false).await?;
        call.wait().await?;
        debug!(monitor = %inner.id, db, method = version.method(), "OVSDB monitor started");
        Ok(monitor)
    }

    /// Stops re-establishing `monitor` and, if `cancel`, sends `monitor_cancel` without waiting for the answer.
    pub(crate) fn forget_monitor(&self, monitor: &MonitorInner, cancel: bool) {
        let shared = &self.inner.shared;
        let known = {
            let mut state = shared.lock();
            monitor.cancelled.store(true, Ordering::Release);
            state.monitors.remove(&monitor.id).is_some()
        };
        if cancel && known {
            shared.send_control(rpc::encode_request("monitor_cancel", &json!([monitor.id]), shared.next_id()));
        }
    }

    /// Queues a request and returns its pending reply.
    async fn submit(
        &self,
        method: &str,
        params: &Json,
        monitor: Option<Arc<MonitorInner>>,
        cancel_on_drop: bool,
    ) -> Result<PendingCall, Error> {
        let shared = &self.inner.shared;
        let timeout = shared.opts.request_timeout;
        let deadline = Instant::now() + timeout;
        if let Some(reason) = shared.lock().closed.clone() {
            return Err(Error::Closed { method: method.to_owned(), reason });
        }
        let id = shared.next_id();
        let (reply, receiver) = oneshot::channel();
        let out =
            Outgoing { id, method: method.into(), bytes: rpc::encode_request(method, params, id), reply, monitor };
        let call = PendingCall {
            shared: shared.clone(),
            id,
            method: method.to_owned(),
            receiver,
            deadline,
            timeout,
            cancel_on_drop,
            done: false,
        };
        match tokio::time::timeout_at(deadline, self.inner.queue.send(out)).await {
            Ok(Ok(())) => Ok(call),
            Ok(Err(_)) => Err(call.closed_error()),
            Err(_) => Err(Error::Timeout { method: method.to_owned(), timeout }),
        }
    }
}

/// A request on its way: removes itself from the pending map however it ends, and for a transaction sends
/// `cancel` if it ends without a reply.
struct PendingCall {
    shared: Arc<Shared>,
    id: u64,
    method: String,
    receiver: oneshot::Receiver<Reply>,
    deadline: Instant,
    timeout: Duration,
    cancel_on_drop: bool,
    done: bool,
}

impl PendingCall {
    async fn wait(mut self) -> Result<Json, Error> {
        let reply = tokio::time::timeout_at(self.deadline, &mut self.receiver).await;
        let method = || self.method.clone();
        let result = match reply {
            Err(_) => {
                debug!(method = %self.method, id = self.id, "OVSDB request timed out");
                return Err(Error::Timeout { method: method(), timeout: self.timeout });
            }
            Ok(Ok(Ok(json))) => Ok(json),
            Ok(Ok(Err(Failure::Rpc(RpcError { error, details })))) => {
                Err(Error::Rpc { method: method(), error, details })
            }
            Ok(Ok(Err(Failure::Disconnected))) => Err(Error::Disconnected { method: method() }),
            Ok(Ok(Err(Failure::Closed(reason)))) => Err(Error::Closed { method: method(), reason }),
            Ok(Err(_)) => Err(self.closed_error()),
        };
        self.done = true;
        result
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            method: self.method.clone(),
            reason: self.shared.lock().closed.clone().unwrap_or_else(|| "the connection task ended".to_owned()),
        }
    }

    fn cancel(&mut self) {
        let was_sent = self.shared.unregister(self.id);
        if was_sent && self.cancel_on_drop {
            debug!(method = %self.method, id = self.id, "canceling OVSDB request");
            self.shared.send_control(rpc::encode_notification("cancel", &json!([self.id])));
        }
        self.done = true;
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}

/// A `transact` in flight, from [`Client::start_transact`].
pub struct PendingTransact {
    call: PendingCall,
    db: String,
    kinds: Vec<&'static str>,
}

impl fmt::Debug for PendingTransact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingTransact").field("id", &self.call.id).field("db", &self.db).finish_non_exhaustive()
    }
}

impl PendingTransact {
    /// The JSON-RPC id it went out with.
    pub fn id(&self) -> u64 {
        self.call.id
    }

    /// Sends `cancel` (RFC 7047 §4.1.4) and stops waiting. A transaction the server already committed stays
    /// committed; one blocked in a `wait` is abandoned. (ovsdb-server 3.1 drops it without the `canceled` reply the
    /// RFC describes; either way nothing waits for an answer here.)
    pub fn cancel(mut self) {
        self.call.cancel();
    }

    /// Waits for the results, one per operation.
    pub async fn wait(self) -> Result<Vec<OperationResult>, Error> {
        let json = self.call.wait().await?;
        transaction_results(&self.db, &self.kinds, json)
    }
}

/// Checks a `transact` result array: the first error (an operation's, or the extra one a failed commit adds) fails
/// the whole transaction.
fn transaction_results(db: &str, kinds: &[&'static str], json: Json) -> Result<Vec<OperationResult>, Error> {
    let decode = |reason: String| Error::Decode { method: "transact".into(), reason };
    let Json::Array(items) = json else {
        return Err(decode(format!("result is not an array: {json}")));
    };
    let mut results = Vec::with_capacity(kinds.len());
    for (index, item) in items.iter().enumerate() {
        if let Some(error) = item.get("error") {
            let text = |j: Option<&Json>| match j {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            return Err(Error::Transaction {
                db: db.to_owned(),
                index,
                op: kinds.get(index).copied().unwrap_or("commit"),
                error: text(Some(error)),
                details: text(item.get("details")),
            });
        }
        if index < kinds.len() {
            results.push(OperationResult::from_json(item).map_err(decode)?);
        }
    }
    if results.len() < kinds.len() {
        return Err(decode(format!("{} results for {} operations", results.len(), kinds.len())));
    }
    Ok(results)
}

type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn split(self) -> (BoxRead, BoxWrite) {
        match self {
            Conn::Unix(stream) => {
                let (r, w) = stream.into_split();
                (Box::pin(r), Box::pin(w))
            }
            Conn::Tcp(stream) => {
                let (r, w) = stream.into_split();
                (Box::pin(r), Box::pin(w))
            }
        }
    }
}

async fn connect_once(endpoint: &Endpoint) -> io::Result<Conn> {
    match endpoint {
        Endpoint::Unix(path) => UnixStream::connect(path).await.map(Conn::Unix),
        Endpoint::Tcp(addr) => {
            let stream = TcpStream::connect(addr.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(Conn::Tcp(stream))
        }
    }
}

async fn connect_with_retry(endpoint: &Endpoint, deadline: Instant) -> Result<Conn, Error> {
    let mut delay = CONNECT_RETRY_START;
    loop {
        let error = match tokio::time::timeout_at(deadline, connect_once(endpoint)).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(error)) => error,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect did not complete in time"),
        };
        let retryable = matches!(error.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused);
        let now = Instant::now();
        if !retryable || now >= deadline {
            return Err(Error::Connect { endpoint: endpoint.to_string(), source: error });
        }
        tokio::time::sleep_until(deadline.min(now + delay)).await;
        delay = (delay * 2).min(CONNECT_RETRY_MAX);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The session: one connection after another, until the client is dropped.
async fn supervise(shared: Arc<Shared>, mut queue: mpsc::Receiver<Outgoing>, first: Conn) {
    let mut conn = Some(first);
    let mut generation = 0;
    let mut delay = shared.opts.reconnect.map(|b| b.initial);
    loop {
        let stream = match conn.take() {
            Some(stream) => stream,
            None => {
                let (Some(backoff), Some(wait)) = (shared.opts.reconnect, delay) else {
                    shared.shutdown("the connection was lost and reconnecting is disabled");
                    return;
                };
                tokio::time::sleep(wait).await;
                delay = Some((wait * 2).min(backoff.max));
                match connect_once(&shared.endpoint).await {
                    Ok(stream) => stream,
                    Err(error) => {
                        debug!(endpoint = %shared.endpoint, %error, "OVSDB reconnect failed; retrying");
                        continue;
                    }
                }
            }
        };
        generation += 1;
        let started = Instant::now();
        if generation > 1 {
            info!(endpoint = %shared.endpoint, generation, "OVSDB reconnected");
        }
        let Some(reason) = run_connection(&shared, &mut queue, stream, generation).await else {
            return;
        };
        warn!(endpoint = %shared.endpoint, %reason, "OVSDB connection lost; reconnecting");
        shared.disconnected(generation, &reason);
        if started.elapsed() >= STABLE_CONNECTION {
            delay = shared.opts.reconnect.map(|b| b.initial);
        }
    }
}

/// Serves one connection: writes until the reader reports its end. `None` when every client handle is gone.
async fn run_connection(
    shared: &Arc<Shared>,
    queue: &mut mpsc::Receiver<Outgoing>,
    conn: Conn,
    generation: u64,
) -> Option<String> {
    let (read, mut write) = conn.split();
    let (control, mut controls) = mpsc::unbounded_channel();
    shared.lock().control = Some(control.clone());
    let mut reader = tokio::spawn(read_loop(read, shared.clone(), control));
    let _reader_guard = AbortOnDrop(reader.abort_handle());
    let _resubscribe = AbortOnDrop(tokio::spawn(resubscribe(shared.clone())).abort_handle());
    shared.status.send_replace(ConnectionState::Connected { generation });

    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            biased;
            reason = &mut reader => {
                return Some(reason.unwrap_or_else(|e| format!("the OVSDB reader task failed: {e}")));
            }
            Some(bytes) = controls.recv() => buf.extend_from_slice(&bytes),
            out = queue.recv() => match out {
                Some(out) => shared.register_outgoing(out, &mut buf),
                None => return None,
            },
        }
        while buf.len() < MAX_WRITE {
            if let Ok(bytes) = controls.try_recv() {
                buf.extend_from_slice(&bytes);
            } else if let Ok(out) = queue.try_recv() {
                shared.register_outgoing(out, &mut buf);
            } else {
                break;
            }
        }
        if buf.is_empty() {
            continue;
        }
        // A server that stops reading would block this write forever; the reader noticing the end of the
        // connection (or a failed echo probe) must still get through.
        tokio::select! {
            biased;
            reason = &mut reader => {
                return Some(reason.unwrap_or_else(|e| format!("the OVSDB reader task failed: {e}")));
            }
            written = write.write_all(&buf) => {
                if let Err(error) = written {
                    return Some(format!("writing to the OVSDB socket failed: {error}"));
                }
            }
        }
        buf.clear();
        if buf.capacity() > 4 * MAX_WRITE {
            buf = Vec::with_capacity(64 * 1024);
        }
    }
}

async fn read_loop(mut read: BoxRead, shared: Arc<Shared>, control: mpsc::UnboundedSender<Vec<u8>>) -> String {
    let mut framer = Framer::new(shared.opts.max_message_size);
    let probe = shared.opts.probe_interval;
    let mut probing = false;
    loop {
        let read_result = match probe {
            None => read.read_buf(framer.read_buf()).await,
            Some(interval) => match tokio::time::timeout(interval, read.read_buf(framer.read_buf())).await {
                Ok(result) => result,
                Err(_) if probing => return format!("no message within {interval:?} of an echo probe"),
                Err(_) => {
                    probing = true;
                    debug!("OVSDB connection idle; sending an echo probe");
                    let probe = serde_json::to_vec(&json!({"method": "echo", "params": [], "id": PROBE_ID}))
                        .expect("a JSON value always serializes");
                    let _ = control.send(probe);
                    continue;
                }
            },
        };
        match read_result {
            Ok(0) => {
                let partial = framer.partial_len();
                return if partial > 0 {
                    format!("the server closed the connection in the middle of a {partial}-byte message")
                } else {
                    "the server closed the connection".to_owned()
                };
            }
            Ok(_) => probing = false,
            Err(error) => return format!("reading the OVSDB socket failed: {error}"),
        }
        loop {
            match framer.next_frame() {
                Ok(Some(frame)) => shared.dispatch(frame, &control),
                Ok(None) => break,
                Err(error) => return format!("OVSDB stream framing lost: {error}"),
            }
        }
    }
}

/// After a reconnect: fetches each monitored database's schema again, then asks for every monitor again. The
/// reader applies the replies (as [`UpdateKind::Resync`](super::UpdateKind::Resync) updates).
async fn resubscribe(shared: Arc<Shared>) {
    let monitors: Vec<Arc<MonitorInner>> = shared.lock().monitors.values().cloned().collect();
    if monitors.is_empty() {
        return;
    }
    let timeout = shared.opts.request_timeout;
    let dbs: BTreeSet<String> = monitors.iter().map(|m| m.db.clone()).collect();
    for db in dbs {
        let Some(reply) = shared.control_request("get_schema", &json!([db]), None) else {
            return;
        };
        let schema = match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(Ok(json))) => Schema::from_json(&json),
            Ok(Ok(Err(Failure::Rpc(e)))) => Err(format!("{}: {}", e.error, e.details.unwrap_or_default())),
            Ok(Ok(Err(_)) | Err(_)) => return,
            Err(_) => Err(format!("no reply within {timeout:?}")),
        };
        match schema {
            Ok(schema) => {
                let schema = Arc::new(schema);
                shared.lock().schemas.insert(db.clone(), schema.clone());
                for monitor in monitors.iter().filter(|m| m.db == db) {
                    monitor.set_schema(schema.clone());
                }
            }
            Err(reason) => {
                warn!(%db, %reason, "fetching the OVSDB schema after a reconnect failed; monitors keep the old one");
            }
        }
    }
    let mut replies = Vec::new();
    for monitor in &monitors {
        match shared.control_request(monitor.version.method(), &monitor.params(), Some(monitor.clone())) {
            Some(reply) => replies.push((monitor, reply)),
            None => return,
        }
    }
    for (monitor, reply) in replies {
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(Ok(_))) => debug!(monitor = %monitor.id, "OVSDB monitor re-established"),
            Ok(Ok(Err(Failure::Rpc(e)))) => {
                let reason = format!("{}: {}", e.error, e.details.unwrap_or_default());
                warn!(monitor = %monitor.id, %reason, "re-establishing an OVSDB monitor failed");
                shared.lock().monitors.remove(&monitor.id);
                monitor.fail(reason);
            }
            Ok(_) => return,
            Err(_) => warn!(monitor = %monitor.id, "no reply re-establishing an OVSDB monitor"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovsdb::ops::Condition;
    use crate::ovsdb::MonitorEvent;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/run/openvswitch/db.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/openvswitch/db.sock".into())
        );
        assert_eq!("/tmp/db.sock".parse::<Endpoint>().unwrap().to_string(), "unix:/tmp/db.sock");
        assert_eq!("tcp:127.0.0.1:6640".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:6640".into()));
        assert_eq!("tcp:[::1]:6640".parse::<Endpoint>().unwrap().to_string(), "tcp:[::1]:6640");
        for bad in ["", "unix:", "tcp:host", "tcp::1", "tcp:h:99999", "ssl:1.2.3.4:6640", "db.sock"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn transaction_errors_name_the_operation() {
        let kinds = ["insert", "wait"];
        let ok =
            transaction_results("db", &kinds, json!([{"uuid": ["uuid", "539ab4cc-85e2-4afd-8fca-c43ed913e701"]}, {}]))
                .unwrap();
        assert!(ok[0].uuid.is_some());
        let err =
            transaction_results("db", &kinds, json!([{}, {"error": "timed out", "details": "\"wait\" timed out"}]))
                .unwrap_err();
        assert_eq!(err.transaction_error(), Some((1, "timed out")));
        assert_eq!(
            err.to_string(),
            "OVSDB transaction on db: operation 1 (wait) failed: timed out: \"wait\" timed out"
        );
        let err = transaction_results(
            "db",
            &kinds,
            json!([{}, {}, {"error": "constraint violation", "details": "duplicate name"}]),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Transaction { index: 2, op: "commit", .. }), "{err:?}");
        assert!(transaction_results("db", &kinds, json!([{}])).is_err());
        assert!(transaction_results("db", &kinds, json!({})).is_err());
    }

    /// A scripted server on a socket pair: the client under test talks to it.
    struct FakeServer {
        stream: UnixStream,
        framer: Framer,
    }

    impl FakeServer {
        async fn recv(&mut self) -> Json {
            loop {
                if let Some(frame) = self.framer.next_frame().unwrap() {
                    return serde_json::from_slice(frame).unwrap();
                }
                let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(self.framer.read_buf()))
                    .await
                    .expect("no request")
                    .unwrap();
                assert!(n > 0, "client closed");
            }
        }

        async fn send(&mut self, json: Json) {
            // No separator between messages, as ovsdb-server does.
            self.stream.write_all(json.to_string().as_bytes()).await.unwrap();
        }
    }

    async fn pair() -> (Client, FakeServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let opts =
            ClientOptions { request_timeout: Duration::from_secs(5), reconnect: None, ..ClientOptions::default() };
        let (client, accepted) = tokio::join!(Client::connect(Endpoint::Unix(path), opts), listener.accept());
        let server = FakeServer { stream: accepted.unwrap().0, framer: Framer::new(1 << 20) };
        (client.unwrap(), server, dir)
    }

    #[tokio::test]
    async fn replies_match_requests_by_id_in_any_order() {
        let (client, mut server, _dir) = pair().await;
        let a = tokio::spawn({
            let client = client.clone();
            async move { client.echo(vec![json!("a")]).await }
        });
        let b = tokio::spawn({
            let client = client.clone();
            async move { client.list_dbs().await }
        });
        let first = server.recv().await;
        let second = server.recv().await;
        let (echo, list) = if first["method"] == "echo" { (first, second) } else { (second, first) };
        // Both replies in one write, the later request first.
        let replies = format!(
            "{}{}",
            json!({"id": list["id"], "result": ["Open_vSwitch"], "error": null}),
            json!({"id": echo["id"], "result": ["a"], "error": null})
        );
        server.stream.write_all(replies.as_bytes()).await.unwrap();
        assert_eq!(a.await.unwrap().unwrap(), vec![json!("a")]);
        assert_eq!(b.await.unwrap().unwrap(), vec!["Open_vSwitch".to_owned()]);
    }

    #[tokio::test]
    async fn server_echo_is_answered() {
        let (_client, mut server, _dir) = pair().await;
        server.send(json!({"method": "echo", "params": ["ping", 1], "id": "e1"})).await;
        let reply = server.recv().await;
        assert_eq!(reply, json!({"id": "e1", "result": ["ping", 1], "error": null}));
        server.send(json!({"method": "frobnicate", "params": [], "id": 9})).await;
        assert_eq!(server.recv().await["error"], "unknown method");
    }

    #[tokio::test]
    async fn errors_and_closed_connections_fail_requests() {
        let (client, mut server, _dir) = pair().await;
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.call("get_schema", json!(["Nope"])).await }
        });
        let request = server.recv().await;
        server.send(json!({"id": request["id"], "error": {"error": "unknown database", "details": "Nope"}})).await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "OVSDB request `get_schema` failed: unknown database: Nope");

        let call = tokio::spawn({
            let client = client.clone();
            async move { client.list_dbs().await }
        });
        server.recv().await;
        drop(server);
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Disconnected { .. }), "{err:?}");
        let mut state = client.state();
        state.wait_for(|s| matches!(s, ConnectionState::Closed { .. })).await.unwrap();
        let err = client.list_dbs().await.unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn dropped_transaction_sends_cancel() {
        let (client, mut server, _dir) = pair().await;
        let pending =
            client.start_transact("db", &[Operation::select("T", vec![Condition::eq("name", "x")])]).await.unwrap();
        let request = server.recv().await;
        assert_eq!(request["method"], "transact");
        assert_eq!(request["params"][0], "db");
        assert_eq!(request["id"], json!(pending.id()));
        pending.cancel();
        let cancel = server.recv().await;
        assert_eq!(cancel, json!({"method": "cancel", "params": [request["id"]], "id": null}));
    }

    #[tokio::test]
    async fn monitor_reply_and_updates_arrive_in_order() {
        let (client, mut server, _dir) = pair().await;
        let start = tokio::spawn({
            let client = client.clone();
            async move {
                client.monitor_cond("Open_vSwitch", MonitorRequest::new().table("Interface", &["name", "ofport"])).await
            }
        });
        let schema_request = server.recv().await;
        server
            .send(json!({"id": schema_request["id"], "result": {"name": "Open_vSwitch", "tables": {"Interface": {"columns": {
                "name": {"type": "string"}, "ofport": {"type": {"key": "integer", "min": 0, "max": 1}}}}}}, "error": null}))
            .await;
        let monitor_request = server.recv().await;
        assert_eq!(monitor_request["method"], "monitor_cond");
        let monitor_id = monitor_request["params"][1].clone();
        // The reply and an update to a row it introduced, back to back.
        let both = format!(
            "{}{}",
            json!({"id": monitor_request["id"], "result": {"Interface": {"8ef75d2c-34c6-40ef-8ba5-ed0570a8851f": {"initial": {"name": "p1"}}}}, "error": null}),
            json!({"id": null, "method": "update2", "params": [monitor_id, {"Interface": {"8ef75d2c-34c6-40ef-8ba5-ed0570a8851f": {"modify": {"ofport": 7}}}}]})
        );
        server.stream.write_all(both.as_bytes()).await.unwrap();
        let mut monitor = start.await.unwrap().unwrap();
        let ofport = monitor
            .wait_for(Duration::from_secs(5), |r| r.find("Interface", "name", "p1")?.1["ofport"].as_i64())
            .await
            .unwrap();
        assert_eq!(ofport, 7);
        assert!(
            matches!(monitor.next().await, Some(MonitorEvent::Update(u)) if u.kind == crate::ovsdb::UpdateKind::Initial)
        );
        assert!(
            matches!(monitor.next().await, Some(MonitorEvent::Update(u)) if u.kind == crate::ovsdb::UpdateKind::Change)
        );

        drop(monitor);
        let cancel = server.recv().await;
        assert_eq!(cancel["method"], "monitor_cancel");
        assert_eq!(cancel["params"], json!([monitor_id]));
    }
}
