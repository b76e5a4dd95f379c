//! What the host is made of and how busy it is, through `sysinfo`: the management interface's address, the
//! diagnostics summary, registration facts and heartbeat telemetry. Every function here blocks (it reads `/proc`
//! and `/sys`): call it from `spawn_blocking`.

use std::net::IpAddr;
use std::time::Duration;

use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

const GIB: f64 = (1u64 << 30) as f64;

/// The first IPv4 address of `interface` with its prefix (`192.0.2.10/24`), or `None` when it has none or does
/// not exist.
pub fn ipv4_of(interface: &str) -> Option<String> {
    let networks = Networks::new_with_refreshed_list().ok()?;
    let (_, data) = networks.iter().find(|(name, _)| name.to_str() == Some(interface))?;
    let network = data.ip_networks().iter().find(|n| matches!(n.addr, IpAddr::V4(_)))?;
    Some(network.to_string())
}

/// What a control plane is told at registration.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
}

pub fn facts() -> Facts {
    let refresh =
        RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()).with_memory(MemoryRefreshKind::nothing().with_ram());
    System::new_with_specifics(refresh)
        .map(|system| Facts { cpu_count: system.cpus().len() as u32, memory_total_bytes: system.total_memory() })
        .unwrap_or_default()
}

/// "CPU: ...", "Memory: ...", "Disk /: ...", "NIC eth0: ..." lines for the console's diagnostics screen.
pub fn summary() -> Vec<String> {
    let mut lines = Vec::new();
    let refresh =
        RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()).with_memory(MemoryRefreshKind::nothing().with_ram());
    if let Ok(system) = System::new_with_specifics(refresh) {
        let model = system.cpus().first().map(|cpu| cpu.brand().trim().to_owned()).unwrap_or_default();
        let model = if model.is_empty() { "unknown model".to_owned() } else { model };
        lines.push(format!("CPU: {model}, {} threads", system.cpus().len()));
        lines.push(format!(
            "Memory: {:.1} GiB total, {:.1} GiB available",
            system.total_memory() as f64 / GIB,
            system.available_memory() as f64 / GIB
        ));
    }
    if let Ok(disks) = Disks::new_with_refreshed_list() {
        for disk in disks.iter() {
            lines.push(format!(
                "Disk {}: {:.1} GiB total, {:.1} GiB free ({}, {})",
                disk.mount_point().display(),
                disk.total_space() as f64 / GIB,
                disk.available_space() as f64 / GIB,
                disk.name().to_string_lossy(),
                disk.file_system().to_string_lossy()
            ));
        }
    }
    if let Ok(networks) = Networks::new_with_refreshed_list() {
        let mut nics: Vec<_> = networks.iter().filter(|(name, _)| name.to_str() != Some("lo")).collect();
        nics.sort_by(|a, b| a.0.cmp(b.0));
        for (name, data) in nics {
            let addresses: Vec<String> = data.ip_networks().iter().map(ToString::to_string).collect();
            let addresses = if addresses.is_empty() { "no address".to_owned() } else { addresses.join(" ") };
            lines.push(format!(
                "NIC {}: {}, {addresses}, MTU {}",
                name.to_string_lossy(),
                data.mac_address(),
                data.mtu()
            ));
        }
    }
    if let Ok(uptime) = System::uptime() {
        lines.push(format!("Uptime: {}", uptime_text(uptime)));
    }
    lines
}

fn uptime_text(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86400, seconds / 3600 % 24, seconds / 60 % 60);
    if days > 0 {
        format!("{days} d {hours} h {minutes} min")
    } else {
        format!("{hours} h {minutes} min")
    }
}

/// One heartbeat's view of the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Telemetry {
    pub cpu_usage_percent: f32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// `(mount point, total bytes, available bytes)`.
    pub disks: Vec<(String, u64, u64)>,
    /// `(interface, rx bytes, tx bytes)` since boot, loopback left out.
    pub networks: Vec<(String, u64, u64)>,
    pub uptime_seconds: u64,
}

/// Keeps the previous CPU sample, since usage is the difference between two.
pub struct Sampler {
    system: System,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampler")
    }
}

impl Sampler {
    /// Takes a first CPU sample and waits the minimum interval, so the first `sample` has a meaningful usage.
    pub fn new() -> Option<Self> {
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = System::new_with_specifics(refresh).ok()?;
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.max(Duration::from_millis(200)));
        Some(Self { system })
    }

    pub fn sample(&mut self) -> Telemetry {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let disks = Disks::new_with_refreshed_list()
            .map(|disks| {
                disks
                    .iter()
                    .map(|d| (d.mount_point().display().to_string(), d.total_space(), d.available_space()))
                    .collect()
            })
            .unwrap_or_default();
        let mut networks: Vec<(String, u64, u64)> = Networks::new_with_refreshed_list()
            .map(|networks| {
                networks
                    .iter()
                    .filter(|(name, _)| name.to_str() != Some("lo"))
                    .map(|(name, data)| {
                        (name.to_string_lossy().into_owned(), data.total_received(), data.total_transmitted())
                    })
                    .collect()
            })
            .unwrap_or_default();
        networks.sort();
        Telemetry {
            cpu_usage_percent: self.system.global_cpu_usage(),
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            disks,
            networks,
            uptime_seconds: System::uptime().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_telemetry_describe_this_machine() {
        let lines = summary();
        assert!(lines.iter().any(|l| l.starts_with("CPU: ")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("Memory: ")), "{lines:?}");
        let telemetry = Sampler::new().unwrap().sample();
        assert!(telemetry.memory_total_bytes > 0 && telemetry.memory_used_bytes > 0);
        assert!((0.0..=100.0).contains(&telemetry.cpu_usage_percent));
        assert!(telemetry.uptime_seconds > 0);
        assert!(facts().cpu_count > 0);
    }

    #[test]
    fn addresses_of_interfaces_and_uptime_text() {
        assert_eq!(ipv4_of("lo").as_deref(), Some("127.0.0.1/8"));
        assert_eq!(ipv4_of("qx-no-such-nic"), None);
        assert_eq!(uptime_text(90061), "1 d 1 h 1 min");
        assert_eq!(uptime_text(3660), "1 h 1 min");
    }
}
