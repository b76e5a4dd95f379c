//! VM start latency: raw QEMU (the floor) against qx-node cold, qx-node from its warm pool and libvirt,
//! interleaved so machine noise hits all alike, plus qx-node's resident memory (idle and with 20 VMs), 16
//! concurrent starts (cold and warm, each against single starts of the same shape), and binary sizes.
//!
//! Like for like: raw, qx-node cold and libvirt each launch a QEMU inside the timed span; a warm start takes a
//! QEMU the pool launched before the timer started. Warm figures are compared with raw (the headline: what a user
//! waits for, against the floor of a cold launch) and with libvirt only as "warm against cold", labelled so. Every
//! warm sample is checked to have come from the pool (its QEMU existed before the StartVm call).
//!
//! `cargo bench` builds qx-node in release and runs this. `QX_BENCH_RUNS` sets the number of interleaved runs
//! (default 10). Results are printed and written to `target/bench-results/vm_start.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qx_benches::{ratio, RawQemu, Summary};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_test_infra::{test_guest, Daemon, READY_MARKER};
use qx_vmm::VmSpec;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

mod libvirt;

type Client = NodeServiceClient<Channel>;

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const CONCURRENT: usize = 16;
/// Pause after each leg, so one leg's teardown (libvirtd's cleanup, a dying QEMU) does not land in the next.
const SETTLE: Duration = Duration::from_millis(500);
/// qx-node's shipped log level (its default `QX_LOG`).
const LOG_LEVEL: &str = "info";

/// One start: request → vCPUs running, and request → the guest's ready marker on the serial console.
#[derive(Debug, Clone, Copy)]
struct Sample {
    control: Duration,
    ready: Duration,
}

fn spec(name: &str) -> VmSpec {
    let mut spec = VmSpec::from_text(&test_guest().spec_yaml(name, "nics:\n  - kind: user\n")).expect("bench spec");
    spec.accelerator = qx_vmm::spec::AccelChoice::Tcg;
    spec.fill_generated();
    spec
}

/// The floor: the argument list qx-node would use, spawned here, QMP negotiated, `cont`.
async fn raw_start(dir: &Path, spec: &VmSpec) -> Sample {
    let devices = qx_vmm::DeviceTree::new(spec).expect("bench spec places");
    let started = Instant::now();
    let mut raw = RawQemu::launch(dir, spec, &devices).await;
    let control = started.elapsed();
    raw.wait_for(READY_MARKER, READY_TIMEOUT).await;
    let ready = started.elapsed();
    raw.process.kill().unwrap();
    raw.process.exited().await;
    Sample { control, ready }
}

