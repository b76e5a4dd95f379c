//! Logical ports with one ACL each through our northbound client versus `ovn-nbctl`, measured in the same run
//! against the same OVN central (NB and SB ovsdb-servers and ovn-northd, started here in a temp dir), plus the time
//! from plugging a port into `br-int` to `up` (ovn-controller bound it).
//!
//! `cargo bench -p qx-net --bench ovn_ports` (as root: the chassis runs in a private network namespace).
//! `QX_BENCH_PORTS` changes the number of ports (default 1000), `QX_BENCH_ROUNDS` the rounds (default 3). Without
//! OVN it says so and exits 0.
//!
//! A "port with one ACL" is what a VM NIC in a security group is: a logical switch port (MAC, port security) in a
//! port group of its own holding one `allow-related` ACL. Judged like for like, in two pairs:
//! - per port: our two guarded transactions (the port group with its ACL, then the port joining it), each awaited
//!   until the monitor shows it, against one `ovn-nbctl` call per port chaining `lsp-add`, `lsp-set-addresses`,
//!   `lsp-set-port-security`, `pg-add` and `acl-add`;
//! - batched: one transaction of every port group with its ACL, then one of every port, against one `ovn-nbctl`
//!   call chaining all of those commands.
//!
//! Every phase starts from an empty database (the switch and every port group deleted after each); methods rotate
//! from round to round; ratios are the medians of the rounds' ratios, with their spread. `ovn-nbctl` runs with its
//! default `--no-wait` and our calls wait for the monitor, so neither side waits for ovn-northd.

#[path = "common/stats.rs"]
mod stats;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qx_net::ovn::{AclAction, AclDirection, AclSpec, Northbound, PortSpec, SwitchSpec};
use qx_net::ovsdb::{ClientOptions, Endpoint, Operation};
use qx_test_infra::ovn::{ovn_installed, Chassis, OvnCentral};
use stats::{ms, percentile};

const TARGET_PER_PORT: f64 = 20.0;
const TARGET_BATCHED: f64 = 1.0;
const UP_SAMPLES: usize = 20;

fn main() {
    if !ovn_installed() {
        println!("ovn_ports: skipped: OVN is not installed (net/tests/install-ovn.sh installs it)");
        return;
    }
    if !qx_test_infra::ovs::privileged() {
        println!("ovn_ports: skipped: needs root (the chassis runs in a private network namespace)");
        return;
    }
    let ports: usize = std::env::var("QX_BENCH_PORTS").ok().and_then(|n| n.parse().ok()).unwrap_or(1000).max(1);
    qx_test_infra::ovs::isolate_network();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    runtime.block_on(bench(ports));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    OursPerPort,
    NbctlPerPort,
    OursBatched,
    NbctlBatched,
}

const METHODS: [Method; 4] = [Method::OursPerPort, Method::NbctlPerPort, Method::OursBatched, Method::NbctlBatched];

impl Method {
    fn label(self, n: usize) -> String {
        match self {
            Self::OursPerPort => "ours: 2 transactions per port, each awaited".into(),
            Self::NbctlPerPort => format!("ovn-nbctl: 1 call per port x {n}"),
            Self::OursBatched => format!("ours: 1 transaction of {n} port groups + 1 of {n} ports"),
            Self::NbctlBatched => format!("ovn-nbctl: 1 call chaining {} commands", 5 * n),
        }
    }
}

fn port_name(prefix: &str, i: usize) -> String {
    format!("{prefix}p{i}")
}

fn group_name(prefix: &str, i: usize) -> String {
    format!("{prefix}g{i}")
}

