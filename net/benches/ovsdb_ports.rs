//! Adding ports through our OVSDB client versus `ovs-vsctl add-port`, measured in the same run against the same
//! ovsdb-server and ovs-vswitchd (userspace datapath, started here in a temp dir and a private network
//! namespace), plus the time from a transaction to its monitor update.
//!
//! `cargo bench -p qx-net --bench ovsdb_ports` (as root: ovs-vswitchd creates the internal ports' taps).
//! `QX_BENCH_PORTS` changes the number of ports (default 1000). Without Open vSwitch it says so and exits 0.
//!
//! Every phase starts from an empty bridge, and ovs-vswitchd is let catch up (`next_cfg`/`cur_cfg`) between
//! phases, so no phase pays for another's reconfiguration. Both sides only wait for the database commit:
//! `ovs-vsctl --no-wait`, and our transactions' replies. The ports are `internal`, so no devices are needed.

#[path = "../tests/common/mod.rs"]
mod common;

use common::OvsEndpoint;

use std::time::{Duration, Instant};

use qx_net::ovsdb::{Client, ClientOptions, Condition, MonitorRequest, Mutation, Operation, Value};
use qx_net::vswitch::{BridgeSpec, DatapathType, PortKind, PortSpec, VSwitch};

const SETTLE: Duration = Duration::from_secs(600);
const LATENCY_SAMPLES: usize = 200;
const OFPORT_SAMPLES: usize = 20;
const TARGET_RATIO: f64 = 20.0;

fn main() {
    if !common::ovs_installed() {
        println!(
            "ovsdb_ports: skipped: Open vSwitch is not installed (ovsdb-server, ovs-vswitchd, ovs-vsctl); \
             net/tests/install-ovs.sh installs it"
        );
        return;
    }
    if !common::privileged() {
        println!("ovsdb_ports: skipped: needs root (a private network namespace; ovs-vswitchd creates taps)");
        return;
    }
    let ports: usize = std::env::var("QX_BENCH_PORTS").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    common::isolate_network();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    runtime.block_on(bench(ports));
}

