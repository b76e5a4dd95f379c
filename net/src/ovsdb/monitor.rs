//! Monitors (RFC 7047 §4.1.5, and `monitor_cond` from ovsdb-server(7)): a replica of the monitored rows, kept
//! current from the server's `update`/`update2`/`update3` notifications, with a stream of changes and a way to wait
//! until the replica satisfies a condition.
//!
//! The client keeps every monitor across reconnects: after the connection comes back it asks again (same id, same
//! tables, columns and conditions) and turns the difference between the old replica and the fresh initial contents
//! into an ordinary [`Update`] of kind [`UpdateKind::Resync`]. A subscriber therefore sees one consistent sequence
//! of changes, with rows deleted or changed while the connection was down reported like any other change.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::sync::{broadcast, watch};
use tracing::{debug, warn};
use uuid::Uuid;

use super::client::Client;
use super::data::{row_from_json, Row, Value};
use super::error::Error;
use super::ops::Condition;
use super::schema::Schema;

/// Events a subscriber may fall behind by before it gets [`MonitorEvent::Lagged`].
const EVENT_CAPACITY: usize = 1024;

/// Which rows and columns of one table to monitor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableMonitor {
    /// Columns to monitor; all of them when empty.
    pub columns: Vec<String>,
    /// `monitor_cond` only: rows to monitor (every clause must hold); all rows when `None`.
    pub conditions: Option<Vec<Condition>>,
    /// Which kinds of change to report; all when `None`.
    pub select: Option<Select>,
}

/// Which changes a monitor reports (each defaults to true at the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Select {
    /// The rows present when the monitor starts.
    pub initial: bool,
    /// Inserted rows.
    pub insert: bool,
    /// Deleted rows.
    pub delete: bool,
    /// Modified rows.
    pub modify: bool,
}

/// What to monitor: tables, each with its columns (and, for `monitor_cond`, conditions).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitorRequest {
    /// Tables by name.
    pub tables: BTreeMap<String, TableMonitor>,
}

impl MonitorRequest {
    /// An empty request; add tables with [`table`](Self::table).
    pub fn new() -> Self {
        Self::default()
    }

    /// Monitors `columns` (all when empty) of every row of `table`.
    pub fn table(mut self, table: &str, columns: &[&str]) -> Self {
        self.tables.insert(
            table.to_owned(),
            TableMonitor { columns: columns.iter().map(|c| (*c).to_owned()).collect(), ..TableMonitor::default() },
        );
        self
    }

    /// Monitors `columns` of the rows of `table` matching `conditions` (`monitor_cond` only).
    pub fn table_where(mut self, table: &str, columns: &[&str], conditions: Vec<Condition>) -> Self {
        self.tables.insert(
            table.to_owned(),
            TableMonitor {
                columns: columns.iter().map(|c| (*c).to_owned()).collect(),
                conditions: Some(conditions),
                select: None,
            },
        );
        self
    }

    fn to_json(&self, version: Version) -> Json {
        let mut tables = Map::new();
        for (name, table) in &self.tables {
            let mut request = Map::new();
            if !table.columns.is_empty() {
                request.insert("columns".into(), json!(table.columns));
            }
            if let Some(conditions) = &table.conditions {
                request.insert("where".into(), serde_json::to_value(conditions).expect("conditions always serialize"));
            }
            if let Some(s) = table.select {
                request.insert(
                    "select".into(),
                    json!({"initial": s.initial, "insert": s.insert, "delete": s.delete, "modify": s.modify}),
                );
            }
            let request = Json::Object(request);
            tables.insert(
                name.clone(),
                match version {
                    Version::V1 => request,
                    Version::V2 => Json::Array(vec![request]),
                },
            );
        }
        Json::Object(tables)
    }
}

/// The monitored rows: table name → row uuid → row.
///
/// Rows hold the monitored columns, normalized with the schema (see [`Value`]) and with the defaults the server
/// omits filled in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replica {
    tables: BTreeMap<String, BTreeMap<Uuid, Row>>,
}

