//! What the kernel says about a VM's QEMU and taps: CPU time per thread (`/proc/<pid>/task/*/stat`, the vCPU
//! threads found by the names `-name debug-threads=on` gives them: `CPU 0/TCG`, `CPU 1/KVM`), resident memory
//! (`/proc/<pid>/status`) and tap counters (`/proc/net/dev`). Every path is under the node's
//! [`HostRoot`]. A process or tap that vanished between listing and reading gives nothing, never an error: a
//! scrape reports what exists at that moment.

use std::collections::HashMap;
use std::fs;

use qx_vmm::HostRoot;

/// `/proc` counts CPU time in USER_HZ, which the kernel fixes at 100 on the architectures QEMU hosts run on.
const USER_HZ: f64 = 100.0;

/// CPU and memory of one QEMU process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    /// User and system time of all its threads, in seconds.
    pub cpu_seconds: f64,
    /// `VmRSS`, in bytes.
    pub resident_bytes: u64,
    /// (vCPU index, seconds of CPU time) for each vCPU thread.
    pub vcpus: Vec<(u32, f64)>,
}

/// The figures of process `pid`, or `None` when it is gone.
pub fn process(root: &HostRoot, pid: i32) -> Option<ProcessFigures> {
    let dir = root.path(format!("/proc/{pid}"));
    let total = cpu_seconds(&fs::read_to_string(dir.join("stat")).ok()?)?;
    let resident_bytes = fs::read_to_string(dir.join("status")).ok().and_then(|s| resident(&s)).unwrap_or(0);
    let mut vcpus = Vec::new();
    for task in fs::read_dir(dir.join("task")).into_iter().flatten().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(index) = vcpu_index(comm.trim_end()) else { continue };
        if let Some(seconds) = fs::read_to_string(task.path().join("stat")).ok().and_then(|s| cpu_seconds(&s)) {
            vcpus.push((index, seconds));
        }
    }
    vcpus.sort_by_key(|(index, _)| *index);
    Some(ProcessFigures { cpu_seconds: total, resident_bytes, vcpus })
}

/// utime + stime of a `stat` line, in seconds. The command name in parentheses may hold spaces and `)`, so the
/// fields are counted after its last `)`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name: state(3) ppid ... utime(14) stime(15); `rest` starts at field 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

fn resident(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The vCPU index of a QEMU thread named `CPU <n>/<accelerator>`.
fn vcpu_index(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    let (index, _accel) = rest.split_once('/')?;
    index.parse().ok()
}

/// Counters of one tap, as the host sees them (the guest's receive is the tap's transmit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// The counters of every interface in qx-node's network namespace, by name, from `/proc/net/dev`. (Not
/// `/sys/class/net`: sysfs shows the namespace it was mounted in, which need not be qx-node's.)
pub fn interfaces(root: &HostRoot) -> HashMap<String, TapCounters> {
    fs::read_to_string(root.path("/proc/net/dev")).map(|text| parse_net_dev(&text)).unwrap_or_default()
}

/// `/proc/net/dev`: two header lines, then `name: rx_bytes rx_packets errs drop fifo frame compressed multicast
/// tx_bytes tx_packets ...`.
fn parse_net_dev(text: &str) -> HashMap<String, TapCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let fields: Vec<u64> = counters.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            let counters = TapCounters {
                rx_bytes: *fields.first()?,
                rx_packets: *fields.get(1)?,
                tx_bytes: *fields.get(8)?,
                tx_packets: *fields.get(9)?,
            };
            Some((name.trim().to_owned(), counters))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let stat = "4242 (qemu (x) ) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 6 0 100 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("4242 (qemu"), None);
        assert_eq!(cpu_seconds("4242 (qemu) S 1"), None);
    }

    #[test]
    fn vcpu_threads_are_found_by_name() {
        assert_eq!(vcpu_index("CPU 0/TCG"), Some(0));
        assert_eq!(vcpu_index("CPU 12/KVM"), Some(12));
        assert_eq!(vcpu_index("qemu-system-x86"), None);
        assert_eq!(vcpu_index("CPU x/TCG"), None);
    }

    #[test]
    fn a_fake_proc_and_sys_tree_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let proc = dir.path().join("proc/77");
        fs::create_dir_all(proc.join("task/77")).unwrap();
        fs::create_dir_all(proc.join("task/78")).unwrap();
        let stat = |utime: u32| format!("77 (qemu) S 1 77 77 0 -1 0 0 0 0 0 {utime} 0 0 0 20 0 2 0 1 0 0\n");
        fs::write(proc.join("stat"), stat(500)).unwrap();
        fs::write(proc.join("status"), "Name:\tqemu\nVmRSS:\t  2048 kB\n").unwrap();
        fs::write(proc.join("task/77/comm"), "qemu-system-x86\n").unwrap();
        fs::write(proc.join("task/77/stat"), stat(100)).unwrap();
        fs::write(proc.join("task/78/comm"), "CPU 0/TCG\n").unwrap();
        fs::write(proc.join("task/78/stat"), stat(400)).unwrap();
        let figures = process(&root, 77).unwrap();
        assert_eq!(figures, ProcessFigures { cpu_seconds: 5.0, resident_bytes: 2048 * 1024, vcpus: vec![(0, 4.0)] });
        assert_eq!(process(&root, 78), None, "gone");

        fs::create_dir_all(dir.path().join("proc/net")).unwrap();
        fs::write(
            dir.path().join("proc/net/dev"),
            "Inter-|   Receive                            |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls\n\
             qxtap0:    1       3    0    0    0     0          0         0        2       4    0    0    0     0\n",
        )
        .unwrap();
        let taps = interfaces(&root);
        assert_eq!(taps.get("qxtap0"), Some(&TapCounters { rx_bytes: 1, tx_bytes: 2, rx_packets: 3, tx_packets: 4 }));
        assert_eq!(taps.len(), 1, "header lines are not interfaces: {taps:?}");
    }
}
