//! Benchmarks that put Quantix beside its comparisons in one run, and the small statistics they share.
//!
//! `cargo bench` runs `benches/vm_start.rs`: VM start latency of raw QEMU (the floor) and qx-node, interleaved,
//! plus qx-node's memory and binary size; and `benches/hotplug.rs`: AttachDisk/DetachDisk against raw QMP. Figures are printed as ratios against the comparison measured in the same
//! run; there are no stored baselines.
//!
//! ```
//! use std::time::Duration;
//! let summary = qx_benches::Summary::of(&[Duration::from_millis(3), Duration::from_millis(1), Duration::from_millis(2)]);
//! assert_eq!(summary.median, Duration::from_millis(2));
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Median, extremes and p99 of a set of timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
    pub p99: Duration,
}

impl Summary {
    /// Summarises `samples`; all zero when there are none.
    pub fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let at = |q: f64| -> Duration {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let index = ((sorted.len() - 1) as f64 * q).round() as usize;
            sorted[index]
        };
        Self {
            median: at(0.5),
            min: sorted.first().copied().unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
            p99: at(0.99),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        serde_json::json!({ "median_ms": ms(self.median), "min_ms": ms(self.min), "max_ms": ms(self.max), "p99_ms": ms(self.p99) })
    }
}

/// `cargo bench` builds bench targets, not other packages' binaries: build the qx-node being measured, in the
/// same profile (`release`, or the one `cargo bench --profile` chose, e.g. `image`, the host image's), so a stale
/// binary is never measured.
pub fn build_daemon(profile_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The dev profile builds into target/debug.
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(profile) => profile,
        None => "release",
    };
    let status = std::process::Command::new(cargo)
        .args(["build", "--profile", profile, "-p", "qx-agent", "--bins"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build qx-node");
    assert!(status.success(), "building qx-node failed");
}

/// target/release (or target/<profile>), where cargo puts qx-node next to the running bench's `deps/` directory.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable path");
    exe.parent().and_then(Path::parent).expect("target/release").to_owned()
}

/// `a / b` as a ratio of medians, for printing.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        return f64::NAN;
    }
    a.as_secs_f64() / b.as_secs_f64()
}

/// A QEMU started for `spec` the way qx-node starts one (the same arguments, its sockets bound first and handed
/// over as fds), but by the bench itself: the floor qx-node is compared against.
pub struct RawQemu {
    pub process: qx_vmm::process::QemuProcess,
    pub qmp: qx_qmp::QmpClient,
    pub serial: tokio::net::UnixStream,
}

impl RawQemu {
    /// Launches QEMU in `dir` (emptied first) with `devices` placed as given, connects QMP and the serial console,
    /// and lets the vCPUs run.
    pub async fn launch(dir: &Path, spec: &qx_vmm::VmSpec, devices: &qx_vmm::DeviceTree) -> Self {
        use std::os::unix::net::UnixListener;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let (qmp_socket, serial_socket) = (dir.join("qmp.sock"), dir.join("serial.sock"));
        let qmp_listener = UnixListener::bind(&qmp_socket).unwrap();
        let serial_listener = UnixListener::bind(&serial_socket).unwrap();
        // The guest agent's socket, as qx-node gives every VM one (nothing connects to it here).
        let qga_listener = UnixListener::bind(dir.join("qga.sock")).unwrap();
        let layout = qx_vmm::cmdline::LaunchLayout {
            qmp_fd: 3,
            serial_fd: Some(4),
            qga_fd: 5,
            pidfile: dir.join("qemu.pid"),
            seed: None,
            hotplug: false,
            uefi: None,
            tpm: None,
        };
        let args = qx_vmm::cmdline::qemu_args(spec, devices, qx_vmm::Accel::Tcg, &layout);
        let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
        let fds = vec![(qmp_listener.into(), 3), (serial_listener.into(), 4), (qga_listener.into(), 5)];
        let process = qx_vmm::process::QemuProcess::spawn(Path::new("qemu-system-x86_64"), &args, fds, log).unwrap();
        let qmp = qx_qmp::QmpClient::connect(&qmp_socket, qx_qmp::ConnectOptions::default()).await.unwrap();
        let serial = tokio::net::UnixStream::connect(&serial_socket).await.unwrap();
        qmp.execute_raw("cont", None).await.unwrap();
        Self { process, qmp, serial }
    }

    /// Reads the serial console until the guest prints `marker`, within `timeout`.
    pub async fn wait_for(&mut self, marker: &str, timeout: Duration) {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(timeout, async {
            while !String::from_utf8_lossy(&seen).contains(marker) {
                let n = self.serial.read(&mut buf).await.unwrap();
                assert!(n > 0, "raw QEMU closed its serial console before {marker:?}");
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("raw QEMU guest ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_nothing_is_zero() {
        assert_eq!(Summary::of(&[]).median, Duration::ZERO);
    }

    #[test]
    fn p99_of_a_small_set_is_its_maximum() {
        let samples: Vec<Duration> = (1..=16).map(Duration::from_millis).collect();
        let summary = Summary::of(&samples);
        assert_eq!(summary.p99, Duration::from_millis(16));
        assert_eq!(summary.min, Duration::from_millis(1));
    }
}
