//! The OVSDB client against a real ovsdb-server: transactions, monitors, concurrency, cancel, TCP, and a server
//! restart in the middle of a session.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qx_net::ovsdb::{
    Client, ClientOptions, Condition, ConnectionState, Error, MonitorEvent, MonitorRequest, Mutation, Operation, Row,
    UpdateKind, Value, WaitUntil,
};
use serde_json::json;

use common::{run, skip_without_ovs, Ovs, OvsEndpoint};

const DB: &str = "Open_vSwitch";
const WAIT: Duration = Duration::from_secs(10);

fn opts() -> ClientOptions {
    ClientOptions { request_timeout: WAIT, ..ClientOptions::default() }
}

fn qos_row(kind: &str) -> Row {
    let mut row = Row::new();
    row.insert("type".into(), kind.into());
    row
}

/// The next monitor event, which must be an update.
async fn next_update(monitor: &mut qx_net::ovsdb::Monitor) -> std::sync::Arc<qx_net::ovsdb::Update> {
    match tokio::time::timeout(WAIT, monitor.next()).await.expect("no monitor event") {
        Some(MonitorEvent::Update(update)) => update,
        Some(other) => panic!("unexpected monitor event {other:?}"),
        None => panic!("monitor ended"),
    }
}

#[test]
fn list_dbs_schema_and_echo() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start_db();
        let client = Client::connect(ovs.endpoint(), opts()).await.unwrap();
        let dbs = client.list_dbs().await.unwrap();
        assert!(dbs.contains(&DB.to_owned()), "{dbs:?}");
        let schema = client.get_schema(DB).await.unwrap();
        assert_eq!(schema.name, DB);
        assert!(schema.tables["Bridge"].indexes.contains(&vec!["name".to_owned()]));
        assert!(schema.column_type("Port", "tag").unwrap().is_set());
        assert_eq!(client.echo(vec![json!("hello"), json!(42)]).await.unwrap(), vec![json!("hello"), json!(42)]);
        let err = client.get_schema("Nope").await.unwrap_err();
        assert!(matches!(&err, Error::Rpc { error, .. } if error == "unknown database"), "{err}");
        let err = client.call("frobnicate", json!([])).await.unwrap_err();
        assert!(matches!(&err, Error::Rpc { error, .. } if error == "unknown method"), "{err}");
        // Server-id is a method without a wrapper: the raw path works.
        assert!(client.call("get_server_id", json!([])).await.unwrap().is_string());
    });
}

