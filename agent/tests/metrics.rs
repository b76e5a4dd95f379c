//! `/metrics` end to end: a real qx-node with a running VM (a disk, a NIC on an Open vSwitch network), scraped over
//! HTTPS on the Host UI listener with the node-local CA, and checked by Prometheus's own `promtool check metrics`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::ovs::{isolate_network, skip_without_ovs, Ovs};
use qx_test_infra::{test_guest, wait_until, Daemon};

/// A port nothing listens on now (the daemon binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn promtool() -> PathBuf {
    let status = Command::new("bash").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/install-ui-tools.sh")).status();
    assert!(status.is_ok_and(|s| s.success()), "agent/tests/install-ui-tools.sh failed");
    PathBuf::from("promtool")
}

/// GET `https://localhost:<port>/metrics`, trusting only the node-local CA; `None` when nothing answers.
fn scrape(port: u16, ca: &Path, accept: Option<&str>) -> Option<String> {
    let mut curl = Command::new("curl");
    curl.args(["--silent", "--show-error", "--fail", "--max-time", "20", "--cacert"]).arg(ca);
    if let Some(accept) = accept {
        curl.args(["-H", &format!("Accept: {accept}")]);
    }
    let output = curl.arg(format!("https://localhost:{port}/metrics")).output().expect("run curl");
    output.status.success().then(|| String::from_utf8(output.stdout).expect("UTF-8 exposition"))
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn promtool_check(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_running_vm_is_scraped_and_promtool_accepts_the_exposition() {
    if skip_without_ovs() {
        return;
    }
    promtool();
    // The taps live in this test's network namespace; so do the daemon, its QEMU and curl.
    isolate_network();
    let ovs = Ovs::start();
    let guest = test_guest();
    let port = free_port();
    let config = format!(
        "ovs:\n  socket: {}\n  datapath_type: netdev\nui:\n  listen: 127.0.0.1:{port}\n",
        ovs.db_socket().display()
    );
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
    let ca = daemon.data_dir().parent().unwrap().join("certificates/local-ca.pem");
    let disk = daemon.data_dir().parent().unwrap().join("disk.raw");
    std::fs::write(&disk, vec![0x5a; 4 << 20]).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;
        let network = pb::Network { name: "v10".into(), bridge: "qxbr0".into(), vlan: Some(10), ..Default::default() };
        client.create_network(network).await.expect("CreateNetwork");
        let spec_text = format!(
            "name: m1\nvcpus: 2\nmemory_mib: 256\nkernel:\n  kernel: {}\n  initrd: {}\n  cmdline: \"{} qx.ip=10.9.0.1/24\"\n\
             disks:\n  - id: d0\n    path: {}\nnics:\n  - id: n0\n    kind: network\n    network: v10\n",
            guest.kernel.display(),
            guest.initrd.display(),
            guest.cmdline,
            disk.display()
        );
        client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
        client.create_vm(pb::CreateVmRequest { spec: None, spec_text: guest.spec_yaml("idle", "") }).await.unwrap();
        start(&mut client, "m1").await;
        let mut console = boot(&mut client, "m1").await;
        // Some block and network I/O for the counters: read the disk, and ARP for an address nobody has.
        let command = "dd if=/dev/vda of=/dev/null bs=4096 count=64 2>/dev/null; ping -c 1 -W 1 10.9.0.2 >/dev/null; \
                       echo io-$((1+1))-done\n";
        console.input.send(pb::ConsoleInput { data: command.into(), ..Default::default() }).await.unwrap();
        console.expect("io-2-done", Duration::from_secs(60)).await;
    });

    let text = wait_until(Duration::from_secs(30), || scrape(port, &ca, None))
        .unwrap_or_else(|| panic!("no /metrics on port {port}; log:\n{}", daemon.log_text()));
    promtool_check(&text);
    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(value(r#"qx_vm_state{vm="m1",state="running"}"#), 1.0);
    assert_eq!(value(r#"qx_vm_state{vm="m1",state="stopped"}"#), 0.0);
    assert_eq!(value(r#"qx_vm_state{vm="idle",state="stopped"}"#), 1.0);
    assert_eq!(value(r#"qx_vms{state="running"}"#), 1.0);
    assert_eq!(value(r#"qx_vm_vcpus{vm="m1"}"#), 2.0);
    assert_eq!(value(r#"qx_vm_memory_bytes{vm="m1"}"#), (256u64 << 20) as f64);
    assert!(value(r#"qx_vm_memory_resident_bytes{vm="m1"}"#) > 0.0);
    assert!(value(r#"qx_vm_cpu_seconds_total{vm="m1"}"#) > 0.0, "a booted TCG guest used CPU");
    let vcpu0 = value(r#"qx_vm_vcpu_seconds_total{vm="m1",vcpu="0"}"#);
    sample(&text, r#"qx_vm_vcpu_seconds_total{vm="m1",vcpu="1"}"#).expect("both vCPU threads");
    assert!(vcpu0 > 0.0, "vCPU 0 ran the boot");
    assert!(value(r#"qx_vm_disk_read_bytes_total{vm="m1",disk="d0"}"#) >= 64.0 * 4096.0, "dd read the disk");
    assert!(value(r#"qx_vm_disk_reads_total{vm="m1",disk="d0"}"#) > 0.0);
    assert!(value(r#"qx_vm_network_transmit_packets_total{vm="m1",nic="n0"}"#) > 0.0, "the guest sent its ARP");
    value(r#"qx_vm_network_receive_bytes_total{vm="m1",nic="n0"}"#);
    assert_eq!(value("qx_warm_pool_ready"), 0.0);
    assert!(value("qx_node_cpus") >= 1.0);
    assert!(value(r#"qx_rpc_requests_total{service="quantix.node.v1.NodeService",method="StartVm",code="Ok"}"#) == 1.0);
    assert!(
        value(r#"qx_rpc_requests_total{service="quantix.node.v1.NodeService",method="CreateVm",code="Ok"}"#) == 2.0
    );
    assert_eq!(value(r#"qx_rpc_duration_seconds_count{service="quantix.node.v1.NodeService",method="StartVm"}"#), 1.0);
    assert!(sample(&text, r#"qx_vm_cpu_seconds_total{vm="idle"}"#).is_none(), "a stopped VM has no QEMU figures");
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "the classic format has neither");

    // A scraper asking for OpenMetrics gets it as prometheus-client wrote it.
    let openmetrics = scrape(port, &ca, Some("application/openmetrics-text; version=1.0.0")).expect("OpenMetrics");
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE qx_vm_disk_read_bytes counter\n# UNIT qx_vm_disk_read_bytes bytes\n"));

    runtime.block_on(async {
        let mut client = client(&daemon).await;
        // A failed call is counted with its code.
        client.start_vm(pb::StartVmRequest { name: "nope".into(), paused: false }).await.unwrap_err();
        client.stop_vm(pb::StopVmRequest { name: "m1".into(), force: true, ..Default::default() }).await.unwrap();
    });
    let text = scrape(port, &ca, None).expect("second scrape");
    promtool_check(&text);
    assert_eq!(sample(&text, r#"qx_vm_state{vm="m1",state="stopped"}"#), Some(1.0), "{text}");
    assert!(sample(&text, r#"qx_vm_vcpu_seconds_total{vm="m1",vcpu="0"}"#).is_none(), "{text}");
    let not_found = r#"qx_rpc_requests_total{service="quantix.node.v1.NodeService",method="StartVm",code="NotFound"}"#;
    assert_eq!(sample(&text, not_found), Some(1.0), "{text}");
    drop(ovs);
}
