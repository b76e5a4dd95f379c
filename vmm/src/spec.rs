//! `VmSpec`: what an operator asks for, and the validation that stands between it and QEMU.
//!
//! Specs arrive as YAML or JSON text (qxctl spec files) or as gRPC messages; both end here. `validate` reports every
//! problem at once, each naming the field and the offending value, so an operator fixes a spec in one pass.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

pub use qx_devices::placement::CpuList;
use qx_storage::cloudinit::{MetaData, NetworkConfig, SeedConfig, UserData};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Smallest memory QEMU's x86 machines and a Linux guest put up with.
pub const MIN_MEMORY_MIB: u64 = 16;
/// 4 TiB: more than any host we target; larger values are typos.
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
/// QEMU's q35 limit for x86 without extra configuration.
pub const MAX_VCPUS: u32 = 288;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
pub const MAX_NAME_LEN: usize = 63;
/// Device ids become parts of QEMU ids and OVS `iface-id`s: short.
pub const MAX_DEVICE_ID_LEN: usize = 32;
pub const MAX_CMDLINE_LEN: usize = 4096;
/// VNC displays map to TCP ports 5900 + display.
pub const MAX_VNC_DISPLAY: u32 = 99;

/// A VM as the operator describes it. Everything QEMU needs to start it is derived from this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique on the node; used in paths, so restricted to `[A-Za-z0-9._-]`.
    pub name: String,
    /// Generated at creation when absent, then kept for the VM's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// Default: 1.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Default: 512.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// vCPUs the VM may grow to while it runs (hotplug). Default: `vcpus` (no vCPU hotplug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Memory the VM may grow to while it runs (DIMM hotplug). Default: `memory_mib` (no memory hotplug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// QEMU machine type. Default: `q35`; an alias (`q35`, `pc`) is pinned at creation to the versioned type it
    /// stands for on the node's QEMU (`pc-q35-7.2`), so a QEMU upgrade does not change the guest's machine.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// CPU model: a QEMU model name, or `host` (the host CPU passed through; KVM only, and only when asked for).
    /// Pinned at creation, when absent, to the first of `machine::DEFAULT_CPU_MODELS` the node's QEMU has. Absent
    /// only in VMs created before this field, which keep what they had: the host CPU under KVM, QEMU's default
    /// under TCG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Default: `auto` (the node's choice: KVM when usable, else TCG).
    #[serde(default)]
    pub accelerator: AccelChoice,
    /// Default: SeaBIOS.
    #[serde(default)]
    pub firmware: Firmware,
    /// UEFI Secure Boot, with Microsoft's keys enrolled in the VM's NVRAM (what Windows 11 and shim-signed Linux
    /// distributions boot with). Needs `firmware: uefi` and a q35 machine (the firmware guards its keys in System
    /// Management Mode). Default: off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_boot: bool,
    /// A TPM 2.0 (`swtpm`, its state kept in the VM's directory) on a CRB interface, what Windows 11 requires.
    /// Default: none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tpm: bool,
    /// Where the VM's threads run on the host. Default: wherever the host's scheduler puts them.
    #[serde(default, skip_serializing_if = "Placement::is_unset")]
    pub placement: Placement,
    /// Direct kernel boot; when absent the first disk boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// A serial port captured by qx-node. Default: on.
    #[serde(default = "default_true")]
    pub serial: bool,
    /// VNC on 127.0.0.1, port 5900 + display. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_display: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// First-boot configuration for cloud images, handed to the guest as a NoCloud `cidata` seed on a read-only
    /// CD-ROM. Default: none (no CD-ROM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

/// What cloud-init reads at first boot. The instance id is the VM's UUID and the local hostname defaults to the
/// VM's name, so an operator only says what differs from an image's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// Hostname, users with SSH keys and password hashes, packages, runcmd.
    #[serde(default)]
    pub user_data: UserData,
    /// Static or DHCP addressing; absent means DHCP on the first NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<NetworkConfig>,
}

impl VmSpec {
    /// The seed `cloud_init` describes, or `None` without one.
    pub fn seed_config(&self) -> Option<SeedConfig> {
        let cloud_init = self.cloud_init.as_ref()?;
        let hostname = cloud_init.user_data.hostname.clone().unwrap_or_else(|| self.name.clone());
        Some(SeedConfig {
            meta_data: MetaData { instance_id: self.uuid().to_string(), local_hostname: hostname },
            user_data: cloud_init.user_data.clone(),
            network_config: cloud_init.network_config.as_ref().map(|n| self.matched_network(n)),
        })
    }

    /// `net` with each ethernet bound to the MAC of its VM NIC, so that the guest applies it whatever it names the
    /// NIC (Debian says `enp1s0`, not `eth0`): the NIC its `nic` names, or, with neither `nic` nor `mac`, the NIC
    /// at the same position. A name that resolves to nothing is left for `validate` to report.
    fn matched_network(&self, net: &NetworkConfig) -> NetworkConfig {
        let mut net = net.clone();
        for (i, ethernet) in net.ethernets.iter_mut().enumerate() {
            if ethernet.mac.is_some() {
                continue;
            }
            let index = match &ethernet.nic {
                Some(name) => self.nic_index(name).ok(),
                None => (i < self.nics.len()).then_some(i),
            };
            if let Some(mac) = index.and_then(|k| self.nics[k].mac.clone()) {
                ethernet.mac = Some(mac);
                ethernet.nic = None;
            }
        }
        net
    }

