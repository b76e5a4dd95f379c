//! Adding ports through our OVSDB client versus `ovs-vsctl add-port`, measured in the same run against the same
//! ovsdb-server and ovs-vswitchd (userspace datapath, started here in a temp dir and a private network
//! namespace), plus the time from a transaction to its monitor update.
//!
//! `cargo bench -p qx-net --bench ovsdb_ports` (as root: ovs-vswitchd creates the internal ports' taps).
//! `QX_BENCH_PORTS` changes the number of ports (default 1000), `QX_BENCH_ROUNDS` the rounds (default 3). Without
//! Open vSwitch it says so and exits 0.
//!
//! Judged like for like, in two pairs that do the same work: one transaction per port, each awaited, against one
//! `ovs-vsctl` call per port; and one transaction of all ports against one chained `ovs-vsctl -- add-port ...`
//! call. Every method runs once per round, the order rotated from round to round; ratios are the medians of the
//! rounds' ratios, with their spread (min–max). Batches of 100 and pipelined transactions are shown for reference.
//!
//! Every phase starts from an empty bridge, and ovs-vswitchd is let catch up (`next_cfg`/`cur_cfg`) between
//! phases, so no phase pays for another's reconfiguration. Both sides only wait for the database commit:
//! `ovs-vsctl --no-wait`, and our transactions' replies. The ports are `internal`, so no devices are needed.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/stats.rs"]
mod stats;

use common::OvsEndpoint;
use stats::{ms, percentile};

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

/// What each round measures, in the order of the first round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    OursPerPort,
    VsctlPerPort,
    OursOneTransaction,
    VsctlChained,
    OursBatches,
    OursPipelined,
}

const METHODS: [Method; 6] = [
    Method::OursPerPort,
    Method::VsctlPerPort,
    Method::OursOneTransaction,
    Method::VsctlChained,
    Method::OursBatches,
    Method::OursPipelined,
];

impl Method {
    fn label(self, n: usize, batch: usize) -> String {
        match self {
            Self::OursPerPort => "ours: 1 transaction per port, each awaited".into(),
            Self::VsctlPerPort => format!("ovs-vsctl --no-wait add-port, 1 call per port x {n}"),
            Self::OursOneTransaction => "ours: 1 transaction of all ports".into(),
            Self::VsctlChained => format!("ovs-vsctl --no-wait, 1 call chaining {n} add-ports"),
            Self::OursBatches => format!("ours: {} transactions of {batch} ports (reference)", n.div_ceil(batch)),
            Self::OursPipelined => "ours: 1 transaction per port, pipelined (reference)".into(),
        }
    }
}

/// `add-port` of each of `names` as an internal port, chained with `--` into one ovs-vsctl call.
fn add_port_args(bridge: &str, names: &[String]) -> Vec<String> {
    let mut args = vec!["--no-wait".to_owned()];
    for name in names {
        let port = [bridge, name, "--", "set", "Interface", name, "type=internal"].map(str::to_owned);
        args.push("--".into());
        args.push("add-port".into());
        args.extend(port);
    }
    args
}

