//! A cgroup per VM with CPU weight and quota, memory and pids limits, on cgroup v2 (one unified hierarchy) and on
//! v1 (one hierarchy per controller, as on this project's test machines). Created before QEMU is started in it,
//! found again by name after a daemon restart, removed once the VM's processes are gone.
//!
//! One implementation for the whole node: the security engineer's per-VM limits (issue 12) use it too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::HostRoot;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroup (under each hierarchy) that holds every VM's cgroup.
pub const PARENT: &str = "quantix";
/// The CFS period quotas are expressed in: 100 ms, the kernel's default.
const PERIOD_US: u64 = 100_000;
/// The v1 controllers a VM cgroup uses.
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy at {path} offers the {controller} controller")]
    NoController { controller: &'static str, path: PathBuf },
    #[error("cannot {step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{field}: {value} is outside {min}-{max}")]
    Range { field: &'static str, value: u64, min: u64, max: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// What a VM may use. `None` leaves the kernel's default (no limit, the default weight).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupLimits {
    /// Relative CPU weight, 1-10000 (v2's scale; 100 is the default). On v1 it becomes `cpu.shares` ×10.24.
    pub cpu_weight: Option<u64>,
    /// CPU time per period in percent of one CPU (150 = one and a half CPUs).
    pub cpu_quota_percent: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub pids_max: Option<u64>,
}

impl CgroupLimits {
    pub fn validate(&self) -> Result<(), CgroupError> {
        if let Some(weight) = self.cpu_weight {
            if !(1..=10_000).contains(&weight) {
                return Err(CgroupError::Range { field: "cpu_weight", value: weight, min: 1, max: 10_000 });
            }
        }
        if let Some(quota) = self.cpu_quota_percent {
            if !(1..=100_000).contains(&quota) {
                return Err(CgroupError::Range { field: "cpu_quota_percent", value: quota, min: 1, max: 100_000 });
            }
        }
        Ok(())
    }
}

/// One VM's cgroup: a directory per hierarchy (one on v2, one per controller on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    pub version: CgroupVersion,
    dirs: Vec<(Option<&'static str>, PathBuf)>,
}

/// Which cgroup version the host runs: v2 when `/sys/fs/cgroup` is the unified hierarchy itself.
pub fn host_version(root: &HostRoot) -> CgroupVersion {
    if root.path(CGROUP_ROOT).join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

impl VmCgroup {
    /// Where the cgroup `name` lives (or would), whether it exists or not.
    pub fn locate(root: &HostRoot, name: &str) -> Result<Self, CgroupError> {
        let base = root.path(CGROUP_ROOT);
        let version = host_version(root);
        let dirs = match version {
            CgroupVersion::V2 => vec![(None, base.join(PARENT).join(name))],
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| {
                    let hierarchy = base.join(c);
                    if hierarchy.join("cgroup.procs").exists() {
                        Ok((Some(*c), hierarchy.join(PARENT).join(name)))
                    } else {
                        Err(CgroupError::NoController { controller: c, path: hierarchy })
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { version, dirs })
    }

    /// Creates the cgroup `name` (kept if it exists) and sets `limits`.
    pub fn create(root: &HostRoot, name: &str, limits: &CgroupLimits) -> Result<Self, CgroupError> {
        limits.validate()?;
        let cgroup = Self::locate(root, name)?;
        if cgroup.version == CgroupVersion::V2 {
            // Children get controllers only when every ancestor below the root delegates them.
            let base = root.path(CGROUP_ROOT);
            write(&base.join("cgroup.subtree_control"), "+cpu +memory +pids", "enable controllers in")?;
            mkdir(&base.join(PARENT))?;
            write(&base.join(PARENT).join("cgroup.subtree_control"), "+cpu +memory +pids", "enable controllers in")?;
        }
        for (_, dir) in &cgroup.dirs {
            mkdir(dir.parent().unwrap_or(dir))?;
            mkdir(dir)?;
        }
        cgroup.set_limits(limits)?;
        Ok(cgroup)
    }

    /// The cgroup `name` if it exists: how a restarted daemon finds a running VM's.
    pub fn open(root: &HostRoot, name: &str) -> Result<Option<Self>, CgroupError> {
        let cgroup = Self::locate(root, name)?;
        Ok(cgroup.dirs.iter().all(|(_, d)| d.is_dir()).then_some(cgroup))
    }

    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let set = |controller: &str, file: &str, value: String| -> Result<(), CgroupError> {
            write(&self.file(controller, file), &value, "set")
        };
        match self.version {
            CgroupVersion::V2 => {
                if let Some(weight) = limits.cpu_weight {
                    set("cpu", "cpu.weight", weight.to_string())?;
                }
                if let Some(quota) = limits.cpu_quota_percent {
                    set("cpu", "cpu.max", format!("{} {PERIOD_US}", quota * PERIOD_US / 100))?;
                }
                if let Some(bytes) = limits.memory_bytes {
                    set("memory", "memory.max", bytes.to_string())?;
                }
                if let Some(max) = limits.pids_max {
                    set("pids", "pids.max", max.to_string())?;
                }
            }
            CgroupVersion::V1 => {
                if let Some(weight) = limits.cpu_weight {
                    set("cpu", "cpu.shares", (weight * 1024 / 100).max(2).to_string())?;
                }
                if let Some(quota) = limits.cpu_quota_percent {
                    set("cpu", "cpu.cfs_period_us", PERIOD_US.to_string())?;
                    set("cpu", "cpu.cfs_quota_us", (quota * PERIOD_US / 100).to_string())?;
                }
                if let Some(bytes) = limits.memory_bytes {
                    set("memory", "memory.limit_in_bytes", bytes.to_string())?;
                }
                if let Some(max) = limits.pids_max {
                    set("pids", "pids.max", max.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string(), "add a process to")?;
        }
        Ok(())
    }

    /// The processes in the cgroup.
    pub fn processes(&self) -> Vec<i32> {
        let Some((_, dir)) = self.dirs.first() else { return Vec::new() };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Reads a limit file back (`memory.max`, `cpu.shares`, ...), trimmed.
    pub fn read(&self, controller: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(self.file(controller, file)).ok().map(|s| s.trim().to_owned())
    }

    /// Removes the cgroup once its processes are gone (the kernel refuses while any remains). Absent is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Io { step: "remove", path: dir.clone(), source }),
            }
        }
        Ok(())
    }

    fn file(&self, controller: &str, file: &str) -> PathBuf {
        let dir = self.dirs.iter().find(|(c, _)| c.is_none() || *c == Some(controller)).map(|(_, d)| d);
        dir.unwrap_or(&self.dirs[0].1).join(file)
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io { step: "create", path: dir.to_owned(), source }),
    }
}

fn write(path: &Path, value: &str, step: &'static str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io { step, path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CgroupLimits {
        CgroupLimits {
            cpu_weight: Some(200),
            cpu_quota_percent: Some(150),
            memory_bytes: Some(512 << 20),
            pids_max: Some(64),
        }
    }

    #[test]
    fn v2_sets_weight_max_memory_and_pids_in_one_directory() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("sys/fs/cgroup");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let host = HostRoot::new(root.path());
        let cgroup = VmCgroup::create(&host, "vm-a", &limits()).unwrap();
        assert_eq!(cgroup.version, CgroupVersion::V2);
        assert_eq!(std::fs::read_to_string(base.join("quantix/cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert_eq!(cgroup.read("cpu", "cpu.weight").as_deref(), Some("200"));
        assert_eq!(cgroup.read("cpu", "cpu.max").as_deref(), Some("150000 100000"));
        assert_eq!(cgroup.read("memory", "memory.max").as_deref(), Some("536870912"));
        assert_eq!(cgroup.read("pids", "pids.max").as_deref(), Some("64"));
        assert_eq!(VmCgroup::open(&host, "vm-a").unwrap(), Some(cgroup));
        assert_eq!(VmCgroup::open(&host, "vm-b").unwrap(), None);
    }

    #[test]
    fn v1_uses_one_hierarchy_per_controller() {
        let root = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS {
            let dir = root.path().join("sys/fs/cgroup").join(c);
            std::fs::create_dir_all(dir.join(PARENT)).unwrap();
            std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        }
        let cgroup = VmCgroup::create(&HostRoot::new(root.path()), "vm-a", &limits()).unwrap();
        assert_eq!(cgroup.version, CgroupVersion::V1);
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join("sys/fs/cgroup").join(c).join("quantix/vm-a").join(f)).unwrap()
        };
        assert_eq!(read("cpu", "cpu.shares"), "2048");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "150000");
        assert_eq!(read("memory", "memory.limit_in_bytes"), "536870912");
        assert_eq!(read("pids", "pids.max"), "64");
    }

    #[test]
    fn bad_limits_and_missing_controllers_are_named() {
        let root = tempfile::tempdir().unwrap();
        let bad = CgroupLimits { cpu_weight: Some(0), ..Default::default() };
        let e = VmCgroup::create(&HostRoot::new(root.path()), "vm-a", &bad).unwrap_err();
        assert_eq!(e.to_string(), "cpu_weight: 0 is outside 1-10000");
        let e = VmCgroup::create(&HostRoot::new(root.path()), "vm-a", &CgroupLimits::default()).unwrap_err();
        assert!(e.to_string().starts_with("no cgroup hierarchy at"), "{e}");
    }

    /// The host's own cgroups: a VM cgroup is created, limits read back from the kernel, a process moved in, and
    /// the cgroup removed once the process has exited.
    #[test]
    fn the_real_host_creates_limits_and_removes_a_vm_cgroup() {
        let host = HostRoot::default();
        let name = format!("qx-test-{}", std::process::id());
        let cgroup = match VmCgroup::create(&host, &name, &limits()) {
            Ok(cgroup) => cgroup,
            Err(e) => return qx_test_infra::skip(&format!("cannot create a cgroup here: {e}")),
        };
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let result = std::panic::catch_unwind(|| {
            cgroup.add_process(child.id() as i32).unwrap();
            assert_eq!(cgroup.processes(), [child.id() as i32]);
            match cgroup.version {
                CgroupVersion::V1 => {
                    assert_eq!(cgroup.read("memory", "memory.limit_in_bytes").as_deref(), Some("536870912"));
                    assert_eq!(cgroup.read("cpu", "cpu.cfs_quota_us").as_deref(), Some("150000"));
                }
                CgroupVersion::V2 => {
                    assert_eq!(cgroup.read("memory", "memory.max").as_deref(), Some("536870912"));
                    assert_eq!(cgroup.read("cpu", "cpu.max").as_deref(), Some("150000 100000"));
                }
            }
            assert_eq!(cgroup.read("pids", "pids.max").as_deref(), Some("64"));
        });
        let _ = child.kill();
        let _ = child.wait();
        cgroup.remove().unwrap();
        assert_eq!(VmCgroup::open(&host, &name).unwrap(), None);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