    /// The index of the NIC `name` refers to: its id, or its position in `nics` (`"0"`).
    pub fn nic_index(&self, name: &str) -> Result<usize, String> {
        if let Some(index) = self.nics.iter().position(|nic| nic.id.as_deref() == Some(name)) {
            return Ok(index);
        }
        match name.parse::<usize>() {
            Ok(index) if index < self.nics.len() => Ok(index),
            _ => Err(match self.nics.len() {
                0 => "names a NIC, but this VM has none".to_owned(),
                n => format!("is neither the id of a NIC of this VM nor an index below {n}"),
            }),
        }
    }
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory_mib() -> u64 {
    512
}
fn default_machine() -> String {
    "q35".to_owned()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Seabios,
    /// OVMF (Debian's `ovmf`): the shared code image read-only, and a copy of its NVRAM variables per VM, made at
    /// the VM's first start and kept in its directory, so boot entries and keys survive restarts.
    Uefi,
}

/// vCPU and emulator thread pinning (`sched_setaffinity`), applied before the vCPUs first run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Host CPUs for each vCPU, by vCPU index (`["2", "3"]`: vCPU 0 on host CPU 2, vCPU 1 on 3; `"2-3"` lets one
    /// vCPU run on either). vCPUs past the list, and vCPUs hot-added later, are not pinned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_cpus: Vec<CpuList>,
    /// Host CPUs for QEMU's other threads (main loop, I/O, workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_cpus: Option<CpuList>,
}

impl Placement {
    pub fn is_unset(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Names the disk for the life of the VM (hotplug, `devices.json`); unique among the VM's disks and NICs.
    /// Generated once when absent: the lowest free `disk{n}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// An image file or block device on the host; exactly one of `path` and `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A storage pool volume, `pool/volume`; resolved to its file and format when the VM starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// For `path` disks; a volume's format comes from its pool. Default: raw.
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub read_only: bool,
    /// Default: none (O_DIRECT; no double caching in host and guest).
    #[serde(default)]
    pub cache: CacheMode,
    /// Default: threads (works with every cache mode).
    #[serde(default)]
    pub aio: AioMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    #[default]
    None,
    Writeback,
    Writethrough,
    Directsync,
    Unsafe,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AioMode {
    #[default]
    Threads,
    Native,
    IoUring,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Names the NIC for the life of the VM (hotplug, its tap, OVS `iface-id`); unique among the VM's disks and
    /// NICs. Generated once when absent: the lowest free `nic{n}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Default: user-mode networking.
    #[serde(default)]
    pub kind: NicKind,
    /// The node network (an Open vSwitch bridge and VLAN) a `network` NIC plugs into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Generated once at creation when absent, then kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// TCP ports of the host's loopback forwarded into the guest, for `user` NICs only (QEMU's `hostfwd`): how a
    /// developer or a test reaches a guest's SSH without a node network. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_forwards: Vec<HostForward>,
    /// Security groups (of the node) whose rules filter the NIC's traffic, for `network` NICs on networks of kind
    /// `ovn`; with any, all IP traffic not allowed by one of them is dropped. Default: none (no filtering).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// A static IPv4 address, for `network` NICs on networks of kind `ovn`: the logical port's address (and port
    /// security: the NIC sends from it only), handed out by OVN's DHCP when the network has it. Must be a free host
    /// address of the network's subnet. Default: none (OVN allocates one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<std::net::Ipv4Addr>,
}

/// One forwarded TCP port of a `user` NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostForward {
    /// A port on the host's 127.0.0.1 (never on other addresses: the guest is not exposed beyond the host).
    pub host_port: u16,
    /// The port in the guest, at the address QEMU's user network gives it (10.0.2.15, by DHCP or statically).
    pub guest_port: u16,
}

impl HostForward {
    /// QEMU's `hostfwd` rule.
    pub fn rule(&self) -> String {
        format!("tcp:127.0.0.1:{}-:{}", self.host_port, self.guest_port)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicKind {
    /// QEMU's user-mode network stack: no host privileges, for development.
    #[default]
    User,
    /// A tap on a node network, created by qx-node and handed to QEMU as a file descriptor.
    Network,
}

macro_rules! display_as_serde {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let value = serde_json::to_value(self).map_err(|_| fmt::Error)?;
                f.write_str(value.as_str().unwrap_or_default())
            }
        }
    )*};
}
display_as_serde!(AccelChoice, Firmware, DiskFormat, CacheMode, AioMode, NicKind);

// One type and one message format for every crate's validation problems.
use qx_common::Problems;
pub use qx_common::{FieldError, ValidationErrors};

#[derive(Debug, thiserror::Error)]
pub enum SpecParseError {
    #[error("spec is not valid YAML or JSON: {0}")]
    Syntax(String),
}

/// How `validate` looks at the host: real files in the daemon, anything in unit tests.
pub trait HostFiles {
    /// `Ok(())` when `path` names an existing regular file or block device that can be opened.
    fn check_image(&self, path: &Path) -> Result<(), String>;

    /// The host CPUs that are online (`/sys/devices/system/cpu/online`), `None` when that cannot be read.
    fn online_cpus(&self) -> Option<CpuList> {
        std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?.trim().parse().ok()
    }
}