fn vsctl(ovs: &common::Ovs, args: &[String]) {
    let status = ovs.vsctl_command().args(args).stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success(), "ovs-vsctl {}: {status}", args.iter().take(8).cloned().collect::<Vec<_>>().join(" "));
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

    let rounds: usize = std::env::var("QX_BENCH_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(3).max(1);
    let batch = 100.min(n).max(1);
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); METHODS.len()];
    let mut per_call = Vec::with_capacity(n);
    for round in 0..rounds {
        for m in (0..METHODS.len()).map(|i| (i + round) % METHODS.len()) {
            let bridge = format!("br-{m}-{round}");
            let prefix = format!("m{m}r{round}p");
            let elapsed = match METHODS[m] {
                Method::OursPerPort => {
                    // Each awaited before the next: what one API call per port looks like.
                    measure(&ovs, &vs, &bridge, n, async {
                        for name in names(&prefix, n) {
                            vs.add_port(&bridge, &internal(name)).await.unwrap();
                        }
                    })
                    .await
                }
                Method::VsctlPerPort => {
                    per_call.clear();
                    measure(&ovs, &vs, &bridge, n, async {
                        for name in names(&prefix, n) {
                            let call = Instant::now();
                            vsctl(&ovs, &add_port_args(&bridge, &[name]));
                            per_call.push(call.elapsed());
                        }
                    })
                    .await
                }
                Method::OursOneTransaction => {
                    measure(&ovs, &vs, &bridge, n, async {
                        let specs: Vec<PortSpec> = names(&prefix, n).into_iter().map(internal).collect();
                        vs.add_ports(&bridge, &specs).await.unwrap();
                    })
                    .await
                }
                Method::VsctlChained => {
                    measure(&ovs, &vs, &bridge, n, async { vsctl(&ovs, &add_port_args(&bridge, &names(&prefix, n))) })
                        .await
                }
                Method::OursBatches => {
                    measure(&ovs, &vs, &bridge, n, async {
                        for chunk in names(&prefix, n).chunks(batch) {
                            let specs: Vec<PortSpec> = chunk.iter().cloned().map(internal).collect();
                            vs.add_ports(&bridge, &specs).await.unwrap();
                        }
                    })
                    .await
                }
                Method::OursPipelined => {
                    measure(&ovs, &vs, &bridge, n, async {
                        let mut tasks = tokio::task::JoinSet::new();
                        for name in names(&prefix, n) {
                            let (vs, bridge) = (vs.clone(), bridge.clone());
                            tasks.spawn(async move { vs.add_port(&bridge, &internal(name)).await.unwrap() });
                        }
                        while let Some(done) = tasks.join_next().await {
                            done.unwrap();
                        }
                    })
                    .await
                }
            };
            times[m].push(elapsed);
        }
    }
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

    let time_of = |method: Method| &times[METHODS.iter().position(|m| *m == method).unwrap()];
    println!("  per method, {rounds} rounds (median, min-max):");
    for (m, method) in METHODS.iter().enumerate() {
        let mut sorted = times[m].clone();
        let median = percentile(&mut sorted, 0.5);
        println!(
            "  {:<52} {:>9.1} ms  ({:.1}-{:.1})  {:>8.0} ports/s",
            method.label(n, batch),
            ms(median),
            ms(sorted[0]),
            ms(sorted[sorted.len() - 1]),
            n as f64 / median.as_secs_f64()
        );
    }
    println!(
        "  ovs-vsctl per call (last round): {vsctl_first:.1} ms for the first {tenth}, {vsctl_last:.1} ms for the last \
         {tenth} (each call reads the Bridge, Port and Interface tables)"
    );
    // Per round, the ratio of a pair measured in that round; then the rounds' median and spread.
    let pair = |theirs: Method, ours: Method| -> (f64, f64, f64) {
        let mut ratios: Vec<f64> =
            time_of(theirs).iter().zip(time_of(ours)).map(|(t, o)| t.as_secs_f64() / o.as_secs_f64()).collect();
        ratios.sort_by(f64::total_cmp);
        (ratios[ratios.len() / 2], ratios[0], ratios[ratios.len() - 1])
    };
    let per_port = pair(Method::VsctlPerPort, Method::OursPerPort);
    let batched = pair(Method::VsctlChained, Method::OursOneTransaction);
    println!("  like for like, ovs-vsctl / ours (median of {rounds} rounds, min-max):");
    println!(
        "    one call per port against one transaction per port: {:.1}x ({:.1}-{:.1})",
        per_port.0, per_port.1, per_port.2
    );
    println!(
        "    one chained call against one transaction:           {:.1}x ({:.1}-{:.1})",
        batched.0, batched.1, batched.2
    );
    let verdict = |r: (f64, f64, f64)| match (r.1 >= TARGET_RATIO, r.0 >= TARGET_RATIO) {
        (true, _) => "met in every round",
        (false, true) => "met by the median, not in every round",
        _ => "NOT met",
    };
    println!("  target ours >= {TARGET_RATIO}x faster: per port {}; batched {}", verdict(per_port), verdict(batched));
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