impl Replica {
    /// The rows of `table` (none if it is not monitored).
    pub fn rows<'a>(&'a self, table: &str) -> impl Iterator<Item = (&'a Uuid, &'a Row)> + 'a {
        self.tables.get(table).into_iter().flatten()
    }

    /// One row.
    pub fn row(&self, table: &str, uuid: &Uuid) -> Option<&Row> {
        self.tables.get(table)?.get(uuid)
    }

    /// The first row of `table` whose string column `column` is `value` (e.g. `name`).
    pub fn find(&self, table: &str, column: &str, value: &str) -> Option<(Uuid, &Row)> {
        self.rows(table)
            .find(|(_, row)| row.get(column).and_then(Value::as_str) == Some(value))
            .map(|(uuid, row)| (*uuid, row))
    }

    /// How many rows `table` has.
    pub fn len(&self, table: &str) -> usize {
        self.tables.get(table).map_or(0, BTreeMap::len)
    }

    /// Whether no table has rows.
    pub fn is_empty(&self) -> bool {
        self.tables.values().all(BTreeMap::is_empty)
    }

    fn table_mut(&mut self, table: &str) -> &mut BTreeMap<Uuid, Row> {
        if !self.tables.contains_key(table) {
            self.tables.insert(table.to_owned(), BTreeMap::new());
        }
        self.tables.get_mut(table).expect("just inserted")
    }
}

/// One row's change, with whole rows before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct RowUpdate {
    /// The table.
    pub table: String,
    /// The row's uuid.
    pub uuid: Uuid,
    /// The row before; `None` for an insert.
    pub old: Option<Row>,
    /// The row after; `None` for a delete.
    pub new: Option<Row>,
}

/// Why an [`Update`] was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// The contents when the monitor started: every row, as inserts.
    Initial,
    /// A change committed at the server.
    Change,
    /// The monitor was re-established after a reconnect: what changed while the connection was down.
    Resync,
}

/// A batch of row changes, from one notification (one or more committed transactions).
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Why.
    pub kind: UpdateKind,
    /// The changed rows.
    pub rows: Vec<RowUpdate>,
}

/// What [`Monitor::next`] returns.
#[derive(Debug, Clone)]
pub enum MonitorEvent {
    /// Rows changed; the replica already reflects them.
    Update(Arc<Update>),
    /// The connection dropped. The replica keeps its last contents; an [`UpdateKind::Resync`] update follows once
    /// the client has reconnected.
    Disconnected,
    /// This subscriber fell this many events behind and missed them; the replica is still current.
    Lagged(u64),
    /// Re-establishing the monitor after a reconnect failed (e.g. the table is gone); it gets no more updates.
    Failed(String),
}

/// Which monitor method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// `monitor`, `update` notifications.
    V1,
    /// `monitor_cond`, `update2` notifications.
    V2,
}

impl Version {
    pub(crate) fn method(self) -> &'static str {
        match self {
            Version::V1 => "monitor",
            Version::V2 => "monitor_cond",
        }
    }
}

struct MonitorState {
    replica: Replica,
    schema: Arc<Schema>,
    established: bool,
    /// The replica is current: the (re)established monitor's reply was applied and the connection has not been
    /// lost since.
    synced: bool,
    /// `None` once the client closed: subscribers then see the end of the stream.
    events: Option<broadcast::Sender<MonitorEvent>>,
}

/// A monitor's state, shared by its handle and the client's reader task.
pub(crate) struct MonitorInner {
    pub(crate) id: String,
    pub(crate) db: String,
    pub(crate) version: Version,
    request: Json,
    /// Monitored columns per table (empty: all), for filling in defaults.
    columns: BTreeMap<String, Vec<String>>,
    state: Mutex<MonitorState>,
    /// Bumped after every change of the replica (and on close), for [`Monitor::wait_for`].
    changed: watch::Sender<u64>,
    /// Set when the handle is gone, so a late reply does not bring the monitor back.
    pub(crate) cancelled: AtomicBool,
}