/// The real filesystem.
pub struct RealFiles;

impl HostFiles for RealFiles {
    fn check_image(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".to_owned(),
            _ => format!("cannot be read: {e}"),
        })?;
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err("is not a regular file or block device".to_owned());
        }
        Ok(())
    }
}

impl VmSpec {
    /// Parses a YAML or JSON spec (YAML is a superset of JSON). Unknown fields are refused, with their path.
    pub fn from_text(text: &str) -> Result<Self, SpecParseError> {
        serde_norway::from_str(text).map_err(|e| SpecParseError::Syntax(e.to_string()))
    }

    /// Checks every field; host files (images, kernels) through `files`.
    pub fn validate(&self, files: &dyn HostFiles) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        if let Err(problem) = check_name(&self.name) {
            p.add("name", &self.name, problem);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            p.add("vcpus", self.vcpus, format!("is outside 1..={MAX_VCPUS}"));
        }
        if let Some(max) = self.max_vcpus {
            if max > MAX_VCPUS {
                p.add("max_vcpus", max, format!("is above {MAX_VCPUS}"));
            } else if max < self.vcpus {
                p.add("max_vcpus", max, format!("is below vcpus ({})", self.vcpus));
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            p.add("memory_mib", self.memory_mib, format!("is below the minimum {MIN_MEMORY_MIB}"));
        } else if self.memory_mib > MAX_MEMORY_MIB {
            p.add("memory_mib", self.memory_mib, format!("is above the maximum {MAX_MEMORY_MIB} (4 TiB)"));
        }
        if let Some(max) = self.max_memory_mib {
            if max > MAX_MEMORY_MIB {
                p.add("max_memory_mib", max, format!("is above the maximum {MAX_MEMORY_MIB} (4 TiB)"));
            } else if max < self.memory_mib {
                p.add("max_memory_mib", max, format!("is below memory_mib ({})", self.memory_mib));
            }
        }
        if !machine_type_ok(&self.machine) {
            p.add("machine", &self.machine, "is not a supported machine type (q35, pc, pc-q35-X.Y, pc-i440fx-X.Y)");
        }
        if let Some(cpu) = &self.cpu {
            let ok = !cpu.is_empty()
                && cpu.len() <= 64
                && cpu.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !ok {
                p.add("cpu", cpu, "is not a CPU model name (1-64 of [A-Za-z0-9._-], or host)");
            }
        }
        if self.secure_boot {
            if self.firmware != Firmware::Uefi {
                p.add("secure_boot", "true", format!("needs firmware uefi, not {}", self.firmware));
            }
            if !qx_devices::firmware::has_smm(&self.machine) {
                p.add(
                    "secure_boot",
                    "true",
                    format!("needs a q35 machine (System Management Mode), not {}", self.machine),
                );
            }
        }
        self.validate_placement(files, &mut p);
        if let Some(kernel) = &self.kernel {
            self.validate_kernel(kernel, files, &mut p);
        } else if self.disks.is_empty() {
            p.add("kernel", "", "is required when there are no disks: there is nothing to boot");
        }
        self.validate_disks(files, &mut p);
        self.validate_nics(&mut p);
        self.validate_device_ids(&mut p);
        if let Some(display) = self.vnc_display {
            if display > MAX_VNC_DISPLAY {
                p.add("vnc_display", display, format!("is above {MAX_VNC_DISPLAY}"));
            }
        }
        for (key, value) in &self.labels {
            if key.is_empty() || key.len() > 63 || !key.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            {
                p.add(format!("labels.{key}"), key, "is not a valid label key (1-63 of [A-Za-z0-9._-/])");
            }
            if value.len() > 255 || value.chars().any(char::is_control) {
                p.add(
                    format!("labels.{key}"),
                    value,
                    "is not a valid label value (at most 255 characters, no control characters)",
                );
            }
        }
        let ethernets = self.cloud_init.iter().flat_map(|c| &c.network_config).flat_map(|n| &n.ethernets);
        for (i, ethernet) in ethernets.enumerate() {
            if let Some(name) = &ethernet.nic {
                if let Err(problem) = self.nic_index(name) {
                    p.add(format!("cloud_init.network_config.ethernets[{i}].nic"), name, problem);
                }
            }
        }
        if let Some(seed) = self.seed_config() {
            if let Err(invalid) = seed.validate() {
                // The seed's own field paths, under the spec field the operator wrote.
                let explicit_hostname = self.cloud_init.as_ref().is_some_and(|c| c.user_data.hostname.is_some());
                for problem in invalid.0 {
                    let (field, note) = match problem.field.as_str() {
                        // Reported as user_data.hostname already.
                        "meta_data.local_hostname" if explicit_hostname => continue,
                        "meta_data.local_hostname" => {
                            ("cloud_init.user_data.hostname".to_owned(), " (it defaults to the VM's name)")
                        }
                        other => (format!("cloud_init.{other}"), ""),
                    };
                    // The storage crate quotes values itself; show them once.
                    let value = serde_json::from_str::<String>(&problem.value).unwrap_or(problem.value);
                    p.add(field, value, format!("{}{note}", problem.problem));
                }
            }
        }
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(p.0))
        }
    }

    fn validate_placement(&self, files: &dyn HostFiles, p: &mut Problems) {
        let placement = &self.placement;
        if placement.vcpu_cpus.len() > self.max_vcpus() as usize {
            let problem = format!("pins {} vCPUs; the VM has at most {}", placement.vcpu_cpus.len(), self.max_vcpus());
            p.add("placement.vcpu_cpus", placement.vcpu_cpus.len(), problem);
        }
        let online = files.online_cpus();
        let lists = placement.vcpu_cpus.iter().enumerate().map(|(i, c)| (format!("placement.vcpu_cpus[{i}]"), c));
        for (field, cpus) in
            lists.chain(placement.emulator_cpus.iter().map(|c| ("placement.emulator_cpus".to_owned(), c)))
        {
            if cpus.is_empty() {
                p.add(field, cpus, "names no CPU");
            } else if let Some(online) = &online {
                let offline: CpuList = cpus.ids().filter(|cpu| !online.contains(*cpu)).collect();
                if !offline.is_empty() {
                    p.add(
                        field,
                        cpus,
                        format!("names CPUs the host does not have online ({offline}; online: {online})"),
                    );
                }
            }
        }
    }

    fn validate_kernel(&self, kernel: &KernelBoot, files: &dyn HostFiles, p: &mut Problems) {
        if let Err(problem) = check_host_path(&kernel.kernel, files) {
            p.add("kernel.kernel", kernel.kernel.display(), problem);
        }
        if let Some(initrd) = &kernel.initrd {
            if let Err(problem) = check_host_path(initrd, files) {
                p.add("kernel.initrd", initrd.display(), problem);
            }
        }
        if kernel.cmdline.len() > MAX_CMDLINE_LEN {
            p.add("kernel.cmdline", &kernel.cmdline, format!("is longer than {MAX_CMDLINE_LEN} bytes"));
        } else if kernel.cmdline.chars().any(char::is_control) {
            p.add("kernel.cmdline", &kernel.cmdline, "contains control characters");
        }
    }

    fn validate_disks(&self, files: &dyn HostFiles, p: &mut Problems) {
        if self.disks.len() > MAX_DISKS {
            p.add("disks", self.disks.len(), format!("is more than {MAX_DISKS} disks"));
        }
        let mut seen_paths = HashSet::new();
        let mut seen_volumes = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            match (&disk.path, &disk.volume) {
                (Some(path), None) => {
                    if let Err(problem) = check_host_path(path, files) {
                        p.add(format!("disks[{i}].path"), path.display(), problem);
                    } else if !seen_paths.insert(path) {
                        p.add(format!("disks[{i}].path"), path.display(), "is already used by another disk of this VM");
                    }
                }
                (None, Some(volume)) => {
                    if let Err(problem) = check_volume_name(volume) {
                        p.add(format!("disks[{i}].volume"), volume, problem);
                    } else if !seen_volumes.insert(volume) {
                        p.add(format!("disks[{i}].volume"), volume, "is already used by another disk of this VM");
                    }
                }
                (Some(path), Some(_)) => {
                    p.add(format!("disks[{i}].path"), path.display(), "and volume are both given; name one")
                }
                (None, None) => p.add(format!("disks[{i}]"), "", "needs a path or a volume"),
            }
            if disk.aio == AioMode::Native && !matches!(disk.cache, CacheMode::None | CacheMode::Directsync) {
                p.add(
                    format!("disks[{i}].aio"),
                    disk.aio,
                    format!("needs cache none or directsync, not {}", disk.cache),
                );
            }
        }
    }

    fn validate_nics(&self, p: &mut Problems) {
        if self.nics.len() > MAX_NICS {
            p.add("nics", self.nics.len(), format!("is more than {MAX_NICS} NICs"));
        }
        let mut seen = HashSet::new();
        let mut seen_ports = HashSet::new();
        for (i, nic) in self.nics.iter().enumerate() {
            match (nic.kind, &nic.network) {
                (NicKind::Network, None) => p.add(format!("nics[{i}].network"), "", "is required for a network NIC"),
                (NicKind::Network, Some(network)) => {
                    if let Err(problem) = check_name(network) {
                        p.add(format!("nics[{i}].network"), network, problem);
                    }
                }
                (NicKind::User, Some(network)) => {
                    p.add(format!("nics[{i}].network"), network, "is only for NICs of kind network");
                }
                (NicKind::User, None) => {}
            }
            for (k, forward) in nic.host_forwards.iter().enumerate() {
                let field = |name: &str| format!("nics[{i}].host_forwards[{k}].{name}");
                if nic.kind != NicKind::User {
                    p.add(format!("nics[{i}].host_forwards"), forward.rule(), "is only for NICs of kind user");
                }
                if forward.host_port == 0 {
                    p.add(field("host_port"), 0, "is not a port (1 to 65535)");
                } else if !seen_ports.insert(forward.host_port) {
                    p.add(field("host_port"), forward.host_port, "is forwarded twice in this VM");
                }
                if forward.guest_port == 0 {
                    p.add(field("guest_port"), 0, "is not a port (1 to 65535)");
                }
            }
            if let Some(ip) = nic.ipv4 {
                let field = format!("nics[{i}].ipv4");
                if nic.kind != NicKind::Network {
                    p.add(field, ip, "is only for NICs of kind network");
                } else if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
                    p.add(field, ip, "is not a unicast host address");
                }
            }
            let mut groups = HashSet::new();
            for (k, group) in nic.security_groups.iter().enumerate() {
                let field = format!("nics[{i}].security_groups[{k}]");
                if nic.kind != NicKind::Network {
                    p.add(field, group, "is only for NICs of kind network");
                } else if group.is_empty() {
                    p.add(field, group, "is empty");
                } else if !groups.insert(group) {
                    p.add(field, group, "is named twice for this NIC");
                }
            }
            let Some(mac) = &nic.mac else { continue };
            match parse_mac(mac) {
                Err(problem) => p.add(format!("nics[{i}].mac"), mac, problem),
                Ok(bytes) if !seen.insert(bytes) => {
                    p.add(format!("nics[{i}].mac"), mac, "is already used by another NIC of this VM");
                }
                Ok(_) => {}
            }
        }
    }

    fn validate_device_ids(&self, p: &mut Problems) {
        let mut seen = HashSet::new();
        let ids = self.disks.iter().enumerate().map(|(i, d)| (format!("disks[{i}].id"), &d.id));
        let ids = ids.chain(self.nics.iter().enumerate().map(|(i, n)| (format!("nics[{i}].id"), &n.id)));
        for (field, id) in ids {
            let Some(id) = id else { continue };
            if let Err(problem) = check_device_id(id) {
                p.add(field, id, problem);
            } else if !seen.insert(id.as_str()) {
                p.add(field, id, "is already used by another disk or NIC of this VM");
            }
        }
    }

    /// Gives every disk and NIC without an id the lowest free `disk{n}` / `nic{n}`; ids once given are kept.
    pub fn fill_device_ids(&mut self) {
        let mut used: HashSet<String> = self
            .disks
            .iter()
            .filter_map(|d| d.id.clone())
            .chain(self.nics.iter().filter_map(|n| n.id.clone()))
            .collect();
        let next = |prefix: &str, used: &mut HashSet<String>| {
            let id = (0..).map(|n| format!("{prefix}{n}")).find(|id| !used.contains(id)).expect("unbounded");
            used.insert(id.clone());
            id
        };
        for disk in &mut self.disks {
            if disk.id.is_none() {
                disk.id = Some(next("disk", &mut used));
            }
        }
        for nic in &mut self.nics {
            if nic.id.is_none() {
                nic.id = Some(next("nic", &mut used));
            }
        }
    }

    /// The disk with id `id`.
    pub fn disk(&self, id: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.id.as_deref() == Some(id))
    }

    /// The NIC with id `id`.
    pub fn nic(&self, id: &str) -> Option<&NicSpec> {
        self.nics.iter().find(|n| n.id.as_deref() == Some(id))
    }

    /// Fills in what creation generates once and keeps: the uuid, device ids and NIC MAC addresses.
    pub fn fill_generated(&mut self) {
        self.uuid.get_or_insert_with(Uuid::new_v4);
        self.fill_device_ids();
        for nic in &mut self.nics {
            if nic.mac.is_none() {
                nic.mac = Some(generate_mac());
            }
        }
    }

    /// vCPUs the VM may have while it runs.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus).max(self.vcpus)
    }

    /// Memory the VM may have while it runs, in MiB.
    pub fn max_memory_mib(&self) -> u64 {
        self.max_memory_mib.unwrap_or(self.memory_mib).max(self.memory_mib)
    }

    /// Pins the machine shape for the VM's life, at creation: a machine alias becomes the versioned type it stands
    /// for on this QEMU, and a missing CPU model becomes the node's default one.
    pub fn pin_shape(&mut self, caps: &crate::machine::QemuCaps) {
        self.machine = caps.pin_machine(&self.machine);
        if self.cpu.is_none() {
            self.cpu = Some(caps.default_cpu().to_owned());
        }
    }

    /// Checks the machine type and CPU model against what this node's QEMU has.
    pub fn validate_shape(&self, caps: &crate::machine::QemuCaps) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        if !caps.has_machine(&self.machine) {
            p.add("machine", &self.machine, "is not a machine type this node's QEMU has");
        }
        if let Some(cpu) = self.cpu.as_deref().filter(|cpu| !caps.has_cpu(cpu)) {
            p.add("cpu", cpu, "is not a CPU model this node's QEMU has");
        }
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(p.0))
        }
    }

    /// The uuid; `fill_generated` has run on every spec the manager holds.
    pub fn uuid(&self) -> Uuid {
        self.uuid.unwrap_or_default()
    }
}