#[test]
fn transactions_insert_select_update_mutate_wait_delete() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start_db();
        let client = Client::connect(ovs.endpoint(), opts()).await.unwrap();

        // insert with named-uuid references, and a comment.
        let mut queue = Row::new();
        queue.insert("dscp".into(), Value::set([10i64]));
        let mut qos = qos_row("linux-htb");
        qos.insert("queues".into(), Value::map([(0i64, qx_net::ovsdb::Atom::NamedUuid("q0".into()))]));
        let results = client
            .transact(
                DB,
                &[
                    Operation::insert_named("Queue", queue, "q0"),
                    Operation::insert("QoS", qos),
                    Operation::comment("qx-net test: insert"),
                ],
            )
            .await
            .unwrap();
        let (queue_uuid, qos_uuid) = (results[0].uuid.unwrap(), results[1].uuid.unwrap());

        // select sees the reference resolved to the real uuid.
        let results = client.transact(DB, &[Operation::select("QoS", vec![Condition::uuid(qos_uuid)])]).await.unwrap();
        let rows = results[0].rows.as_ref().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["type"].as_str(), Some("linux-htb"));
        let queues = rows[0]["queues"].as_map().unwrap();
        assert_eq!(queues[0].1.as_uuid(), Some(queue_uuid));

        // update and mutate report the rows they matched.
        let results = client
            .transact(
                DB,
                &[
                    Operation::update("QoS", vec![Condition::uuid(qos_uuid)], qos_row("linux-hfsc")),
                    Operation::mutate(
                        "QoS",
                        vec![Condition::uuid(qos_uuid)],
                        vec![Mutation::insert("external_ids", Value::map([("owner", "qx")]))],
                    ),
                    Operation::mutate("Queue", vec![Condition::uuid(queue_uuid)], vec![Mutation::add("dscp", 5i64)]),
                ],
            )
            .await
            .unwrap();
        assert_eq!((results[0].count, results[1].count, results[2].count), (Some(1), Some(1), Some(1)));

        // wait succeeds at once when the rows already match.
        let mut expected = Row::new();
        expected.insert("type".into(), "linux-hfsc".into());
        client
            .transact(
                DB,
                &[Operation::wait(
                    "QoS",
                    vec![Condition::uuid(qos_uuid)],
                    &["type"],
                    WaitUntil::Eq,
                    vec![expected],
                    Some(0),
                )],
            )
            .await
            .unwrap();
        // ... and fails the transaction, naming the operation, when they do not.
        let err = client
            .transact(
                DB,
                &[
                    Operation::comment("first"),
                    Operation::wait(
                        "QoS",
                        vec![Condition::uuid(qos_uuid)],
                        &["type"],
                        WaitUntil::Eq,
                        vec![qos_row("x")],
                        Some(0),
                    ),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(err.transaction_error(), Some((1, "timed out")), "{err}");

        // A syntax error is reported at its operation; nothing of the transaction happens.
        let mut bad = Row::new();
        bad.insert("name".into(), 3i64.into());
        let err = client
            .transact(DB, &[Operation::insert("QoS", qos_row("a")), Operation::insert("Bridge", bad)])
            .await
            .unwrap_err();
        assert!(matches!(&err, Error::Transaction { index: 1, op: "insert", .. }), "{err}");

        // Deleting the queue while QoS refers to it fails at commit: referential integrity.
        let err =
            client.transact(DB, &[Operation::delete("Queue", vec![Condition::uuid(queue_uuid)])]).await.unwrap_err();
        assert!(
            matches!(&err, Error::Transaction { index: 1, op: "commit", error, .. } if error == "referential integrity violation"),
            "{err}"
        );

        let results = client
            .transact(
                DB,
                &[
                    Operation::delete("QoS", vec![Condition::uuid(qos_uuid)]),
                    Operation::delete("Queue", vec![Condition::uuid(queue_uuid)]),
                    Operation::commit(true),
                ],
            )
            .await
            .unwrap();
        assert_eq!((results[0].count, results[1].count), (Some(1), Some(1)));
        assert_eq!(ovs.vsctl(&["--columns=_uuid", "list", "QoS"]), "");
    });
}

#[test]
fn monitors_see_other_clients_changes() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start_db();
        let client = Client::connect(ovs.endpoint(), opts()).await.unwrap();
        let writer = Client::connect(ovs.endpoint(), opts()).await.unwrap();
        let existing =
            writer.transact(DB, &[Operation::insert("QoS", qos_row("before"))]).await.unwrap()[0].uuid.unwrap();

        let mut all = client.monitor(DB, MonitorRequest::new().table("QoS", &["type", "external_ids"])).await.unwrap();
        let mut filtered = client
            .monitor_cond(
                DB,
                MonitorRequest::new().table_where(
                    "QoS",
                    &["type", "external_ids"],
                    vec![Condition::eq("type", "wanted")],
                ),
            )
            .await
            .unwrap();
        let initial = next_update(&mut all).await;
        assert_eq!(initial.kind, UpdateKind::Initial);
        assert_eq!(initial.rows.len(), 1);
        assert_eq!(initial.rows[0].uuid, existing);
        assert_eq!(next_update(&mut filtered).await.rows.len(), 0);
        // A second subscriber sees the changes from now on.
        let mut subscriber = filtered.subscribe();

        let wanted =
            writer.transact(DB, &[Operation::insert("QoS", qos_row("wanted"))]).await.unwrap()[0].uuid.unwrap();
        writer.transact(DB, &[Operation::insert("QoS", qos_row("unwanted"))]).await.unwrap();
        writer
            .transact(
                DB,
                &[Operation::mutate(
                    "QoS",
                    vec![Condition::uuid(wanted)],
                    vec![Mutation::insert("external_ids", Value::map([("k", "v")]))],
                )],
            )
            .await
            .unwrap();

        // monitor_cond: only the matching row, first inserted, then modified (a diff applied to the replica).
        let insert = next_update(&mut filtered).await;
        assert_eq!((insert.kind, insert.rows.len()), (UpdateKind::Change, 1));
        assert!(insert.rows[0].old.is_none());
        let modify = next_update(&mut filtered).await;
        let new = modify.rows[0].new.as_ref().unwrap();
        assert_eq!(new["external_ids"].map_get("k").and_then(|v| v.as_str()), Some("v"));
        assert_eq!(modify.rows[0].old.as_ref().unwrap()["external_ids"], Value::empty_map());
        match subscriber.recv().await.unwrap() {
            MonitorEvent::Update(update) => assert_eq!(update.rows, insert.rows),
            other => panic!("{other:?}"),
        }

        // monitor (v1): everything.
        let uuids = all
            .wait_for(WAIT, |r| (r.len("QoS") == 3).then(|| r.rows("QoS").map(|(u, _)| *u).collect::<BTreeSet<_>>()))
            .await
            .unwrap();
        assert!(uuids.contains(&wanted) && uuids.contains(&existing));
        assert_eq!(filtered.replica().len("QoS"), 1);

        writer.transact(DB, &[Operation::delete("QoS", vec![])]).await.unwrap();
        all.wait_for(WAIT, |r| (r.len("QoS") == 0).then_some(())).await.unwrap();
        filtered.wait_for(WAIT, |r| (r.len("QoS") == 0).then_some(())).await.unwrap();

        // A timeout is an error naming the monitor.
        let err = filtered.wait_for(Duration::from_millis(50), |_| None::<()>).await.unwrap_err();
        assert!(matches!(err, Error::WaitTimeout { .. }), "{err}");

        let id = all.id().to_owned();
        all.cancel().await.unwrap();
        // The server no longer knows it: a second monitor_cancel is refused.
        let err = client.call("monitor_cancel", json!([id])).await.unwrap_err();
        assert!(matches!(&err, Error::Rpc { error, .. } if error == "unknown monitor"), "{err}");
    });
}

