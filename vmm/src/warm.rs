//! The warm pool: QEMU processes of common shapes launched ahead of time and left paused before the first
//! instruction (`-S`), so that StartVM only plugs the VM's disks and NICs over QMP and says `cont`.
//!
//! A QEMU fixes at launch everything that is not hotpluggable, including the SMBIOS UUID the guest reads as its
//! identity. A warm QEMU is therefore launched with a UUID of its own, and a VM created without a UUID whose
//! launch-time hardware matches a warm QEMU takes that UUID at creation ([`WarmPool::reserve`]); its first start
//! then uses that QEMU. A VM with any other UUID starts cold. What decides a match is the command line itself
//! ([`launch_key`]): the warm QEMU's arguments must equal those the VM would be launched with, disks and NICs
//! aside, so a VM started warm and one started cold get the same machine (see `cmdline::Hardware`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use qx_qmp::QmpClient;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::accel::Accel;
use qx_devices::firmware::UefiArgs;

use crate::cmdline::{qemu_args, LaunchLayout};
use crate::device_tree::DeviceTree;
use crate::host::HostRoot;
use crate::persist::VmDir;
use crate::process::{is_qemu_of, read_pidfile, QemuProcess};
use crate::spec::{Firmware, KernelBoot, ValidationErrors, VmSpec};

/// One shape the pool keeps ready QEMUs of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmShape {
    /// QEMU machine type. Default: `q35`.
    #[serde(default = "default_machine")]
    pub machine: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// For VMs that boot a kernel directly; absent for VMs that boot from a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,
    /// How many ready QEMUs of this shape to keep (reserved ones not counted).
    pub count: usize,
}

fn default_machine() -> String {
    "q35".to_owned()
}

/// More than this many ready QEMUs per shape is a typo, not a pool.
pub const MAX_WARM_PER_SHAPE: usize = 64;

impl WarmShape {
    /// The spec a warm QEMU of this shape is launched from.
    pub fn spec(&self, uuid: Uuid) -> VmSpec {
        VmSpec {
            name: format!("warm-{}", uuid.simple()),
            uuid: Some(uuid),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            max_vcpus: None,
            max_memory_mib: None,
            machine: self.machine.clone(),
            cpu: None,
            accelerator: Default::default(),
            firmware: Firmware::default(),
            secure_boot: false,
            tpm: false,
            placement: Default::default(),
            kernel: self.kernel.clone(),
            disks: Vec::new(),
            nics: Vec::new(),
            serial: true,
            vnc_display: None,
            labels: Default::default(),
            cloud_init: None,
        }
    }

