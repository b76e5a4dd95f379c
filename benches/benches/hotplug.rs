//! Disk hotplug latency: qx-node's AttachDisk/DetachDisk over gRPC against the raw QMP sequence sent by this bench,
//! interleaved in one run, on two booted test guests of the same shape.
//!
//! - attach: qx-node `AttachDisk` request → answer (it answers once `device_add` is answered and the spec and device
//!   tree are on disk); raw: `blockdev-add` (file), `blockdev-add` (format), `device_add`, then `query-pci` shows
//!   the device.
//! - detach: qx-node `DetachDisk` request → answer (`device_del`, the guest's `DEVICE_DELETED`, `blockdev-del`,
//!   the spec and tree written); raw: `device_del`, wait for `DEVICE_DELETED`, `blockdev-del` ×2.
//!
//! Raw QMP runs against its own QEMU, started from the argument list qx-node renders for the same spec: QEMU serves
//! one client per QMP monitor and qx-node holds the one of its VMs, so the bench cannot speak QMP to qx-node's
//! QEMU. Both guests are booted (a detach needs the guest's PCIe hotplug driver to release the device).
//!
//! `cargo bench --bench hotplug` builds qx-node in the bench's profile and runs this. `QX_BENCH_RUNS` sets the
//! number of interleaved runs (default 20). Results are printed and written to
//! `target/bench-results/hotplug.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qx_benches::{ratio, RawQemu, Summary};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_qmp::{Event, QemuEvent, QmpClient};
use qx_test_infra::{test_guest, Daemon, READY_MARKER};
use qx_vmm::cmdline::disk_plug;
use qx_vmm::device_tree::Growth;
use qx_vmm::process::QemuProcess;
use qx_vmm::{DeviceTree, VmSpec};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

type Client = NodeServiceClient<Channel>;

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const DELETED_TIMEOUT: Duration = Duration::from_secs(30);
/// The id of the hotplugged disk, in both QEMUs.
const DISK: &str = "bench0";
/// qx-node's shipped log level (its default `QX_LOG`).
const LOG_LEVEL: &str = "info";

fn spec(name: &str, extra: &str) -> VmSpec {
    let text = test_guest().spec_yaml(name, &format!("nics:\n  - kind: user\n{extra}"));
    let mut spec = VmSpec::from_text(&text).expect("bench spec");
    spec.accelerator = qx_vmm::spec::AccelChoice::Tcg;
    spec.fill_device_ids();
    spec.fill_generated();
    spec
}

/// A QEMU of the bench's own, booted to the guest's ready marker, and the disk's block nodes and device as qx-node
/// would place them.
struct RawVm {
    process: QemuProcess,
    qmp: QmpClient,
    blockdevs: Vec<serde_json::Value>,
    device: serde_json::Value,
    nodes: Vec<String>,
}

async fn raw_vm(dir: &Path, disk: &Path) -> RawVm {
    let spec = spec("raw", "");
    let mut devices = DeviceTree::new(&spec).expect("bench spec places");
    let RawQemu { process, qmp, mut serial } = {
        let mut raw = RawQemu::launch(dir, &spec, &devices).await;
        raw.wait_for(READY_MARKER, READY_TIMEOUT).await;
        raw
    };
    let mut buf = [0u8; 4096];
    // The serial console must keep draining, or a guest that prints blocks.
    tokio::spawn(async move { while serial.read(&mut buf).await.is_ok_and(|n| n > 0) {} });

    // The disk placed where qx-node's device tree puts an attached disk: the first spare root port.
    let with_disk = spec_with_disk(&spec, disk);
    devices.reconcile(&with_disk, Growth::Allowed).expect("a spare root port");
    let slot = devices.disk(DISK).expect("placed").clone();
    let plug = disk_plug(with_disk.disk(DISK).unwrap(), &slot, false);
    RawVm {
        process,
        qmp,
        blockdevs: plug.blockdevs,
        device: plug.device.to_qmp(),
        nodes: vec![slot.node.clone(), slot.file_node()],
    }
}

/// `spec` with the bench's disk (`disk` as a raw file) added, as AttachDisk adds it.
fn spec_with_disk(spec: &VmSpec, disk: &Path) -> VmSpec {
    let mut with = spec.clone();
    with.disks.push(serde_json::from_value(json!({ "path": disk, "id": DISK })).expect("disk spec"));
    with
}

impl RawVm {
    async fn attach(&self) -> Duration {
        let started = Instant::now();
        for blockdev in &self.blockdevs {
            self.qmp.execute_raw("blockdev-add", Some(blockdev.clone())).await.expect("blockdev-add");
        }
        self.qmp.execute_raw("device_add", Some(self.device.clone())).await.expect("device_add");
        let pci = self.qmp.execute_raw("query-pci", None).await.expect("query-pci");
        let took = started.elapsed();
        assert!(pci.to_string().contains(&format!("\"qdev_id\":\"{}\"", self.device["id"].as_str().unwrap())), "{pci}");
        took
    }