#[test]
fn many_concurrent_requests_are_matched_by_id() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start_db();
        let client = Client::connect(ovs.endpoint(), opts()).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                match i % 3 {
                    0 => {
                        let kind = format!("kind-{i}");
                        let uuid = client.transact(DB, &[Operation::insert("QoS", qos_row(&kind))]).await.unwrap()[0]
                            .uuid
                            .unwrap();
                        let rows = client
                            .transact(DB, &[Operation::select_columns("QoS", vec![Condition::uuid(uuid)], &["type"])])
                            .await
                            .unwrap()[0]
                            .rows
                            .clone()
                            .unwrap();
                        assert_eq!(rows[0]["type"].as_str(), Some(kind.as_str()), "reply of another request");
                    }
                    1 => {
                        let echoed = client.echo(vec![json!(i)]).await.unwrap();
                        assert_eq!(echoed, vec![json!(i)]);
                    }
                    _ => assert!(client.list_dbs().await.unwrap().contains(&DB.to_owned())),
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Pipelined without awaiting in between: 100 transactions in flight at once.
        let mut pending = Vec::new();
        for i in 0..100 {
            pending
                .push(client.start_transact(DB, &[Operation::insert("QoS", qos_row(&format!("p{i}")))]).await.unwrap());
        }
        let mut uuids = BTreeSet::new();
        for p in pending {
            uuids.insert(p.wait().await.unwrap()[0].uuid.unwrap());
        }
        assert_eq!(uuids.len(), 100);
        assert_eq!(
            ovs.vsctl(&["--columns=_uuid", "--format=csv", "--no-headings", "list", "QoS"]).lines().count(),
            200
        );
    });
}