    /// Checks the shape as a spec would be checked, naming fields as `<prefix>.vcpus` and so on.
    pub fn validate(&self, prefix: &str) -> Result<(), ValidationErrors> {
        let mut errors = match self.spec(Uuid::nil()).validate(&crate::spec::RealFiles) {
            Ok(()) => Vec::new(),
            Err(ValidationErrors(errors)) => errors,
        };
        for error in &mut errors {
            error.field = format!("{prefix}.{}", error.field);
        }
        if self.count > MAX_WARM_PER_SHAPE {
            errors.push(crate::spec::FieldError {
                field: format!("{prefix}.count"),
                value: self.count.to_string(),
                problem: format!("is above {MAX_WARM_PER_SHAPE}"),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

/// The arguments that fix `spec`'s machine (its devices placed as `tree` says) at launch: its command line without
/// the name, the paths of this run, disks and NICs. Two specs with equal keys get the same machine.
pub fn launch_key(spec: &VmSpec, tree: &DeviceTree, accel: Accel) -> Vec<OsString> {
    let mut spec = spec.clone();
    spec.name = "-".into();
    let layout = LaunchLayout {
        qmp_fd: 3,
        serial_fd: spec.serial.then_some(4),
        qga_fd: 5,
        pidfile: PathBuf::new(),
        // A VM with a seed gets a CD-ROM at launch, which a warm QEMU does not have.
        seed: spec.cloud_init.is_some().then(|| PathBuf::from("seed")),
        hotplug: true,
        // Warm QEMUs boot SeaBIOS; a UEFI VM's flash devices are fixed at launch, so it never takes one.
        uefi: (spec.firmware == Firmware::Uefi)
            .then(|| UefiArgs { machine: vec!["pflash0=uefi".into()], args: Vec::new() }),
        // Nor one with a TPM, whose device is there from launch.
        tpm: spec.tpm.then(|| vec!["tpm".to_owned()]),
    };
    qemu_args(&spec, tree, accel, &layout)
}

/// A ready QEMU.
pub(crate) struct Warm {
    pub shape: usize,
    pub uuid: Uuid,
    pub dir: VmDir,
    pub process: QemuProcess,
    pub qmp: QmpClient,
    pub key: Vec<OsString>,
    /// The VM that took this QEMU's UUID at creation.
    pub reserved_for: Option<String>,
}

/// The ready QEMUs and the shapes to keep them in.
#[derive(Default)]
pub(crate) struct WarmPool {
    pub shapes: Vec<WarmShape>,
    pub accel: Option<Accel>,
    entries: Mutex<Vec<Warm>>,
    /// Wakes the refill task.
    pub wake: Notify,
}

impl WarmPool {
    pub fn new(shapes: Vec<WarmShape>, accel: Accel) -> Self {
        Self { shapes, accel: Some(accel), entries: Mutex::new(Vec::new()), wake: Notify::new() }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Warm>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.shapes.iter().any(|s| s.count > 0)
    }

    pub fn add(&self, warm: Warm) {
        self.entries().push(warm);
    }

    /// A UUID for a new VM `name` whose spec (without UUID) fits a ready, unreserved QEMU, which is then kept for
    /// it. Reservations per shape are capped at the shape's count so that VMs created and never started cannot
    /// hold an unbounded number of QEMUs.
    pub fn reserve(&self, spec: &VmSpec, tree: &DeviceTree, accel: Accel, name: &str) -> Option<Uuid> {
        let mut entries = self.entries();
        let reserved_of = |shape: usize, entries: &[Warm]| {
            entries.iter().filter(|w| w.shape == shape && w.reserved_for.is_some()).count()
        };
        let mut candidate = spec.clone();
        let index = entries.iter().position(|w| {
            candidate.uuid = Some(w.uuid);
            w.reserved_for.is_none()
                && !w.qmp.is_closed()
                && reserved_of(w.shape, &entries) < self.shapes[w.shape].count
                && launch_key(&candidate, tree, accel) == w.key
        })?;
        entries[index].reserved_for = Some(name.to_owned());
        self.wake.notify_one();
        Some(entries[index].uuid)
    }

    /// The QEMU reserved for `spec`'s VM, if it still fits and still runs.
    pub fn take(&self, spec: &VmSpec, tree: &DeviceTree, accel: Accel) -> Option<Warm> {
        let mut entries = self.entries();
        let index = entries.iter().position(|w| w.reserved_for.as_deref() == Some(spec.name.as_str()))?;
        let warm = entries.swap_remove(index);
        self.wake.notify_one();
        if warm.uuid == spec.uuid() && !warm.qmp.is_closed() && launch_key(spec, tree, accel) == warm.key {
            Some(warm)
        } else {
            drop(entries);
            discard(warm);
            None
        }
    }

    /// Drops `name`'s reservation (the VM was deleted or changed), stopping its QEMU.
    pub fn release(&self, name: &str) {
        let mut entries = self.entries();
        if let Some(index) = entries.iter().position(|w| w.reserved_for.as_deref() == Some(name)) {
            let warm = entries.swap_remove(index);
            drop(entries);
            discard(warm);
            self.wake.notify_one();
        }
    }

    /// A shape short of ready QEMUs, after dropping the QEMUs that died.
    pub fn wanting(&self) -> Option<usize> {
        let mut entries = self.entries();
        let (alive, dead): (Vec<Warm>, Vec<Warm>) = entries.drain(..).partition(|w| !w.qmp.is_closed());
        *entries = alive;
        drop(entries);
        dead.into_iter().for_each(discard);
        let entries = self.entries();
        (0..self.shapes.len()).find(|&shape| {
            let ready = entries.iter().filter(|w| w.shape == shape && w.reserved_for.is_none()).count();
            ready < self.shapes[shape].count
        })
    }

    /// Stops every QEMU of the pool, and waits for them, when the daemon exits.
    pub async fn drain(&self) {
        let warm: Vec<Warm> = self.entries().drain(..).collect();
        for warm in warm {
            stop(warm).await;
        }
    }

    /// Ready and reserved QEMUs.
    pub fn counts(&self) -> (usize, usize) {
        let entries = self.entries();
        let reserved = entries.iter().filter(|w| w.reserved_for.is_some()).count();
        (entries.len() - reserved, reserved)
    }
}

/// Stops a warm QEMU that will not be used, reaps it (it is our child) and removes its directory, in the
/// background.
pub(crate) fn discard(warm: Warm) {
    tokio::spawn(stop(warm));
}

async fn stop(warm: Warm) {
    let _ = warm.process.kill();
    warm.process.exited().await;
    let dir = warm.dir.path().to_owned();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
}

/// Stops the warm QEMUs an earlier qx-node left behind (they are not adopted: a fresh one costs little) and
/// empties `root`. A QEMU is killed only when its pidfile's process still carries the directory's UUID.
pub(crate) fn clear_stale(root: &Path, host: &HostRoot) {
    let Ok(dirents) = std::fs::read_dir(root) else { return };
    for dirent in dirents.flatten() {
        let dir = dirent.path();
        let uuid = dirent.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok());
        if let (Some(uuid), Some(pid)) = (uuid, read_pidfile(&dir.join("qemu.pid"))) {
            if let Some(process) = rustix::process::Pid::from_raw(pid).filter(|_| is_qemu_of(host, pid, uuid)) {
                tracing::info!(pid, %uuid, "stopping a warm QEMU left by an earlier qx-node");
                let _ = rustix::process::kill_process(process, rustix::process::Signal::KILL);
                // After a re-exec it is still our child: reap it. Otherwise this fails at once with ECHILD.
                let _ = rustix::process::waitpid(Some(process), rustix::process::WaitOptions::empty());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