fn mac(i: usize) -> String {
    format!("0a:00:00:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

fn acl(group: &str) -> AclSpec {
    AclSpec {
        direction: AclDirection::ToLport,
        priority: 1001,
        match_: format!("outport == @{group} && ip4 && tcp && tcp.dst == 22"),
        action: AclAction::AllowRelated,
        external_ids: BTreeMap::new(),
    }
}

fn port(prefix: &str, i: usize) -> PortSpec {
    PortSpec { port_groups: vec![group_name(prefix, i)], ..PortSpec::new(port_name(prefix, i), mac(i)) }
}

/// The `ovn-nbctl` commands that make port `i` with its port group and ACL.
fn nbctl_commands(switch: &str, prefix: &str, i: usize, args: &mut Vec<String>) {
    let (p, g, m) = (port_name(prefix, i), group_name(prefix, i), mac(i));
    let acl = acl(&g);
    for command in [
        vec!["lsp-add", switch, &p],
        vec!["lsp-set-addresses", &p, &m],
        vec!["lsp-set-port-security", &p, &m],
        vec!["pg-add", &g, &p],
        vec!["acl-add", &g, acl.direction.as_str(), "1001", &acl.match_, acl.action.as_str()],
    ] {
        args.push("--".into());
        args.extend(command.into_iter().map(str::to_owned));
    }
}

fn nbctl(central: &OvnCentral, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = central.nbctl_command(&args).stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success(), "ovn-nbctl {}: {status}", args.iter().take(8).copied().collect::<Vec<_>>().join(" "));
}

/// Runs `phase` on a fresh switch, checks every port and ACL landed, then empties the database again.
async fn measure<F: std::future::Future<Output = ()>>(nb: &Northbound, switch: &str, n: usize, phase: F) -> Duration {
    nb.create_switch(&SwitchSpec::new(switch)).await.unwrap();
    let start = Instant::now();
    phase.await;
    let elapsed = start.elapsed();
    nb.client().echo(vec![]).await.unwrap();
    let ports = nb.switch(switch).map(|s| s.ports.len()).unwrap_or_default();
    assert_eq!(ports, n, "ports on {switch}");
    let groups = nb.port_groups();
    assert!(groups.len() == n && groups.iter().all(|g| g.ports.len() == 1 && g.acls.len() == 1), "groups");
    assert!(nb.delete_switch(switch).await.unwrap());
    let empty = [Operation::delete("Port_Group", vec![])];
    nb.client().transact(qx_net::ovn::northbound::DB, &empty).await.unwrap();
    nb.client().echo(vec![]).await.unwrap();
    assert!(nb.port_groups().is_empty());
    elapsed
}

async fn bench(n: usize) {
    let central = OvnCentral::start();
    let opts = ClientOptions { request_timeout: Duration::from_secs(300), ..ClientOptions::default() };
    let endpoint: Endpoint = central.nb_endpoint().parse().unwrap();
    let nb = Northbound::connect(endpoint, opts).await.unwrap();
    let version = central
        .nbctl_command(&["--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    println!("ovn_ports: {n} logical ports, each in a port group with one ACL; {version}; ovn-northd running");

    let rounds: usize = std::env::var("QX_BENCH_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(3).max(1);
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); METHODS.len()];
    for round in 0..rounds {
        for m in (0..METHODS.len()).map(|i| (i + round) % METHODS.len()) {
            let switch = format!("sw{m}r{round}");
            let prefix = format!("m{m}r{round}");
            let elapsed = match METHODS[m] {
                Method::OursPerPort => {
                    measure(&nb, &switch, n, async {
                        for i in 0..n {
                            let g = group_name(&prefix, i);
                            nb.create_port_group_with_acls(&g, &BTreeMap::new(), &[acl(&g)]).await.unwrap();
                            nb.add_port(&switch, &port(&prefix, i)).await.unwrap();
                        }
                    })
                    .await
                }
                Method::NbctlPerPort => {
                    measure(&nb, &switch, n, async {
                        for i in 0..n {
                            let mut args = Vec::new();
                            nbctl_commands(&switch, &prefix, i, &mut args);
                            nbctl(&central, &args);
                        }
                    })
                    .await
                }
                Method::OursBatched => {
                    measure(&nb, &switch, n, async {
                        let ids = BTreeMap::new();
                        let names: Vec<String> = (0..n).map(|i| group_name(&prefix, i)).collect();
                        let acls: Vec<[AclSpec; 1]> = names.iter().map(|g| [acl(g)]).collect();
                        let groups: Vec<(&str, &BTreeMap<String, String>, &[AclSpec])> =
                            names.iter().zip(&acls).map(|(g, a)| (g.as_str(), &ids, &a[..])).collect();
                        nb.create_port_groups(&groups).await.unwrap();
                        let specs: Vec<PortSpec> = (0..n).map(|i| port(&prefix, i)).collect();
                        nb.add_ports(&switch, &specs).await.unwrap();
                    })
                    .await
                }
                Method::NbctlBatched => {
                    measure(&nb, &switch, n, async {
                        let mut args = Vec::new();
                        for i in 0..n {
                            nbctl_commands(&switch, &prefix, i, &mut args);
                        }
                        nbctl(&central, &args);
                    })
                    .await
                }
            };
            times[m].push(elapsed);
        }
    }

    // Plug -> up: the port written first, then an OVS internal port with its iface-id on br-int; ovn-controller
    // claims it and northd sets `up`, which the monitor brings.
    let chassis = Chassis::start(&central, "bench-hv");
    nb.create_switch(&SwitchSpec::new("uplat")).await.unwrap();
    let mut up = Vec::with_capacity(UP_SAMPLES);
    for i in 0..UP_SAMPLES {
        let name = format!("up{i}");
        nb.add_port("uplat", &PortSpec::new(name.clone(), mac(i))).await.unwrap();
        let iface = format!("vif{i}");
        let start = Instant::now();
        chassis.vsctl(&[
            "add-port",
            "br-int",
            &iface,
            "--",
            "set",
            "Interface",
            &iface,
            "type=internal",
            &format!("external_ids:iface-id={name}"),
        ]);
        nb.wait_port_up(&name, Duration::from_secs(30)).await.unwrap();
        up.push(start.elapsed());
    }

    let time_of = |method: Method| &times[METHODS.iter().position(|m| *m == method).unwrap()];
    println!("  per method, {rounds} rounds (median, min-max):");
    for (m, method) in METHODS.iter().enumerate() {
        let mut sorted = times[m].clone();
        let median = percentile(&mut sorted, 0.5);
        println!(
            "  {:<62} {:>9.1} ms  ({:.1}-{:.1})  {:>8.0} ports/s",
            method.label(n),
            ms(median),
            ms(sorted[0]),
            ms(sorted[sorted.len() - 1]),
            n as f64 / median.as_secs_f64()
        );
    }
    let pair = |theirs: Method, ours: Method| -> (f64, f64, f64) {
        let mut ratios: Vec<f64> =
            time_of(theirs).iter().zip(time_of(ours)).map(|(t, o)| t.as_secs_f64() / o.as_secs_f64()).collect();
        ratios.sort_by(f64::total_cmp);
        (ratios[ratios.len() / 2], ratios[0], ratios[ratios.len() - 1])
    };
    let verdict = |r: (f64, f64, f64), target: f64| match (r.1 >= target, r.0 >= target) {
        (true, _) => "met in every round",
        (false, true) => "met by the median, not in every round",
        _ => "NOT met",
    };
    let per_port = pair(Method::NbctlPerPort, Method::OursPerPort);
    let batched = pair(Method::NbctlBatched, Method::OursBatched);
    println!("  like for like, ovn-nbctl / ours (median of {rounds} rounds, min-max):");
    println!(
        "    one call per port against two transactions per port: {:.1}x ({:.1}-{:.1}); target >= {TARGET_PER_PORT}x: {}",
        per_port.0,
        per_port.1,
        per_port.2,
        verdict(per_port, TARGET_PER_PORT)
    );
    println!(
        "    one chained call against the batched client:          {:.1}x ({:.1}-{:.1}); target >= {TARGET_BATCHED}x: {}",
        batched.0,
        batched.1,
        batched.2,
        verdict(batched, TARGET_BATCHED)
    );
    println!(
        "  plug into br-int -> port up (ovn-controller bound it, via the monitor): median {:.1} ms, p90 {:.1} ms, \
         max {:.1} ms (n={UP_SAMPLES})",
        ms(percentile(&mut up, 0.5)),
        ms(percentile(&mut up, 0.9)),
        ms(percentile(&mut up, 1.0))
    );
}