#[test]
fn cancel_abandons_a_blocked_transaction() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start_db();
        let client = Client::connect(ovs.endpoint(), opts()).await.unwrap();
        let blocked =
            || Operation::wait("QoS", vec![Condition::eq("type", "never")], &["type"], WaitUntil::Ne, vec![], None);
        // Explicit cancel of a transaction that waits forever.
        let pending =
            client.start_transact(DB, &[blocked(), Operation::insert("QoS", qos_row("after-wait"))]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        pending.cancel();
        // Dropping the future cancels too (here through a timeout).
        let timed_out = tokio::time::timeout(Duration::from_millis(100), client.transact(DB, &[blocked()])).await;
        assert!(timed_out.is_err());
        // The session still works, and the canceled transaction never commits, even once its wait would pass.
        let monitor = client.monitor_cond(DB, MonitorRequest::new().table("QoS", &["type"])).await.unwrap();
        client.transact(DB, &[Operation::insert("QoS", qos_row("never"))]).await.unwrap();
        // A bounded wait for what must not happen: the canceled insert showing up within 500 ms.
        let after_wait = |r: &qx_net::ovsdb::Replica| {
            r.rows("QoS").any(|(_, row)| row["type"].as_str() == Some("after-wait")).then_some(())
        };
        let err = monitor.wait_for(Duration::from_millis(500), after_wait).await.unwrap_err();
        assert!(matches!(err, Error::WaitTimeout { .. }), "{err}");
        assert_eq!(client.echo(vec![json!("alive")]).await.unwrap(), vec![json!("alive")]);
        let kinds = ovs.vsctl(&["--columns=type", "--format=csv", "--no-headings", "list", "QoS"]);
        assert_eq!(kinds, "never", "the canceled insert must not have happened");
    });
}

#[test]
fn server_restart_reconnects_and_reestablishes_monitors() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let mut ovs = Ovs::start_db();
        let options = ClientOptions {
            reconnect: Some(qx_net::ovsdb::Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(200),
            }),
            ..opts()
        };
        let client = Client::connect(ovs.endpoint(), options).await.unwrap();
        let kept = client.transact(DB, &[Operation::insert("QoS", qos_row("kept"))]).await.unwrap()[0].uuid.unwrap();
        let removed_offline =
            client.transact(DB, &[Operation::insert("QoS", qos_row("doomed"))]).await.unwrap()[0].uuid.unwrap();
        let mut monitor = client.monitor_cond(DB, MonitorRequest::new().table("QoS", &["type"])).await.unwrap();
        assert_eq!(next_update(&mut monitor).await.rows.len(), 2);
        let mut state = client.state();
        assert_eq!(*state.borrow_and_update(), ConnectionState::Connected { generation: 1 });

        // A transaction in flight when the server dies fails as Disconnected (it may or may not have happened).
        let blocked = client
            .start_transact(DB, &[Operation::wait("QoS", vec![], &["type"], WaitUntil::Eq, vec![], None)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let old_pid = ovs.ovsdb_pid();
        ovs.kill_db();
        let err = blocked.wait().await.unwrap_err();
        assert!(matches!(err, Error::Disconnected { .. }), "{err}");
        match tokio::time::timeout(WAIT, monitor.next()).await.unwrap() {
            Some(MonitorEvent::Disconnected) => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
        state.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })).await.unwrap();

        // While the server is down, the database changes behind our back.
        ovs.offline_transact(&json!([DB,
            {"op": "delete", "table": "QoS", "where": [["_uuid", "==", ["uuid", removed_offline.to_string()]]]},
            {"op": "insert", "table": "QoS", "row": {"type": "added-offline"}}]));
        // A request made while disconnected waits for the reconnect.
        let queued = tokio::spawn({
            let client = client.clone();
            async move { client.transact(DB, &[Operation::insert("QoS", qos_row("queued"))]).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        ovs.start_db_again();
        assert_ne!(ovs.ovsdb_pid(), old_pid);

        tokio::time::timeout(WAIT, state.wait_for(|s| *s == ConnectionState::Connected { generation: 2 }))
            .await
            .expect("no reconnect")
            .unwrap();
        queued.await.unwrap().unwrap();

        // The monitor comes back by itself and reports what changed while it was away.
        let resync = loop {
            let update = next_update(&mut monitor).await;
            if update.kind == UpdateKind::Resync {
                break update;
            }
        };
        assert!(resync.rows.iter().any(|r| r.uuid == removed_offline && r.new.is_none()), "{resync:?}");
        assert!(
            resync
                .rows
                .iter()
                .any(|r| r.old.is_none() && r.new.as_ref().unwrap()["type"].as_str() == Some("added-offline")),
            "{resync:?}"
        );
        assert!(resync.rows.iter().all(|r| r.uuid != kept), "unchanged rows are not reported");

        // Updates resume: another client's change arrives.
        let writer = Client::connect(ovs.endpoint(), opts()).await.unwrap();
        let fresh =
            writer.transact(DB, &[Operation::insert("QoS", qos_row("after-restart"))]).await.unwrap()[0].uuid.unwrap();
        monitor.wait_for(WAIT, |r| r.row("QoS", &fresh).map(drop)).await.unwrap();
        let types: BTreeSet<String> =
            monitor.replica().rows("QoS").filter_map(|(_, row)| row["type"].as_str().map(str::to_owned)).collect();
        assert_eq!(types, ["added-offline", "after-restart", "kept", "queued"].map(String::from).into_iter().collect());
    });
}