/// StartVm over gRPC against the running daemon; the console stream (with history) shows the marker.
async fn qx_start(client: &mut Client, name: &str) -> Sample {
    let started = Instant::now();
    client.start_vm(pb::StartVmRequest { name: name.into(), paused: false }).await.expect("StartVm");
    let control = started.elapsed();
    wait_ready(client, name).await;
    let ready = started.elapsed();
    stop(client, name).await;
    Sample { control, ready }
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

async fn stop(client: &mut Client, name: &str) {
    let request = pb::StopVmRequest { name: name.into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request).await.expect("StopVm");
}

/// The warm pool's shape: the bench VM's, at `memory_mib`.
fn warm_shape(memory_mib: u64, count: usize) -> String {
    let guest = test_guest();
    format!(
        "  - vcpus: 1\n    memory_mib: {memory_mib}\n    count: {count}\n    kernel:\n      kernel: {}\n      \
         initrd: {}\n      cmdline: \"{}\"\n",
        guest.kernel.display(),
        guest.initrd.display(),
        guest.cmdline
    )
}

/// Creates a VM without a UUID, so that it takes a warm QEMU's, and waits until the pool has refilled (so the
/// refill does not run during the measured start).
async fn create_warm(client: &mut Client, name: &str, memory_mib: u64, ready: u32) {
    let mut spec = spec(name);
    spec.memory_mib = memory_mib;
    spec.uuid = None;
    let spec_text = serde_json::to_string(&spec).unwrap();
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
    wait_pool_ready(client, ready).await;
}

async fn wait_pool_ready(client: &mut Client, ready: u32) {
    for _ in 0..1200 {
        let info = client.get_node_info(pb::GetNodeInfoRequest {}).await.unwrap().into_inner();
        if info.warm_pool_ready >= ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the warm pool did not refill to {ready}");
}

/// The QEMUs the warm pool of `daemon` launched (ready or reserved): their command lines name the pool's directory.
fn pool_pids(daemon: &Daemon) -> Vec<i32> {
    qx_test_infra::pids_with_arg(&daemon.data_dir().join("warm").display().to_string())
}

/// Panics unless `name` runs on a QEMU of `before` (the pool's, listed before its StartVm): a warm sample that
/// silently started cold would flatter nothing and mislabel everything.
async fn assert_from_pool(client: &mut Client, name: &str, before: &[i32]) {
    let vm = client.get_vm(pb::VmRef { name: name.into() }).await.expect("GetVm").into_inner();
    let pid = vm.runtime.map_or(0, |r| r.pid) as i32;
    assert!(before.contains(&pid), "{name} did not start from the warm pool: pid {pid}, pool {before:?}");
}

/// A warm start of a fresh VM, checked to come from the pool, then its deletion.
async fn warm_start(client: &mut Client, daemon: &Daemon, run: usize) -> Sample {
    let name = format!("warm{run}");
    create_warm(client, &name, 256, 1).await;
    let before = pool_pids(daemon);
    let started = Instant::now();
    client.start_vm(pb::StartVmRequest { name: name.clone(), paused: false }).await.expect("StartVm");
    let control = started.elapsed();
    assert_from_pool(client, &name, &before).await;
    wait_ready(client, &name).await;
    let ready = started.elapsed();
    stop(client, &name).await;
    client.delete_vm(pb::VmRef { name }).await.expect("DeleteVm");
    Sample { control, ready }
}

/// StartVm alone (request -> vCPUs running), then a forced stop; `pool` lists the warm QEMUs it must take one of.
async fn control_start(client: &mut Client, name: &str, pool: Option<&[i32]>) -> Duration {
    let started = Instant::now();
    client.start_vm(pb::StartVmRequest { name: name.into(), paused: false }).await.expect("StartVm");
    let control = started.elapsed();
    if let Some(before) = pool {
        assert_from_pool(client, name, before).await;
    }
    stop(client, name).await;
    control
}

async fn create(client: &mut Client, name: &str, memory_mib: u64) {
    let mut spec = spec(name);
    spec.memory_mib = memory_mib;
    let spec_text = serde_json::to_string(&spec).unwrap();
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
}

/// Starts c0..c15 at once; each start's own latency.
async fn start_all(client: &Client) -> Vec<Duration> {
    let starts = (0..CONCURRENT).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            client
                .start_vm(pb::StartVmRequest { name: format!("c{i}"), paused: false })
                .await
                .expect("concurrent StartVm");
            started.elapsed()
        })
    });
    let mut latencies = Vec::new();
    for start in starts.collect::<Vec<_>>() {
        latencies.push(start.await.unwrap());
    }
    latencies
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

fn libvirt_size() -> Option<u64> {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu");
    let parts = [
        PathBuf::from("/usr/sbin/libvirtd"),
        lib.join("libvirt.so.0"),
        lib.join("libvirt/connection-driver/libvirt_driver_qemu.so"),
    ];
    parts.iter().map(|p| std::fs::canonicalize(p).ok().and_then(|p| file_size(&p))).sum()
}

fn ms(d: Duration) -> String {
    format!("{:8.1} ms", d.as_secs_f64() * 1000.0)
}