fn check_host_path(path: &Path, files: &dyn HostFiles) -> Result<(), String> {
    if !path.is_absolute() {
        return Err("is not an absolute path".to_owned());
    }
    if path.as_os_str().as_encoded_bytes().iter().any(|b| b.is_ascii_control()) {
        return Err("contains control characters".to_owned());
    }
    files.check_image(path)
}

/// `pool/volume`, both parts plain names.
fn check_volume_name(volume: &str) -> Result<(), String> {
    let Some((pool, name)) = volume.split_once('/') else {
        return Err("is not pool/volume".to_owned());
    };
    check_name(pool).map_err(|problem| format!("has a pool name that {problem}"))?;
    check_name(name).map_err(|problem| format!("has a volume name that {problem}"))
}

/// VM names become directory names and QEMU `-name` values: keep them boring.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("contains control characters".to_owned());
    }
    if name.contains('/') || name.contains("..") {
        return Err("contains '/' or '..'".to_owned());
    }
    if name.starts_with(['.', '-']) {
        return Err("starts with '.' or '-'".to_owned());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err("may only contain letters, digits, '.', '_' and '-'".to_owned());
    }
    Ok(())
}

/// Disk and NIC ids: 1-32 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".to_owned());
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!("is longer than {MAX_DEVICE_ID_LEN} characters"));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".to_owned());
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err("may only contain letters, digits, '.', '_' and '-'".to_owned());
    }
    Ok(())
}