/// A TCP relay between the client and ovsdb-server. It counts the client's echo probes, and can make the current
/// connection go silent: it then swallows what the client sends and forwards nothing back, like a hung peer, while
/// the connections that follow are relayed again.
struct Relay {
    port: u16,
    probes: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    silenced: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Self { port, probes: Arc::default(), connections: Arc::default(), silenced: Arc::default() };
        let (probes, connections, silenced) = (relay.probes.clone(), relay.connections.clone(), relay.silenced.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = connections.fetch_add(1, Ordering::SeqCst) + 1;
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let silent = {
                    let silenced = silenced.clone();
                    move || silenced.load(Ordering::SeqCst) == number
                };
                tokio::spawn(pipe(client_read, server_write, Some(probes.clone()), silent.clone()));
                tokio::spawn(pipe(server_read, client_write, None, silent));
            }
        });
        relay
    }

    fn endpoint(&self) -> qx_net::ovsdb::Endpoint {
        qx_net::ovsdb::Endpoint::Tcp(format!("127.0.0.1:{}", self.port))
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }

    fn silence_current_connection(&self) {
        self.silenced.store(self.connections.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either end closes; drops the bytes while `silent()`; counts echo probes. A silent
/// connection stays open even when `from` closes (ovsdb-server gives up on it after its own 5 s probe), so that
/// only the client's probe can notice the silence.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    probes: Option<Arc<AtomicUsize>>,
    silent: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) if silent() => {
                let _held = to;
                return std::future::pending().await;
            }
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(probes) = &probes {
            let text = String::from_utf8_lossy(&buf[..n]);
            probes.fetch_add(text.matches("\"qx-probe\"").count(), Ordering::SeqCst);
        }
        if !silent() && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[test]
fn tcp_endpoint_and_echo_probes() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start_db_with_tcp();
        let client = Client::connect(ovs.tcp_endpoint(), opts()).await.unwrap();
        assert!(client.list_dbs().await.unwrap().contains(&DB.to_owned()));

        // Through a relay that counts probes: an idle client probes once per interval, and answered probes keep
        // the connection up. (ovsdb-server's own inactivity probe, every 5 s, plays no part at these intervals.)
        let relay = Relay::start(ovs.tcp_port()).await;
        let interval = Duration::from_millis(100);
        let reconnect = qx_net::ovsdb::Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
        let options = ClientOptions { probe_interval: Some(interval), reconnect: Some(reconnect), ..opts() };
        let client = Client::connect(relay.endpoint(), options).await.unwrap();
        let mut state = client.state();
        let probed = tokio::time::timeout(WAIT, async {
            while relay.probes() < 3 {
                tokio::time::sleep(interval / 2).await;
            }
        })
        .await;
        assert!(probed.is_ok(), "an idle client sent {} probes in {WAIT:?}", relay.probes());
        assert_eq!(*state.borrow_and_update(), ConnectionState::Connected { generation: 1 }, "answered probes");
        assert_eq!(client.echo(vec![json!("tcp")]).await.unwrap(), vec![json!("tcp")]);

        // The peer stops answering: the unanswered probe drops the connection, and the client connects again.
        relay.silence_current_connection();
        let lost = tokio::time::timeout(WAIT, state.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })));
        lost.await.expect("the client never noticed the silent peer").unwrap();
        let back = tokio::time::timeout(WAIT, state.wait_for(|s| *s == ConnectionState::Connected { generation: 2 }));
        back.await.expect("no reconnect").unwrap();
        assert_eq!(client.echo(vec![json!("again")]).await.unwrap(), vec![json!("again")]);
    });
}

#[tokio::test]
async fn first_connect_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let options = ClientOptions { connect_timeout: Duration::from_millis(100), ..opts() };
    let endpoint: qx_net::ovsdb::Endpoint = format!("unix:{}/db.sock", dir.path().display()).parse().unwrap();
    let err = Client::connect(endpoint, options).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().starts_with("connecting to OVSDB at unix:/"), "{err}");
}
