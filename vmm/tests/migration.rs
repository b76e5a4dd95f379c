//! The migration driver against two real QEMUs under TCG on this machine: the source runs the test guest with a
//! counter on its serial console, the target waits with `-incoming defer -S`; the counter goes on on the target.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qx_qmp::{ConnectOptions, QmpClient, RunState};
use qx_vmm::migration::{self, MigrationConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A QEMU this test started, killed and reaped by its PID on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qemu(dir: &Path, name: &str, incoming: bool) -> Qemu {
    let guest = qx_test_infra::test_guest();
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-machine", "q35", "-accel", "tcg", "-m", "128", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-kernel"])
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &guest.cmdline, "-serial"])
        .arg(format!("unix:{},server=on,wait=off", dir.join(format!("{name}-serial.sock")).display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", dir.join(format!("{name}-qmp.sock")).display()));
    if incoming {
        command.args(["-incoming", "defer", "-S"]);
    }
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Qemu(command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().expect("qemu-system-x86_64"))
}

async fn qmp(dir: &Path, name: &str) -> QmpClient {
    let opts = ConnectOptions { connect_timeout: Duration::from_secs(10), command_timeout: Duration::from_secs(10) };
    QmpClient::connect(dir.join(format!("{name}-qmp.sock")), opts).await.unwrap()
}

async fn serial(dir: &Path, name: &str) -> UnixStream {
    let path: PathBuf = dir.join(format!("{name}-serial.sock"));
    for _ in 0..100 {
        if let Ok(stream) = UnixStream::connect(&path).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no serial socket at {}", path.display());
}

/// Reads `stream` into `seen` until `done` holds on it or `timeout` passes.
async fn read_until(stream: &mut UnixStream, seen: &mut String, timeout: Duration, done: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while !done(seen) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => panic!("timed out or closed; console so far:\n{seen}"),
        }
    }
}

/// The largest `C<n>` counter line printed.
fn last_count(text: &str) -> u64 {
    text.split(['\r', '\n']).filter_map(|l| l.trim().strip_prefix('C')?.parse().ok()).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_moves_to_the_target_and_its_counter_goes_on() {
    let dir = tempfile::Builder::new().prefix("qx-migration-").tempdir().unwrap();
    let _source_qemu = start_qemu(dir.path(), "src", false);
    let _target_qemu = start_qemu(dir.path(), "dst", true);
    let source = qmp(dir.path(), "src").await;
    let target = qmp(dir.path(), "dst").await;
    let mut console = serial(dir.path(), "src").await;
    let mut seen = String::new();
    read_until(&mut console, &mut seen, Duration::from_secs(60), |s| s.contains(qx_test_infra::READY_LINE)).await;
    console.write_all(b"i=0; while true; do i=$((i+1)); echo C$i; sleep 0.2; done\n").await.unwrap();
    read_until(&mut console, &mut seen, Duration::from_secs(30), |s| last_count(s) >= 5).await;
    let mut target_console = serial(dir.path(), "dst").await;

    let config = MigrationConfig::default();
    let uri = format!("unix:{}", dir.path().join("migrate.sock").display());
    migration::start_incoming(&target, &config, &uri).await.unwrap();
    migration::prepare_source(&source, &config).await.unwrap();
    let incoming = tokio::spawn({
        let target = target.clone();
        async move { migration::wait_incoming(&target, Duration::from_millis(50)).await }
    });
    let mut polls = 0;
    let outcome = migration::migrate_out(&source, &uri, &config, std::future::pending(), |_| polls += 1).await.unwrap();
    incoming.await.unwrap().unwrap();
    // What the source printed before it stopped, still on its way through the socket.
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), console.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let before = last_count(&seen);
    assert_eq!(source.query_status().await.unwrap().state, RunState::Postmigrate);
    target.execute(qx_qmp::qapi_qmp::cont {}).await.unwrap();
    assert_eq!(target.query_status().await.unwrap().state, RunState::Running);

    let mut after = String::new();
    read_until(&mut target_console, &mut after, Duration::from_secs(30), |s| last_count(s) > before + 2).await;
    let first = after.split(['\r', '\n']).find_map(|l| l.trim().strip_prefix('C')?.parse::<u64>().ok()).unwrap();
    assert!(first + 1 >= before && first <= before + 2, "the counter restarted or jumped: {before} then {first}");
    println!(
        "migrated in {} ms, downtime {} ms, {} bytes, {polls} polls; counter {before} -> {first}",
        outcome.total_time_ms, outcome.downtime_ms, outcome.transferred_bytes
    );
    assert!(outcome.total_time_ms > 0 && !outcome.postcopy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_way_leaves_the_guest_running_on_the_source_and_ends_the_target() {
    let dir = tempfile::Builder::new().prefix("qx-migration-").tempdir().unwrap();
    let _source_qemu = start_qemu(dir.path(), "src", false);
    let mut target_qemu = start_qemu(dir.path(), "dst", true);
    let source = qmp(dir.path(), "src").await;
    let target = qmp(dir.path(), "dst").await;
    let mut console = serial(dir.path(), "src").await;
    let mut seen = String::new();
    read_until(&mut console, &mut seen, Duration::from_secs(60), |s| s.contains(qx_test_infra::READY_LINE)).await;
    console.write_all(b"i=0; while true; do i=$((i+1)); echo C$i; sleep 0.2; done\n").await.unwrap();
    read_until(&mut console, &mut seen, Duration::from_secs(30), |s| last_count(s) >= 2).await;

    // 1 MiB/s: the guest's ~70 MB of non-zero memory takes about a minute, so a cancel after 1 s is mid-way.
    let config = MigrationConfig { max_bandwidth: Some(1 << 20), ..Default::default() };
    let uri = format!("unix:{}", dir.path().join("migrate.sock").display());
    migration::start_incoming(&target, &config, &uri).await.unwrap();
    migration::prepare_source(&source, &config).await.unwrap();
    let mut last = None;
    let result = migration::migrate_out(&source, &uri, &config, tokio::time::sleep(Duration::from_secs(1)), |p| {
        if p.phase == migration::Phase::Precopy {
            last = Some(p.clone());
        }
    })
    .await;
    assert!(matches!(result, Err(migration::MigrationError::Cancelled)), "{result:?}");
    let last = last.expect("no precopy poll before the cancel");
    assert!(last.transferred_bytes > 0 && last.remaining_bytes > 0, "not mid-way: {last:?}");
    assert_eq!(source.query_status().await.unwrap().state, RunState::Running);
    let before = last_count(&seen);
    read_until(&mut console, &mut seen, Duration::from_secs(30), |s| last_count(s) > before + 3).await;
    let exited = qx_test_infra::wait_until(Duration::from_secs(20), || target_qemu.0.try_wait().unwrap());
    assert!(exited.is_some(), "the target QEMU did not exit by itself after the cancel");
}