fn machine_type_ok(machine: &str) -> bool {
    let versioned = |prefix: &str| {
        machine.strip_prefix(prefix).is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
    };
    matches!(machine, "q35" | "pc") || versioned("pc-q35-") || versioned("pc-i440fx-")
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let mut bytes = [0u8; 6];
    if parts.len() != 6 {
        return Err("is not a MAC address (aa:bb:cc:dd:ee:ff)".to_owned());
    }
    for (byte, part) in bytes.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err("is not a MAC address (aa:bb:cc:dd:ee:ff)".to_owned());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| "is not a MAC address (aa:bb:cc:dd:ee:ff)".to_owned())?;
    }
    if bytes[0] & 1 == 1 {
        return Err("is a multicast address".to_owned());
    }
    if bytes == [0; 6] {
        return Err("is all zeros".to_owned());
    }
    Ok(bytes)
}

/// A random locally administered unicast address under QEMU's customary 52:54 prefix, with 32 random bits (24
/// would collide within a few thousand NICs on one network).
fn generate_mac() -> String {
    let random = Uuid::new_v4();
    let b = random.as_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeFiles(Vec<&'static str>);
    impl HostFiles for FakeFiles {
        fn check_image(&self, path: &Path) -> Result<(), String> {
            if self.0.iter().any(|p| Path::new(p) == path) {
                Ok(())
            } else {
                Err("does not exist".to_owned())
            }
        }
    }

    fn files() -> FakeFiles {
        FakeFiles(vec!["/img/a.raw", "/img/b.qcow2", "/boot/vmlinuz", "/boot/initrd"])
    }

    fn minimal() -> VmSpec {
        VmSpec::from_text("name: web1\ndisks:\n  - path: /img/a.raw\n").unwrap()
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec = minimal();
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.memory_mib, 512);
        assert_eq!(spec.machine, "q35");
        assert!(spec.serial);
        assert_eq!(spec.disks[0].format, DiskFormat::Raw);
        assert_eq!(spec.disks[0].cache, CacheMode::None);
        spec.validate(&files()).unwrap();
    }

    #[test]
    fn json_specs_parse_too() {
        let spec = VmSpec::from_text(r#"{"name":"a","kernel":{"kernel":"/boot/vmlinuz"},"memory_mib":128}"#).unwrap();
        assert_eq!(spec.memory_mib, 128);
        spec.validate(&files()).unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = VmSpec::from_text("name: a\nmemroy_mib: 5\n").unwrap_err().to_string();
        assert!(err.contains("memroy_mib"), "{err}");
        let err = VmSpec::from_text("name: a\ndisks:\n - path: /x\n   formt: raw\n").unwrap_err().to_string();
        assert!(err.contains("formt"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_field_and_value() {
        let mut spec = minimal();
        spec.name = "../etc".into();
        spec.vcpus = 0;
        spec.memory_mib = 0;
        spec.machine = "virt".into();
        spec.disks.push(DiskSpec { path: Some("/img/missing.raw".into()), ..spec.disks[0].clone() });
        spec.disks.push(spec.disks[0].clone());
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::User,
            network: None,
            mac: Some("01:00:00:00:00:01".into()),
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        let errors = spec.validate(&files()).unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "vcpus", "memory_mib", "machine", "disks[1].path", "disks[2].path", "nics[0].mac"]);
        let text = errors.to_string();
        assert!(text.contains("memory_mib: \"0\" is below the minimum 16"), "{text}");
        assert!(text.contains("/img/missing.raw\" does not exist"), "{text}");
    }

    #[test]
    fn a_long_cmdline_of_wide_characters_is_refused_not_a_panic() {
        let mut spec = minimal();
        spec.kernel = Some(KernelBoot { kernel: "/boot/vmlinuz".into(), initrd: None, cmdline: "é".repeat(3000) });
        let errors = spec.validate(&files()).unwrap_err();
        assert_eq!(errors.first_field(), "kernel.cmdline");
        assert!(errors.to_string().contains("(6000 bytes) is longer than 4096 bytes"), "{errors}");
    }

    #[test]
    fn names_are_restricted() {
        for bad in ["", "a/b", "..", "a..b", ".hidden", "-x", "tab\there", "sp ace", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "web-01", "db_2.prod"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn nothing_to_boot_is_an_error() {
        let mut spec = minimal();
        spec.disks.clear();
        let errors = spec.validate(&files()).unwrap_err();
        assert_eq!(errors.first_field(), "kernel");
    }

    #[test]
    fn native_aio_needs_direct_io() {
        let mut spec = minimal();
        spec.disks[0].aio = AioMode::Native;
        spec.disks[0].cache = CacheMode::Writeback;
        assert_eq!(spec.validate(&files()).unwrap_err().first_field(), "disks[0].aio");
    }

    #[test]
    fn generated_fields_are_stable_and_valid() {
        let mut spec = minimal();
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::User,
            network: None,
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::Network,
            network: Some("lan".into()),
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.fill_generated();
        let (uuid, mac) = (spec.uuid, spec.nics[0].mac.clone());
        spec.fill_generated();
        assert_eq!((spec.uuid, spec.nics[0].mac.clone()), (uuid, mac.clone()));
        let bytes = parse_mac(&mac.unwrap()).unwrap();
        assert_eq!(bytes[0] & 0b11, 0b10, "locally administered unicast");
        spec.validate(&files()).unwrap();
    }

    #[test]
    fn cloud_init_ethernets_match_their_nic_by_mac() {
        let text = "name: web1\ndisks:\n  - path: /img/a.raw\nnics:\n  - mac: 52:54:00:00:00:0a\n  - mac: 52:54:00:00:00:0b\n\
                    cloud_init:\n  network_config:\n    ethernets:\n      - id: eth0\n        addressing: {kind: dhcp}\n\
                    \x20     - id: lan\n        nic: \"0\"\n        addressing: {kind: dhcp}\n\
                    \x20     - id: byname\n        addressing: {kind: dhcp}\n";
        let mut spec = VmSpec::from_text(text).unwrap();
        spec.validate(&files()).unwrap();
        let files_text = spec.seed_config().unwrap().render().unwrap();
        let net: serde_json::Value = serde_json::from_str(files_text.network_config.as_deref().unwrap()).unwrap();
        let ethernets = &net["ethernets"];
        // By position, by index, and past the last NIC by name as written.
        assert_eq!(ethernets["eth0"]["match"]["macaddress"], "52:54:00:00:00:0a");
        assert_eq!(ethernets["eth0"]["set-name"], "eth0");
        assert_eq!(ethernets["lan"]["match"]["macaddress"], "52:54:00:00:00:0a");
        assert_eq!(ethernets["byname"].get("match"), None, "{net}");
        // By the NIC's id.
        spec.nics[1].id = Some("uplink".into());
        spec.cloud_init.as_mut().unwrap().network_config.as_mut().unwrap().ethernets[2].nic = Some("uplink".into());
        spec.validate(&files()).unwrap();
        let files_text = spec.seed_config().unwrap().render().unwrap();
        let net: serde_json::Value = serde_json::from_str(files_text.network_config.as_deref().unwrap()).unwrap();
        assert_eq!(net["ethernets"]["byname"]["match"]["macaddress"], "52:54:00:00:00:0b");

        let ethernets = &mut spec.cloud_init.as_mut().unwrap().network_config.as_mut().unwrap().ethernets;
        ethernets[0].nic = Some("2".into());
        ethernets[1].nic = Some("first".into());
        ethernets[2].nic = Some("1".into());
        ethernets[2].mac = Some("52:54:00:00:00:0b".into());
        let errors = spec.validate(&files()).unwrap_err();
        let text = errors.to_string();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "cloud_init.network_config.ethernets[0].nic",
                "cloud_init.network_config.ethernets[1].nic",
                "cloud_init.network_config.ethernets[2].nic"
            ],
            "{text}"
        );
        assert!(
            text.contains("ethernets[0].nic: \"2\" is neither the id of a NIC of this VM nor an index below 2"),
            "{text}"
        );
        assert!(text.contains("ethernets[2].nic: \"1\" is given with mac"), "{text}");
    }

    #[test]
    fn host_forwards_are_for_user_nics_with_distinct_ports() {
        let mut spec = minimal();
        let forward = |host_port, guest_port| HostForward { host_port, guest_port };
        let nic = |kind, network: Option<&str>, host_forwards| NicSpec {
            id: None,
            kind,
            network: network.map(Into::into),
            mac: None,
            host_forwards,
            security_groups: Vec::new(),
            ipv4: None,
        };
        spec.nics.push(nic(NicKind::User, None, vec![forward(2222, 22), forward(0, 0)]));
        spec.nics.push(nic(NicKind::User, None, vec![forward(2222, 80)]));
        spec.nics.push(nic(NicKind::Network, Some("lan"), vec![forward(8080, 80)]));
        let errors = spec.validate(&files()).unwrap_err();
        let text = errors.to_string();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "nics[0].host_forwards[1].host_port",
                "nics[0].host_forwards[1].guest_port",
                "nics[1].host_forwards[0].host_port",
                "nics[2].host_forwards"
            ],
            "{text}"
        );
        assert!(text.contains("nics[1].host_forwards[0].host_port: \"2222\" is forwarded twice"), "{text}");
        assert!(text.contains("\"tcp:127.0.0.1:8080-:80\" is only for NICs of kind user"), "{text}");
        spec.nics.truncate(1);
        spec.nics[0].host_forwards.truncate(1);
        spec.validate(&files()).unwrap();
    }

    #[test]
    fn security_groups_and_static_addresses_are_for_network_nics() {
        let mut spec = minimal();
        let groups = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::Network,
            network: Some("lan".into()),
            mac: None,
            host_forwards: Vec::new(),
            security_groups: groups(&["web", "", "web"]),
            ipv4: Some("255.255.255.255".parse().unwrap()),
        });
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::User,
            network: None,
            mac: None,
            host_forwards: Vec::new(),
            security_groups: groups(&["web"]),
            ipv4: Some("10.0.0.5".parse().unwrap()),
        });
        let errors = spec.validate(&files()).unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "nics[0].ipv4",
                "nics[0].security_groups[1]",
                "nics[0].security_groups[2]",
                "nics[1].ipv4",
                "nics[1].security_groups[0]"
            ]
        );
        let text = errors.to_string();
        assert!(text.contains("nics[0].security_groups[2]: \"web\" is named twice for this NIC"), "{text}");
        spec.nics.truncate(1);
        spec.nics[0].security_groups.truncate(1);
        spec.nics[0].ipv4 = Some("10.0.0.5".parse().unwrap());
        spec.validate(&files()).unwrap();
    }

    #[test]
    fn disks_name_a_path_or_a_volume() {
        let mut spec = minimal();
        let path_disk = spec.disks[0].clone();
        let volume = |v: &str| DiskSpec { path: None, volume: Some(v.into()), ..path_disk.clone() };
        spec.disks.push(volume("default/data"));
        spec.disks.push(volume("default/data"));
        spec.disks.push(volume("nopool"));
        spec.disks.push(volume("default/../x"));
        spec.disks.push(DiskSpec { volume: Some("default/x".into()), ..path_disk.clone() });
        spec.disks.push(DiskSpec { path: None, ..path_disk.clone() });
        let fields: Vec<String> = spec.validate(&files()).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["disks[2].volume", "disks[3].volume", "disks[4].volume", "disks[5].path", "disks[6]"]);
    }

    #[test]
    fn network_nics_name_a_valid_network() {
        let mut spec = minimal();
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::Network,
            network: None,
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::Network,
            network: Some("bad net".into()),
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::User,
            network: Some("lan".into()),
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        let fields: Vec<String> = spec.validate(&files()).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["nics[0].network", "nics[1].network", "nics[2].network"]);
    }

    #[test]
    fn device_ids_are_checked_and_unique_across_disks_and_nics() {
        let mut spec = minimal();
        spec.disks[0].id = Some("lan".into());
        spec.disks.push(DiskSpec { id: Some("-x".into()), path: Some("/img/b.qcow2".into()), ..spec.disks[0].clone() });
        spec.nics.push(NicSpec {
            id: Some("lan".into()),
            kind: NicKind::User,
            network: None,
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.nics.push(NicSpec {
            id: Some("a b".into()),
            kind: NicKind::User,
            network: None,
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        let errors = spec.validate(&files()).unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["disks[1].id", "nics[0].id", "nics[1].id"]);
        assert!(errors.to_string().contains("nics[0].id: \"lan\" is already used by another disk or NIC"), "{errors}");
    }

    #[test]
    fn missing_device_ids_get_the_lowest_free_name_once() {
        let mut spec = minimal();
        spec.disks.push(DiskSpec { id: Some("disk0".into()), ..spec.disks[0].clone() });
        spec.disks[0].path = Some("/img/b.qcow2".into());
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::User,
            network: None,
            mac: None,
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.fill_generated();
        let ids: Vec<_> = spec.disks.iter().map(|d| d.id.clone().unwrap()).collect();
        assert_eq!(ids, ["disk1", "disk0"]);
        assert_eq!(spec.nics[0].id.as_deref(), Some("nic0"));
        let before = spec.clone();
        spec.fill_generated();
        assert_eq!(spec, before);
        spec.validate(&files()).unwrap();
    }

    #[test]
    fn the_machine_shape_is_checked_and_pinned() {
        let mut spec = minimal();
        spec.vcpus = 4;
        spec.max_vcpus = Some(2);
        spec.memory_mib = 1024;
        spec.max_memory_mib = Some(512);
        spec.cpu = Some("Sky lake".into());
        let errors = spec.validate(&files()).unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["max_vcpus", "max_memory_mib", "cpu"]);
        assert!(errors.to_string().contains("max_vcpus: \"2\" is below vcpus (4)"), "{errors}");
        spec.max_vcpus = Some(8);
        spec.max_memory_mib = None;
        spec.cpu = None;
        spec.validate(&files()).unwrap();
        assert_eq!((spec.max_vcpus(), spec.max_memory_mib()), (8, 1024));

        let caps = crate::machine::QemuCaps::parse(
            "Supported machines are:\nq35  Standard PC (alias of pc-q35-7.2)\npc-q35-7.2  Standard PC\n",
            "Available CPUs:\nx86 qemu64  QEMU\nx86 x86-64-v2-AES  x\n",
        );
        spec.pin_shape(&caps);
        assert_eq!((spec.machine.as_str(), spec.cpu.as_deref()), ("pc-q35-7.2", Some("x86-64-v2-AES")));
        spec.validate_shape(&caps).unwrap();
        spec.cpu = Some("Skylake-Client".into());
        spec.machine = "pc-q35-9.9".into();
        let fields: Vec<String> = spec.validate_shape(&caps).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["machine", "cpu"]);
    }

    #[test]
    fn absurd_values_are_refused() {
        let mut spec = minimal();
        spec.memory_mib = u64::MAX;
        spec.vcpus = 10_000;
        spec.vnc_display = Some(5000);
        let fields: Vec<String> = spec.validate(&files()).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["vcpus", "memory_mib", "vnc_display"]);
    }
}