fn print_row(label: &str, s: &Summary) {
    println!("  {label:<24} median {}  min {}  max {}", ms(s.median), ms(s.min), ms(s.max));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery: nothing to list.
    }
    let runs: usize = std::env::var("QX_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let release = qx_benches::profile_dir();
    qx_benches::build_daemon(&release);
    let qx_node = release.join("qx-node");
    test_guest();

    // The shipped log level: what a node in service pays for its logging.
    let daemon = Daemon::start_with_log(&qx_node, LOG_LEVEL);
    let daemon_pid = daemon.pid().unwrap();
    let mut client = qx_agent::client::connect(daemon.socket()).await.unwrap();
    let idle_rss = rss_kib(daemon_pid);
    create(&mut client, "bench", 256).await;
    let raw_dir = daemon.data_dir().parent().unwrap().join("raw");
    let raw_spec = spec("raw");

    // One shape only, so "the pool is ready" means this shape's QEMU is (nothing refills during a timed start).
    let warm_config = format!("warm_pool:\n{}", warm_shape(256, 1));
    let warm_daemon = Daemon::start_with(&qx_node, LOG_LEVEL, Some(&warm_config));
    let mut warm_client = qx_agent::client::connect(warm_daemon.socket()).await.unwrap();

    let mut libvirt = match libvirt::unavailable() {
        None => Some(libvirt::Libvirt::start().await),
        Some(why) => {
            println!("libvirt: not measured: {why}");
            None
        }
    };
    let libvirtd_idle_rss = libvirt.as_ref().map(|l| rss_kib(l.libvirtd_pid()));

    println!("VM start, {runs} interleaved runs each (TCG, 1 vCPU, 256 MiB, test guest, qx-node at {LOG_LEVEL}):");
    // One untimed round of each warms the page cache for QEMU, its ROMs and the guest kernel alike (and lets
    // libvirtd probe QEMU's capabilities, which it does on first use).
    raw_start(&raw_dir, &raw_spec).await;
    qx_start(&mut client, "bench").await;
    if let Some(libvirt) = libvirt.as_mut() {
        libvirt.start_vm().await;
    }
    warm_start(&mut warm_client, &warm_daemon, runs).await;
    let (mut raw, mut qx, mut warm, mut lv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The order of the legs rotates every run, so none always follows another's teardown.
    for run in 0..runs {
        for leg in (0..4).map(|i| (i + run) % 4) {
            match (leg, libvirt.as_mut()) {
                (0, _) => raw.push(raw_start(&raw_dir, &raw_spec).await),
                (1, _) => qx.push(qx_start(&mut client, "bench").await),
                (2, _) => warm.push(warm_start(&mut warm_client, &warm_daemon, run).await),
                (3, Some(libvirt)) => lv.push(libvirt.start_vm().await),
                _ => continue,
            }
            tokio::time::sleep(SETTLE).await;
        }
    }
    let libvirtd_rss = libvirt.as_ref().map(|l| (libvirtd_idle_rss.unwrap_or(0), rss_kib(l.libvirtd_pid())));
    drop(libvirt);
    drop(warm_daemon);
    let summary =
        |samples: &[Sample], pick: fn(&Sample) -> Duration| Summary::of(&samples.iter().map(pick).collect::<Vec<_>>());
    let raw_control = summary(&raw, |s| s.control);
    let qx_control = summary(&qx, |s| s.control);
    let raw_ready = summary(&raw, |s| s.ready);
    let qx_ready = summary(&qx, |s| s.ready);
    let warm_control = summary(&warm, |s| s.control);
    let warm_ready = summary(&warm, |s| s.ready);
    let lv_control = summary(&lv, |s| s.control);
    let lv_ready = summary(&lv, |s| s.ready);
    let measured_libvirt = !lv.is_empty();
    println!(" request -> vCPUs running");
    print_row("raw QEMU", &raw_control);
    print_row("qx-node StartVm", &qx_control);
    if measured_libvirt {
        print_row("libvirt createXML", &lv_control);
    }
    print_row("qx-node warm pool", &warm_control);
    println!("  qx-node / raw            {:.2}x   (cold against cold)", ratio(qx_control.median, raw_control.median));
    println!(
        "  warm / raw               {:.3}x  (headline: warm against the floor)",
        ratio(warm_control.median, raw_control.median)
    );
    if measured_libvirt {
        println!("  qx-node / libvirt        {:.3}x  (cold against cold)", ratio(qx_control.median, lv_control.median));
        println!(
            "  libvirt / warm           {:.1}x   (warm against cold: the pool launched its QEMU before the timer)",
            ratio(lv_control.median, warm_control.median)
        );
    }
    println!(" request -> guest ready marker");
    print_row("raw QEMU", &raw_ready);
    print_row("qx-node StartVm", &qx_ready);
    if measured_libvirt {
        print_row("libvirt createXML", &lv_ready);
    }
    print_row("qx-node warm pool", &warm_ready);
    println!("  qx-node / raw            {:.3}x", ratio(qx_ready.median, raw_ready.median));
    println!("  warm / raw               {:.3}x", ratio(warm_ready.median, raw_ready.median));
    if measured_libvirt {
        println!("  qx-node / libvirt        {:.3}x", ratio(qx_ready.median, lv_ready.median));
    }

    // 16 VMs started at once, each against single starts of the same shape (128 MiB) measured just before,
    // cold on the cold daemon and warm on a daemon whose pool holds 16 of that shape. No guest boots meanwhile:
    // every VM is stopped before the next phase.
    for i in 0..CONCURRENT {
        create(&mut client, &format!("c{i}"), 128).await;
    }
    let mut single_cold = Vec::new();
    for _ in 0..runs {
        single_cold.push(control_start(&mut client, "c0", None).await);
        tokio::time::sleep(SETTLE).await;
    }
    let single_cold = Summary::of(&single_cold);
    let concurrent = Summary::of(&start_all(&client).await);
    for i in 0..CONCURRENT {
        stop(&mut client, &format!("c{i}")).await;
    }

    let concurrent_config = format!("warm_pool:\n{}", warm_shape(128, CONCURRENT));
    let warm_daemon = Daemon::start_with(&qx_node, LOG_LEVEL, Some(&concurrent_config));
    let mut warm_client = qx_agent::client::connect(warm_daemon.socket()).await.unwrap();
    wait_pool_ready(&mut warm_client, CONCURRENT as u32).await;
    let mut single_warm = Vec::new();
    for run in 0..runs {
        let name = format!("single{run}");
        // Created, then the pool refilled to all 16 before the timed start.
        create_warm(&mut warm_client, &name, 128, CONCURRENT as u32).await;
        let before = pool_pids(&warm_daemon);
        single_warm.push(control_start(&mut warm_client, &name, Some(&before)).await);
        warm_client.delete_vm(pb::VmRef { name }).await.expect("DeleteVm");
        tokio::time::sleep(SETTLE).await;
    }
    let single_warm = Summary::of(&single_warm);
    for i in 0..CONCURRENT {
        create_warm(&mut warm_client, &format!("c{i}"), 128, 0).await;
    }
    // The 16 reserved QEMUs wait for their VMs; the pool's refill (16 more) finishes before the timer starts.
    wait_pool_ready(&mut warm_client, CONCURRENT as u32).await;
    let before = pool_pids(&warm_daemon);
    let warm_concurrent = Summary::of(&start_all(&warm_client).await);
    for i in 0..CONCURRENT {
        assert_from_pool(&mut warm_client, &format!("c{i}"), &before).await;
    }
    println!(" {CONCURRENT} concurrent StartVm (request -> running, each; 128 MiB VMs, no guest booting before)");
    print_row("qx-node cold, single", &single_cold);
    print_row("qx-node cold, 16 at once", &concurrent);
    println!(
        "  p99 {}  = {:.2}x a single cold start's median",
        ms(concurrent.p99),
        ratio(concurrent.p99, single_cold.median)
    );
    print_row("qx-node warm, single", &single_warm);
    print_row("qx-node warm, 16 at once", &warm_concurrent);
    println!(
        "  p99 {}  = {:.2}x a single warm start's median",
        ms(warm_concurrent.p99),
        ratio(warm_concurrent.p99, single_warm.median)
    );
    for i in 0..CONCURRENT {
        stop(&mut warm_client, &format!("c{i}")).await;
    }
    drop(warm_daemon);

    // Memory with 20 VMs running.
    for i in CONCURRENT..20 {
        create(&mut client, &format!("c{i}"), 128).await;
    }
    for i in 0..20 {
        client.start_vm(pb::StartVmRequest { name: format!("c{i}"), paused: false }).await.expect("StartVm");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy_rss = rss_kib(daemon_pid);
    for i in 0..20 {
        stop(&mut client, &format!("c{i}")).await;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(" qx-node resident memory");
    println!("  idle                     {:8.1} MiB", mib(idle_rss));
    println!("  20 VMs running           {:8.1} MiB", mib(busy_rss));
    if let Some((idle, after)) = libvirtd_rss {
        println!(" libvirtd resident memory");
        println!("  idle                     {:8.1} MiB", mib(idle));
        println!("  after {:>2} start/stops     {:8.1} MiB", runs + 1, mib(after));
    }

    let sizes: Vec<(&str, Option<u64>)> = vec![
        ("qx-node", file_size(&qx_node)),
        ("qxctl", file_size(&release.join("qxctl"))),
        // libvirtd is a thin binary over libvirt.so and its QEMU driver: count what it loads.
        ("libvirtd + libvirt.so + qemu driver", libvirt_size()),
    ];
    println!(" binary size");
    for (name, size) in &sizes {
        match size {
            Some(bytes) => println!("  {name:<24} {:8.1} MiB", *bytes as f64 / (1 << 20) as f64),
            None => println!("  {name:<24} not present"),
        }
    }

    let results = json!({
        "runs": runs,
        "raw_qemu": { "control": raw_control.to_json(), "ready": raw_ready.to_json() },
        "qx_node": { "control": qx_control.to_json(), "ready": qx_ready.to_json() },
        "qx_node_warm": { "control": warm_control.to_json(), "ready": warm_ready.to_json() },
        "ratio_control_warm_over_raw": ratio(warm_control.median, raw_control.median),
        "log_level": LOG_LEVEL,
        "concurrent_16_warm": warm_concurrent.to_json(),
        "single_warm_128": single_warm.to_json(),
        "ratio_concurrent_warm_p99_over_single_warm": ratio(warm_concurrent.p99, single_warm.median),
        "single_cold_128": single_cold.to_json(),
        "ratio_control_qx_over_raw": ratio(qx_control.median, raw_control.median),
        "ratio_ready_qx_over_raw": ratio(qx_ready.median, raw_ready.median),
        "libvirt": measured_libvirt.then(|| json!({
            "control": lv_control.to_json(),
            "ready": lv_ready.to_json(),
            "rss_mib": libvirtd_rss.map(|(idle, after)| json!({ "idle": mib(idle), "after_runs": mib(after) })),
        })),
        "ratio_control_qx_over_libvirt": measured_libvirt.then(|| ratio(qx_control.median, lv_control.median)),
        "ratio_control_libvirt_over_warm": measured_libvirt.then(|| ratio(lv_control.median, warm_control.median)),
        "ratio_ready_qx_over_libvirt": measured_libvirt.then(|| ratio(qx_ready.median, lv_ready.median)),
        "concurrent_16": concurrent.to_json(),
        "ratio_concurrent_p99_over_single": ratio(concurrent.p99, single_cold.median),
        "qx_node_rss_mib": { "idle": mib(idle_rss), "vms_20": mib(busy_rss) },
        "binary_bytes": sizes.iter().map(|(n, s)| ((*n).to_owned(), json!(s))).collect::<serde_json::Map<_, _>>(),
    });
    let out = release.parent().unwrap().join("bench-results");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("vm_start.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&results).unwrap()).unwrap();
    println!("results: {}", path.display());
}