fn internal(name: String) -> PortSpec {
    PortSpec { kind: PortKind::Internal, ..PortSpec::new(name) }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Creates `bridge`, runs `phase`, checks the ports landed, then removes the bridge and lets ovs-vswitchd settle.
async fn measure<F: std::future::Future<Output = ()>>(
    ovs: &common::Ovs,
    vs: &VSwitch,
    bridge: &str,
    expected: usize,
    phase: F,
) -> Duration {
    vs.ensure_bridge(&BridgeSpec::new(bridge, DatapathType::Netdev)).await.unwrap();
    vs.sync(SETTLE).await.unwrap();
    let start = Instant::now();
    phase.await;
    let elapsed = start.elapsed();
    let listed = ovs.vsctl(&["list-ports", bridge]).lines().count();
    assert_eq!(listed, expected, "ports on {bridge}");
    vs.sync(SETTLE).await.unwrap();
    assert!(vs.delete_bridge(bridge).await.unwrap());
    vs.sync(SETTLE).await.unwrap();
    elapsed
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn bench(n: usize) {
    let ovs = common::Ovs::start();
    let opts = ClientOptions { request_timeout: Duration::from_secs(300), ..ClientOptions::default() };
    let vs = VSwitch::connect(ovs.endpoint(), opts.clone()).await.unwrap();
    let version = ovs
        .vsctl_command()
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    println!("ovsdb_ports: {n} internal ports on a netdev bridge; {version}; ovs-vswitchd running");

    // Ours: a few transactions (batches of 100 ports).
    let batch = 100.min(n).max(1);
    let t_batched = measure(&ovs, &vs, "br-batch", n, async {
        for chunk in names("b", n).chunks(batch) {
            let specs: Vec<PortSpec> = chunk.iter().cloned().map(internal).collect();
            vs.add_ports("br-batch", &specs).await.unwrap();
        }
    })
    .await;

    // Ours: one transaction for all.
    let t_single = measure(&ovs, &vs, "br-one", n, async {
        let specs: Vec<PortSpec> = names("o", n).into_iter().map(internal).collect();
        vs.add_ports("br-one", &specs).await.unwrap();
    })
    .await;

    // Ours: one transaction per port, all in flight at once (pipelined on one connection).
    let t_pipelined = measure(&ovs, &vs, "br-pipe", n, async {
        let mut tasks = tokio::task::JoinSet::new();
        for name in names("p", n) {
            let vs = vs.clone();
            tasks.spawn(async move { vs.add_port("br-pipe", &internal(name)).await.unwrap() });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;

    // Ours: one transaction per port, each awaited before the next (what 1000 separate API calls look like).
    let t_sequential = measure(&ovs, &vs, "br-seq", n, async {
        for name in names("s", n) {
            vs.add_port("br-seq", &internal(name)).await.unwrap();
        }
    })
    .await;

    // ovs-vsctl: one process per port, like a shell script or a daemon shelling out.
    let mut per_call = Vec::with_capacity(n);
    let t_vsctl = measure(&ovs, &vs, "br-vsctl", n, async {
        for name in names("v", n) {
            let call = Instant::now();
            let status = ovs
                .vsctl_command()
                .args(["--no-wait", "add-port", "br-vsctl", &name, "--", "set", "Interface", &name, "type=internal"])
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "ovs-vsctl add-port {name}: {status}");
            per_call.push(call.elapsed());
        }
    })
    .await;
    let tenth = (n / 10).max(1);
    let average = |calls: &[Duration]| ms(calls.iter().sum::<Duration>()) / calls.len() as f64;
    let (vsctl_first, vsctl_last) = (average(&per_call[..tenth]), average(&per_call[n - tenth..]));

    // Transaction to monitor update: a second connection watches one interface's external_ids.
    vs.ensure_bridge(&BridgeSpec::new("br-lat", DatapathType::Netdev)).await.unwrap();
    vs.add_port("br-lat", &internal("lat0".into())).await.unwrap();
    let watcher = Client::connect(ovs.endpoint(), opts.clone()).await.unwrap();
    let monitor = watcher
        .monitor_cond(
            "Open_vSwitch",
            MonitorRequest::new().table_where(
                "Interface",
                &["name", "external_ids"],
                vec![Condition::eq("name", "lat0")],
            ),
        )
        .await
        .unwrap();
    let mut cross = Vec::with_capacity(LATENCY_SAMPLES);
    let mut same = Vec::with_capacity(LATENCY_SAMPLES);
    let own = vs.monitor();
    for i in 0..LATENCY_SAMPLES {
        let value = i.to_string();
        let seen = |r: &qx_net::ovsdb::Replica| {
            let (_, row) = r.find("Interface", "name", "lat0")?;
            (row["external_ids"].map_get("bench").and_then(|v| v.as_str()) == Some(value.as_str())).then_some(())
        };
        let op = Operation::mutate(
            "Interface",
            vec![Condition::eq("name", "lat0")],
            vec![
                Mutation::delete("external_ids", Value::set(["bench"])),
                Mutation::insert("external_ids", Value::map([("bench", value.as_str())])),
            ],
        );
        let start = Instant::now();
        let pending = vs.client().start_transact("Open_vSwitch", &[op]).await.unwrap();
        let (own_seen, other_seen) = tokio::join!(
            async {
                own.wait_for(Duration::from_secs(10), seen).await.unwrap();
                start.elapsed()
            },
            async {
                monitor.wait_for(Duration::from_secs(10), seen).await.unwrap();
                start.elapsed()
            }
        );
        pending.wait().await.unwrap();
        same.push(own_seen);
        cross.push(other_seen);
    }

    // add_port to ofport: the whole plug, with ovs-vswitchd's work, observed through the monitor.
    let mut plug = Vec::with_capacity(OFPORT_SAMPLES);
    for i in 0..OFPORT_SAMPLES {
        let name = format!("plug{i}");
        let start = Instant::now();
        vs.add_port("br-lat", &internal(name.clone())).await.unwrap();
        vs.wait_ofport(&name, Duration::from_secs(30)).await.unwrap();
        plug.push(start.elapsed());
    }

    let line = |label: &str, d: Duration| {
        println!("  {label:<52} {:>9.1} ms  {:>8.0} ports/s", ms(d), n as f64 / d.as_secs_f64());
    };
    line(&format!("ours: {} transactions of {batch} ports", n.div_ceil(batch)), t_batched);
    line("ours: 1 transaction of all ports", t_single);
    line("ours: 1 transaction per port, pipelined", t_pipelined);
    line("ours: 1 transaction per port, sequential", t_sequential);
    line(&format!("ovs-vsctl --no-wait add-port x {n}"), t_vsctl);
    println!(
        "  ovs-vsctl per call: {vsctl_first:.1} ms for the first {tenth}, {vsctl_last:.1} ms for the last {tenth} \
         (each call reads the Bridge, Port and Interface tables)"
    );
    let ratio = |ours: Duration| t_vsctl.as_secs_f64() / ours.as_secs_f64();
    println!(
        "  ratio ovs-vsctl / ours: batched {:.0}x, one transaction {:.0}x, per port pipelined {:.0}x, per port sequential {:.1}x",
        ratio(t_batched),
        ratio(t_single),
        ratio(t_pipelined),
        ratio(t_sequential)
    );
    println!(
        "  target ours >= {TARGET_RATIO}x faster (batched): {}",
        if ratio(t_batched) >= TARGET_RATIO { "met" } else { "NOT met" }
    );
    println!(
        "  transaction -> monitor update, same connection:  median {:.3} ms, p99 {:.3} ms (n={LATENCY_SAMPLES})",
        ms(percentile(&mut same, 0.5)),
        ms(percentile(&mut same, 0.99))
    );
    println!(
        "  transaction -> monitor update, other connection: median {:.3} ms, p99 {:.3} ms (n={LATENCY_SAMPLES})",
        ms(percentile(&mut cross, 0.5)),
        ms(percentile(&mut cross, 0.99))
    );
    println!(
        "  add_port -> ofport via monitor (ovs-vswitchd):   median {:.1} ms, p99 {:.1} ms (n={OFPORT_SAMPLES})",
        ms(percentile(&mut plug, 0.5)),
        ms(percentile(&mut plug, 0.99))
    );
}