    async fn detach(&self) -> Duration {
        let id = self.device["id"].as_str().unwrap().to_owned();
        let mut events = self.qmp.subscribe();
        let started = Instant::now();
        self.qmp.execute_raw("device_del", Some(json!({ "id": id }))).await.expect("device_del");
        tokio::time::timeout(DELETED_TIMEOUT, async {
            loop {
                match events.recv().await {
                    Ok(Event::Qemu(event)) => {
                        if matches!(event.typed(), QemuEvent::DeviceDeleted { device: Some(d), .. } if d == id) {
                            return;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("QMP events ended: {e}"),
                }
            }
        })
        .await
        .expect("the raw guest released the disk");
        for node in &self.nodes {
            self.qmp.execute_raw("blockdev-del", Some(json!({ "node-name": node }))).await.expect("blockdev-del");
        }
        started.elapsed()
    }
}

async fn wait_ready(client: &mut Client, name: &str) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::ConsoleInput { vm: name.into(), history: true, data: Vec::new() }).await.unwrap();
    let mut output = client.console(ReceiverStream::new(rx)).await.expect("Console").into_inner();
    let mut seen = String::new();
    tokio::time::timeout(READY_TIMEOUT, async {
        while !seen.contains(READY_MARKER) {
            let chunk = output.message().await.unwrap().expect("console ended before the ready marker");
            seen.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    })
    .await
    .expect("qx-node guest ready");
}

async fn qx_attach(client: &mut Client, disk: &Path) -> Duration {
    let disk = pb::Disk { path: disk.display().to_string(), id: DISK.into(), ..Default::default() };
    let started = Instant::now();
    client.attach_disk(pb::AttachDiskRequest { vm: "hp".into(), disk: Some(disk) }).await.expect("AttachDisk");
    started.elapsed()
}

async fn qx_detach(client: &mut Client) -> Duration {
    let request = pb::DetachDeviceRequest { vm: "hp".into(), id: DISK.into(), timeout_seconds: 30 };
    let started = Instant::now();
    client.detach_disk(request).await.expect("DetachDisk");
    started.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:7.2} ms", d.as_secs_f64() * 1000.0)
}

fn print_row(label: &str, s: &Summary) {
    println!("  {label:<22} median {}  min {}  max {}", ms(s.median), ms(s.min), ms(s.max));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("QX_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let profile_dir = qx_benches::profile_dir();
    qx_benches::build_daemon(&profile_dir);
    test_guest();
    let work = tempfile::tempdir().unwrap();
    let (qx_disk, raw_disk) = (work.path().join("qx.raw"), work.path().join("raw.raw"));
    for disk in [&qx_disk, &raw_disk] {
        std::fs::File::create(disk).unwrap().set_len(16 << 20).unwrap();
    }

    let daemon = Daemon::start_with_log(&profile_dir.join("qx-node"), LOG_LEVEL);
    let mut client = qx_agent::client::connect(daemon.socket()).await.expect("connect to qx-node");
    let spec_text = test_guest().spec_yaml("hp", "nics:\n  - kind: user\naccelerator: tcg\n");
    assert!(spec_text.matches("accelerator").count() == 1, "the test guest's spec names no accelerator");
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
    client.start_vm(pb::StartVmRequest { name: "hp".into(), paused: false }).await.expect("StartVm");
    wait_ready(&mut client, "hp").await;
    let raw = raw_vm(&work.path().join("raw"), &raw_disk).await;

    let (mut qa, mut ra, mut qd, mut rd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // Alternate who goes first, so neither always runs right after the other's teardown.
        if run % 2 == 0 {
            qa.push(qx_attach(&mut client, &qx_disk).await);
            ra.push(raw.attach().await);
            qd.push(qx_detach(&mut client).await);
            rd.push(raw.detach().await);
        } else {
            ra.push(raw.attach().await);
            qa.push(qx_attach(&mut client, &qx_disk).await);
            rd.push(raw.detach().await);
            qd.push(qx_detach(&mut client).await);
        }
    }
    let _ = raw.process.kill();
    raw.process.exited().await;
    let request = pb::StopVmRequest { name: "hp".into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request).await.expect("StopVm");

    let (qa, ra, qd, rd) = (Summary::of(&qa), Summary::of(&ra), Summary::of(&qd), Summary::of(&rd));
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("release").to_owned();
    println!("disk hotplug, {runs} interleaved runs, TCG test guests, qx-node built as {profile}:");
    print_row("qx-node AttachDisk", &qa);
    print_row("raw QMP attach", &ra);
    println!("  attach ratio qx-node / raw QMP: {:.2}x", ratio(qa.median, ra.median));
    print_row("qx-node DetachDisk", &qd);
    print_row("raw QMP detach", &rd);
    println!("  detach ratio qx-node / raw QMP: {:.2}x", ratio(qd.median, rd.median));
    let results = json!({
        "runs": runs,
        "profile": profile,
        "attach": { "qx_node": qa.to_json(), "raw_qmp": ra.to_json(), "ratio": ratio(qa.median, ra.median) },
        "detach": { "qx_node": qd.to_json(), "raw_qmp": rd.to_json(), "ratio": ratio(qd.median, rd.median) },
    });
    let out: PathBuf = profile_dir.parent().unwrap().join("bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("hotplug.json"), serde_json::to_vec_pretty(&results).unwrap()).unwrap();
}