impl MonitorInner {
    pub(crate) fn new(id: String, db: &str, version: Version, request: &MonitorRequest, schema: Arc<Schema>) -> Self {
        Self {
            id,
            db: db.to_owned(),
            version,
            request: request.to_json(version),
            columns: request.tables.iter().map(|(table, m)| (table.clone(), m.columns.clone())).collect(),
            state: Mutex::new(MonitorState {
                replica: Replica::default(),
                schema,
                established: false,
                synced: false,
                events: Some(broadcast::channel(EVENT_CAPACITY).0),
            }),
            changed: watch::Sender::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MonitorState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The request's `params`.
    pub(crate) fn params(&self) -> Json {
        json!([self.db, self.id, self.request])
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<MonitorEvent> {
        match &self.lock().events {
            Some(events) => events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    pub(crate) fn set_schema(&self, schema: Arc<Schema>) {
        self.lock().schema = schema;
    }

    fn fill_columns(&self, table: &str) -> Option<&[String]> {
        match self.columns.get(table) {
            Some(columns) if !columns.is_empty() => Some(columns),
            _ => None,
        }
    }

    fn publish(&self, state: &MonitorState, event: MonitorEvent) {
        if let Some(events) = &state.events {
            // An error only means nobody is subscribed right now.
            let _ = events.send(event);
        }
    }

    /// Applies the reply to the `monitor`/`monitor_cond` request: the initial contents, or after a reconnect the
    /// current contents, replacing the replica.
    pub(crate) fn apply_reply(&self, result: &Json) {
        let mut state = self.lock();
        let mut fresh = Replica::default();
        let mut scratch = Vec::new();
        if let Err(reason) = self.apply_table_updates(&mut fresh, &state.schema, result, &mut scratch) {
            warn!(monitor = %self.id, %reason, "malformed OVSDB monitor reply; some rows are missing");
        }
        let update = if state.established {
            Update { kind: UpdateKind::Resync, rows: diff_replicas(&state.replica, &fresh) }
        } else {
            Update { kind: UpdateKind::Initial, rows: scratch }
        };
        debug!(monitor = %self.id, kind = ?update.kind, rows = update.rows.len(), "OVSDB monitor (re)established");
        state.replica = fresh;
        state.established = true;
        state.synced = true;
        self.publish(&state, MonitorEvent::Update(Arc::new(update)));
        drop(state);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Applies an `update`, `update2` or `update3` notification's `params`.
    pub(crate) fn apply_notification(&self, method: &str, params: &Json) {
        let updates = match (method, params.as_array().map(Vec::as_slice)) {
            ("update" | "update2", Some([_, updates])) => updates,
            ("update3", Some([_, _, updates])) => updates,
            _ => {
                warn!(monitor = %self.id, method, "malformed OVSDB update notification; ignored");
                return;
            }
        };
        let mut state = self.lock();
        let state = &mut *state;
        let mut rows = Vec::new();
        if let Err(reason) = self.apply_table_updates(&mut state.replica, &state.schema, updates, &mut rows) {
            warn!(monitor = %self.id, %reason, "malformed OVSDB update; part of it was ignored");
        }
        let update = Update { kind: UpdateKind::Change, rows };
        self.publish(state, MonitorEvent::Update(Arc::new(update)));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Applies `<table-updates>` (or `<table-updates2>`) to `replica`, recording every row change in `out`.
    fn apply_table_updates(
        &self,
        replica: &mut Replica,
        schema: &Schema,
        updates: &Json,
        out: &mut Vec<RowUpdate>,
    ) -> Result<(), String> {
        let Json::Object(tables) = updates else {
            return Err(format!("table updates are not an object: {updates}"));
        };
        let mut problem = None;
        for (table, rows) in tables {
            let Json::Object(rows) = rows else {
                problem = Some(format!("updates of table {table} are not an object"));
                continue;
            };
            for (uuid, update) in rows {
                let result = Uuid::parse_str(uuid).map_err(|e| format!("bad row uuid {uuid:?}: {e}")).and_then(
                    |uuid| match self.version {
                        Version::V1 => self.apply_row_update(replica, schema, table, uuid, update),
                        Version::V2 => self.apply_row_update2(replica, schema, table, uuid, update),
                    },
                );
                match result {
                    Ok(Some(change)) => out.push(change),
                    Ok(None) => {}
                    Err(reason) => problem = Some(format!("{table} {uuid}: {reason}")),
                }
            }
        }
        problem.map_or(Ok(()), Err)
    }

    /// `<row-update>`: `old` and/or `new`; `new` holds every monitored column.
    fn apply_row_update(
        &self,
        replica: &mut Replica,
        schema: &Schema,
        table: &str,
        uuid: Uuid,
        update: &Json,
    ) -> Result<Option<RowUpdate>, String> {
        let rows = replica.table_mut(table);
        let Some(new) = update.get("new") else {
            let old = rows.remove(&uuid);
            return Ok(old.map(|old| change(table, uuid, Some(old), None)));
        };
        let mut new = row_from_json(new)?;
        schema.complete_row(table, &mut new, self.fill_columns(table));
        let old = rows.get(&uuid).cloned();
        let mut row = old.clone().unwrap_or_default();
        row.extend(new);
        rows.insert(uuid, row.clone());
        Ok(Some(change(table, uuid, old, Some(row))))
    }

    /// `<row-update2>`: exactly one of `initial`, `insert`, `delete`, `modify` (a difference, see
    /// [`ColumnType::apply_diff`](super::ColumnType::apply_diff)).
    fn apply_row_update2(
        &self,
        replica: &mut Replica,
        schema: &Schema,
        table: &str,
        uuid: Uuid,
        update: &Json,
    ) -> Result<Option<RowUpdate>, String> {
        let rows = replica.table_mut(table);
        let Json::Object(update) = update else {
            return Err("row update is not an object".into());
        };
        let Some((kind, body)) = update.iter().next() else {
            return Err("empty row update".into());
        };
        match kind.as_str() {
            "initial" | "insert" => {
                let mut row = row_from_json(body)?;
                schema.complete_row(table, &mut row, self.fill_columns(table));
                let old = rows.insert(uuid, row.clone());
                Ok(Some(change(table, uuid, old, Some(row))))
            }
            "delete" => Ok(rows.remove(&uuid).map(|old| change(table, uuid, Some(old), None))),
            "modify" => {
                let diff = row_from_json(body)?;
                let Some(row) = rows.get_mut(&uuid) else {
                    return Err("modify of a row the replica does not have".into());
                };
                let old = row.clone();
                for (column, diff) in diff {
                    match schema.column_type(table, &column) {
                        Some(ty) => {
                            let current = row.entry(column).or_insert_with(|| ty.default_value());
                            ty.apply_diff(current, diff);
                        }
                        None => {
                            row.insert(column, diff);
                        }
                    }
                }
                let new = row.clone();
                Ok(Some(change(table, uuid, Some(old), Some(new))))
            }
            other => Err(format!("unknown row update kind {other:?}")),
        }
    }

    pub(crate) fn disconnected(&self) {
        let mut state = self.lock();
        state.synced = false;
        self.publish(&state, MonitorEvent::Disconnected);
        drop(state);
        self.changed.send_modify(|v| *v += 1);
    }

    pub(crate) fn fail(&self, reason: String) {
        let state = self.lock();
        self.publish(&state, MonitorEvent::Failed(reason));
    }

    /// The client closed: ends every subscriber's stream and wakes every waiter.
    pub(crate) fn close(&self) {
        let events = self.lock().events.take();
        drop(events);
        self.changed.send_modify(|v| *v += 1);
    }
}

fn change(table: &str, uuid: Uuid, old: Option<Row>, new: Option<Row>) -> RowUpdate {
    RowUpdate { table: table.to_owned(), uuid, old, new }
}

/// What turns `old` into `new`, as row changes.
fn diff_replicas(old: &Replica, new: &Replica) -> Vec<RowUpdate> {
    let mut out = Vec::new();
    let empty = BTreeMap::new();
    let tables: std::collections::BTreeSet<&String> = old.tables.keys().chain(new.tables.keys()).collect();
    for table in tables {
        let before = old.tables.get(table).unwrap_or(&empty);
        let after = new.tables.get(table).unwrap_or(&empty);
        for (uuid, row) in before {
            match after.get(uuid) {
                None => out.push(change(table, *uuid, Some(row.clone()), None)),
                Some(now) if now != row => out.push(change(table, *uuid, Some(row.clone()), Some(now.clone()))),
                Some(_) => {}
            }
        }
        for (uuid, row) in after {
            if !before.contains_key(uuid) {
                out.push(change(table, *uuid, None, Some(row.clone())));
            }
        }
    }
    out
}

/// A live monitor: the replica of what it monitors, and the changes as they come.
///
/// Created by [`Client::monitor`] or [`Client::monitor_cond`]. It keeps the client alive; dropping it cancels the
/// monitor at the server (`monitor_cancel`, not waited for).
pub struct Monitor {
    inner: Arc<MonitorInner>,
    client: Client,
    /// `None` after [`discard_events`](Self::discard_events).
    events: Option<broadcast::Receiver<MonitorEvent>>,
    detached: bool,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("id", &self.inner.id).field("db", &self.inner.db).finish_non_exhaustive()
    }
}

impl Monitor {
    pub(crate) fn new(inner: Arc<MonitorInner>, client: Client, events: broadcast::Receiver<MonitorEvent>) -> Self {
        Self { inner, client, events: Some(events), detached: false }
    }

    /// The monitor id (unique within the client).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The database.
    pub fn db(&self) -> &str {
        &self.inner.db
    }

    /// The client it runs on.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next event: the initial contents first, then changes. `None` once the client is closed.
    ///
    /// Events wait in a buffer of 1024; a subscriber further behind gets [`MonitorEvent::Lagged`] and should
    /// resynchronize from [`replica`](Self::replica).
    pub async fn next(&mut self) -> Option<MonitorEvent> {
        let events = self.events.as_mut()?;
        match events.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(MonitorEvent::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Stops buffering events for [`next`](Self::next), which then returns `None`: for a monitor used only
    /// through its replica and [`wait_for`](Self::wait_for), so unread updates do not pile up.
    pub fn discard_events(&mut self) {
        self.events = None;
    }

    /// Another receiver of this monitor's events, from now on (the initial contents are in the replica).
    pub fn subscribe(&self) -> broadcast::Receiver<MonitorEvent> {
        self.inner.subscribe()
    }

    /// A copy of the replica.
    pub fn replica(&self) -> Replica {
        self.inner.lock().replica.clone()
    }

    /// Runs `f` on the replica without copying it. `f` runs under the monitor's lock: keep it short.
    pub fn with_replica<R>(&self, f: impl FnOnce(&Replica) -> R) -> R {
        f(&self.inner.lock().replica)
    }

    /// Waits until `f` returns `Some` for the replica, re-checking after every update, at most `timeout`.
    ///
    /// This is how to wait for ovs-vswitchd to fill in `ofport`, or for another client's change to land, without
    /// polling. `f` runs under the monitor's lock: keep it short.
    pub async fn wait_for<T>(&self, timeout: Duration, mut f: impl FnMut(&Replica) -> Option<T>) -> Result<T, Error> {
        let mut changed = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if let Some(found) = f(&self.inner.lock().replica) {
                return Ok(found);
            }
            if let Some(reason) = self.client.closed_reason() {
                return Err(Error::Closed { method: format!("wait on monitor {}", self.inner.id), reason });
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `inner`, which `self` holds.
                Ok(Err(_)) => unreachable!("monitor change sender dropped while the monitor is alive"),
                Err(_) => return Err(Error::WaitTimeout { monitor: self.inner.id.clone(), timeout }),
            }
        }
    }

    /// Whether the replica is current: the monitor is established and its connection has not been lost since
    /// (after a reconnect: once the resync has been applied).
    pub fn is_synced(&self) -> bool {
        self.inner.lock().synced
    }

    /// Waits until [`is_synced`](Self::is_synced), at most `timeout`: after a lost connection, until the client
    /// has reconnected and the replica holds the server's current contents.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), Error> {
        let mut changed = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if self.is_synced() {
                return Ok(());
            }
            if let Some(reason) = self.client.closed_reason() {
                return Err(Error::Closed { method: format!("resync of monitor {}", self.inner.id), reason });
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => unreachable!("monitor change sender dropped while the monitor is alive"),
                Err(_) => return Err(Error::WaitTimeout { monitor: self.inner.id.clone(), timeout }),
            }
        }
    }

    /// Cancels the monitor at the server (`monitor_cancel`) and waits for the answer.
    pub async fn cancel(mut self) -> Result<(), Error> {
        self.detached = true;
        self.client.forget_monitor(&self.inner, false);
        self.client.call("monitor_cancel", json!([self.inner.id])).await?;
        Ok(())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if !self.detached {
            self.client.forget_monitor(&self.inner, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Arc<Schema> {
        Arc::new(
            Schema::from_json(&json!({
                "name": "Open_vSwitch",
                "tables": {"Interface": {"columns": {
                    "name": {"type": "string"},
                    "ofport": {"type": {"key": "integer", "min": 0, "max": 1}},
                    "external_ids": {"type": {"key": "string", "value": "string", "min": 0, "max": "unlimited"}}
                }}}
            }))
            .unwrap(),
        )
    }

    const U1: &str = "8ef75d2c-34c6-40ef-8ba5-ed0570a8851f";
    const U2: &str = "539ab4cc-85e2-4afd-8fca-c43ed913e701";

    fn next_update(rx: &mut broadcast::Receiver<MonitorEvent>) -> Arc<Update> {
        match rx.try_recv().unwrap() {
            MonitorEvent::Update(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_encode_per_version() {
        let req = MonitorRequest::new().table("Bridge", &[]).table_where(
            "Interface",
            &["name", "ofport"],
            vec![Condition::eq("name", "p1")],
        );
        assert_eq!(
            req.to_json(Version::V2),
            json!({
                "Bridge": [{}],
                "Interface": [{"columns": ["name", "ofport"], "where": [["name", "==", "p1"]]}]
            })
        );
        let req = MonitorRequest::new().table("Bridge", &["name"]);
        assert_eq!(req.to_json(Version::V1), json!({"Bridge": {"columns": ["name"]}}));
    }

    #[test]
    fn update2_stream_builds_the_replica() {
        let req = MonitorRequest::new().table("Interface", &["name", "ofport", "external_ids"]);
        let m = MonitorInner::new("m1".into(), "Open_vSwitch", Version::V2, &req, schema());
        let mut rx = m.subscribe();

        m.apply_reply(&json!({"Interface": {U1: {"initial": {"name": "p1", "ofport": 1}}}}));
        let initial = next_update(&mut rx);
        assert_eq!(initial.kind, UpdateKind::Initial);
        assert_eq!(initial.rows.len(), 1);
        let row = m.lock().replica.row("Interface", &U1.parse().unwrap()).unwrap().clone();
        assert_eq!(row["ofport"], Value::set([1i64]));
        assert_eq!(row["external_ids"], Value::empty_map(), "default filled in");

        m.apply_notification(
            "update2",
            &json!(["m1", {"Interface": {
                U1: {"modify": {"external_ids": ["map", [["a", "b"]]], "ofport": ["set", []]}},
                U2: {"insert": {"name": "p2"}}
            }}]),
        );
        let change = next_update(&mut rx);
        assert_eq!(change.kind, UpdateKind::Change);
        assert_eq!(change.rows.len(), 2);
        let replica = m.lock().replica.clone();
        let (_, p1) = replica.find("Interface", "name", "p1").unwrap();
        assert_eq!(p1["external_ids"].map_get("a").and_then(|a| a.as_str()), Some("b"));
        assert_eq!(p1["ofport"], Value::empty_set());
        assert_eq!(replica.len("Interface"), 2);

        m.apply_notification(
            "update3",
            &json!(["m1", "00000000-0000-0000-0000-000000000000", {"Interface": {U2: {"delete": null}}}]),
        );
        let deleted = next_update(&mut rx);
        assert_eq!(deleted.rows[0].new, None);
        assert_eq!(deleted.rows[0].old.as_ref().unwrap()["name"], Value::from("p2"));
        assert_eq!(m.lock().replica.len("Interface"), 1);
    }

    #[test]
    fn update1_stream_builds_the_replica() {
        let req = MonitorRequest::new().table("Interface", &["name", "ofport"]);
        let m = MonitorInner::new("m1".into(), "Open_vSwitch", Version::V1, &req, schema());
        let mut rx = m.subscribe();
        m.apply_reply(&json!({"Interface": {U1: {"new": {"name": "p1", "ofport": ["set", []]}}}}));
        next_update(&mut rx);
        m.apply_notification(
            "update",
            &json!(["m1", {"Interface": {U1: {"old": {"ofport": ["set", []]}, "new": {"name": "p1", "ofport": 3}}}}]),
        );
        let u = next_update(&mut rx);
        assert_eq!(u.rows[0].old.as_ref().unwrap()["ofport"], Value::empty_set());
        assert_eq!(u.rows[0].new.as_ref().unwrap()["ofport"], Value::set([3i64]));
        m.apply_notification("update", &json!(["m1", {"Interface": {U1: {"old": {"name": "p1", "ofport": 3}}}}]));
        assert!(next_update(&mut rx).rows[0].new.is_none());
        assert!(m.lock().replica.is_empty());
    }

    #[test]
    fn resync_reports_what_changed_while_away() {
        let req = MonitorRequest::new().table("Interface", &["name", "ofport"]);
        let m = MonitorInner::new("m1".into(), "Open_vSwitch", Version::V2, &req, schema());
        let mut rx = m.subscribe();
        m.apply_reply(&json!({"Interface": {U1: {"initial": {"name": "p1", "ofport": 1}}}}));
        next_update(&mut rx);
        m.disconnected();
        assert!(matches!(rx.try_recv().unwrap(), MonitorEvent::Disconnected));
        m.apply_reply(&json!({"Interface": {U2: {"initial": {"name": "p2", "ofport": 2}}}}));
        let resync = next_update(&mut rx);
        assert_eq!(resync.kind, UpdateKind::Resync);
        let deleted: Vec<_> = resync.rows.iter().filter(|r| r.new.is_none()).collect();
        let inserted: Vec<_> = resync.rows.iter().filter(|r| r.old.is_none()).collect();
        assert_eq!((deleted.len(), inserted.len()), (1, 1));
        assert_eq!(deleted[0].uuid.to_string(), U1);
        assert_eq!(inserted[0].uuid.to_string(), U2);
    }

    #[test]
    fn malformed_updates_do_not_panic() {
        let req = MonitorRequest::new().table("Interface", &[]);
        let m = MonitorInner::new("m1".into(), "Open_vSwitch", Version::V2, &req, schema());
        m.apply_reply(&json!([]));
        m.apply_notification("update2", &json!("x"));
        m.apply_notification("update2", &json!(["m1", {"Interface": {"not-a-uuid": {"insert": {}}}}]));
        m.apply_notification("update2", &json!(["m1", {"Interface": {U1: {"modify": {"name": "x"}}}}]));
        m.apply_notification("update2", &json!(["m1", {"Interface": {U1: {"frobnicate": {}}}}]));
        m.apply_notification("update2", &json!(["m1", {"Interface": 5}]));
        assert!(m.lock().replica.is_empty());
    }
}
