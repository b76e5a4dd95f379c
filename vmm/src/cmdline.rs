//! The QEMU command line, built from a `VmSpec` as a list of arguments (never through a shell).
//!
//! Devices and block nodes are described once, as data: the same description renders as `-device`/`-blockdev`
//! arguments at start and as `device_add`/`blockdev-add` arguments for hotplug.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use qx_devices::firmware::UefiArgs;

use crate::accel::Accel;
use crate::device_tree::{DeviceTree, DiskSlot, NicSlot};
use crate::spec::{AioMode, CacheMode, DiskFormat, DiskSpec, NicKind, NicSpec, VmSpec};

/// The virtio-serial port name qemu-ga opens in the guest.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// DIMM slots of a machine whose memory can grow (`max_memory_mib` above `memory_mib`): each hot-added DIMM
/// takes one, so memory can be grown sixteen times.
pub const MEMORY_SLOTS: u32 = 16;

/// Where the launched QEMU finds what qx-node prepared for it.
#[derive(Debug, Clone)]
pub struct LaunchLayout {
    /// Fd number, in QEMU, of the listening QMP socket qx-node bound.
    pub qmp_fd: RawFd,
    /// Fd number, in QEMU, of the listening serial socket qx-node bound (when the spec has a serial port).
    pub serial_fd: Option<RawFd>,
    /// Fd number, in QEMU, of the listening socket qx-node bound for the guest agent's port (every VM has one).
    pub qga_fd: RawFd,
    pub pidfile: PathBuf,
    /// The cloud-init seed qx-node wrote for this run, when the spec has `cloud_init`.
    pub seed: Option<PathBuf>,
    /// Leave disks and user-mode NICs off the command line: they are plugged over QMP before the vCPUs run.
    pub hotplug: bool,
    /// The flash devices of a `firmware: uefi` VM (its NVRAM copy prepared by the launcher); `None` for SeaBIOS.
    pub uefi: Option<UefiArgs>,
    /// QEMU's arguments for the VM's swtpm (its chardev, backend and `tpm-crb`), when the spec has `tpm`.
    pub tpm: Option<Vec<String>>,
}

/// A guest device: rendered as `-device` at start, or as `device_add` arguments for hotplug.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub driver: String,
    pub id: String,
    /// Properties in command-line order (`bus` first, where there is one).
    pub props: Vec<(String, Value)>,
}

impl Device {
    fn new(driver: &str, id: impl Into<String>) -> Self {
        Self { driver: driver.to_owned(), id: id.into(), props: Vec::new() }
    }

    fn prop(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.props.push((key.to_owned(), value.into()));
        self
    }

    /// The `-device` argument value.
    pub fn to_cli(&self) -> String {
        let mut out = format!("{},id={}", self.driver, keyval_escape(&self.id));
        for (key, value) in &self.props {
            let value = match value {
                Value::String(s) => keyval_escape(s),
                Value::Bool(b) => (if *b { "on" } else { "off" }).to_owned(),
                other => other.to_string(),
            };
            out.push_str(&format!(",{key}={value}"));
        }
        out
    }

    /// The `device_add` arguments.
    pub fn to_qmp(&self) -> Value {
        let mut args = Map::new();
        args.insert("driver".into(), self.driver.clone().into());
        args.insert("id".into(), self.id.clone().into());
        args.extend(self.props.iter().cloned());
        Value::Object(args)
    }
}

/// QEMU's keyval syntax doubles commas inside values.
fn keyval_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The machine's devices and block nodes, in the order QEMU must see them.
///
/// Launch-time hardware (root ports, serial port, display, CD-ROM) is fixed when QEMU starts. Disks and NICs are
/// [`Plug`]s: on the command line for a cold start, or plugged over QMP before the vCPUs first run when a VM takes
/// a pre-launched QEMU from the warm pool. Either way they sit at the same addresses, so the guest sees the same
/// machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hardware {
    /// Launch-time `blockdev-add` arguments (the cloud-init seed), protocol nodes before format nodes.
    pub blockdevs: Vec<Value>,
    /// Launch-time devices.
    pub devices: Vec<Device>,
    /// Disks, in spec order.
    pub disks: Vec<Plug>,
    /// User-mode NICs.
    pub user_nics: Vec<Plug>,
    /// NICs on node networks, always plugged over QMP before the vCPUs run: their taps are handed to QEMU as fds
    /// (`getfd` + `netdev_add`), so they cannot be on the command line.
    pub network_nics: Vec<NetworkNic>,
}

/// A disk or NIC: its backend nodes and its device.
#[derive(Debug, Clone, PartialEq)]
pub struct Plug {
    /// `blockdev-add` arguments, protocol node first.
    pub blockdevs: Vec<Value>,
    /// `netdev_add` arguments.
    pub netdev: Option<Value>,
    pub device: Device,
}

/// A NIC whose backend qx-node creates at start: its place (netdev id, tap slot) and the device to plug.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkNic {
    pub slot: NicSlot,
    pub device: Device,
}

/// The block nodes and device of `disk`, placed at `slot`; `boot` gives it the first boot index.
pub fn disk_plug(disk: &DiskSpec, slot: &DiskSlot, boot: bool) -> Plug {
    let node = slot.node.clone();
    let (direct, no_flush, write_cache) = match disk.cache {
        CacheMode::None => (true, false, true),
        CacheMode::Writeback => (false, false, true),
        CacheMode::Writethrough => (false, false, false),
        CacheMode::Directsync => (true, false, false),
        CacheMode::Unsafe => (false, true, true),
    };
    let aio = match disk.aio {
        AioMode::Threads => "threads",
        AioMode::Native => "native",
        AioMode::IoUring => "io_uring",
    };
    let cache = json!({ "direct": direct, "no-flush": no_flush });
    let format = match disk.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let blockdevs = vec![
        json!({
            // Volumes are resolved to paths before the command line is built (`VmManager::start`).
            "driver": "file", "node-name": slot.file_node(), "filename": disk.path,
            "aio": aio, "cache": cache, "read-only": disk.read_only, "discard": "unmap",
        }),
        json!({
            "driver": format, "node-name": node, "file": slot.file_node(),
            "cache": cache, "read-only": disk.read_only, "discard": "unmap",
        }),
    ];
    let mut dev = Device::new("virtio-blk-pci", slot.device.clone());
    if let Some(port) = slot.port {
        dev = dev.prop("bus", format!("rp{port}"));
    }
    dev = dev.prop("drive", node).prop("write-cache", write_cache);
    if boot {
        dev = dev.prop("bootindex", 1);
    }
    Plug { blockdevs, netdev: None, device: dev }
}

/// The `virtio-net-pci` device of `nic`, placed at `slot`, with `queues` queue pairs.
pub fn nic_device(nic: &NicSpec, slot: &NicSlot, queues: u16) -> Device {
    let mut dev = Device::new("virtio-net-pci", slot.device.clone());
    if let Some(port) = slot.port {
        dev = dev.prop("bus", format!("rp{port}"));
    }
    dev = dev.prop("netdev", slot.netdev.as_str());
    if let Some(mac) = &nic.mac {
        dev = dev.prop("mac", mac.as_str());
    }
    if nic.kind == NicKind::Network && queues > 1 {
        // Each queue pair needs two MSI-X vectors, plus config and control.
        dev = dev.prop("mq", true).prop("vectors", 2 * u32::from(queues) + 2);
    }
    dev
}

/// A user-mode NIC: its netdev and device.
pub fn user_nic_plug(nic: &NicSpec, slot: &NicSlot) -> Plug {
    let mut netdev = json!({ "type": "user", "id": slot.netdev });
    if !nic.host_forwards.is_empty() {
        // QAPI's `['String']`: a list of `{"str": ...}`.
        let rules: Vec<Value> = nic.host_forwards.iter().map(|f| json!({ "str": f.rule() })).collect();
        netdev["hostfwd"] = Value::Array(rules);
    }
    Plug { blockdevs: Vec::new(), netdev: Some(netdev), device: nic_device(nic, slot, 1) }
}

impl Hardware {
    /// Describes the devices `spec` asks for, placed as `tree` says (`tree` describes `spec`'s devices: see
    /// [`DeviceTree::reconcile`]; a device the tree lacks is left out); `seed` is the cloud-init seed image to put
    /// in the CD-ROM drive.
    pub fn from_spec(spec: &VmSpec, tree: &DeviceTree, seed: Option<&Path>) -> Self {
        let mut hw = Hardware::default();
        for port in 1..=tree.root_ports {
            let dev = Device::new("pcie-root-port", format!("rp{port}")).prop("bus", "pcie.0").prop("chassis", port);
            hw.devices.push(dev);
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            let Some(slot) = disk.id.as_deref().and_then(|id| tree.disk(id)) else { continue };
            hw.disks.push(disk_plug(disk, slot, i == 0 && spec.kernel.is_none()));
        }
        for nic in &spec.nics {
            let Some(slot) = nic.id.as_deref().and_then(|id| tree.nic(id)) else { continue };
            match nic.kind {
                NicKind::User => hw.user_nics.push(user_nic_plug(nic, slot)),
                NicKind::Network => {
                    let device = nic_device(nic, slot, crate::network::nic_queues(spec));
                    hw.network_nics.push(NetworkNic { slot: slot.clone(), device });
                }
            }
        }

        if spec.serial {
            hw.devices.push(Device::new("isa-serial", "serial0").prop("chardev", "serial0"));
        }
        if spec.vnc_display.is_some() {
            hw.devices.push(Device::new("VGA", "video0"));
        }
        if let (Some(_), Some(seed)) = (&spec.cloud_init, seed) {
            // A CD-ROM on the machine's built-in IDE/AHCI controller (ide.0 on both pc and q35): where cloud-init
            // and every installer look for a seed, without a PCI slot.
            let ro = json!({ "driver": "file", "node-name": "seed-file", "filename": seed, "read-only": true });
            hw.blockdevs.push(ro);
            hw.blockdevs.push(json!({ "driver": "raw", "node-name": "seed", "file": "seed-file", "read-only": true }));
            hw.devices.push(Device::new("ide-cd", "cdrom0").prop("bus", "ide.0").prop("drive", "seed"));
        }
        // The guest agent's channel, on every VM whether or not its guest runs an agent: qemu-ga finds the port
        // by its name. The controller sits on the root bus after every other PCI device there, so adding it moved
        // no device's address.
        let mut vser = Device::new("virtio-serial-pci", "vser0");
        if tree.root_ports > 0 {
            vser = vser.prop("bus", "pcie.0");
        }
        hw.devices.push(vser);
        let port = Device::new("virtserialport", "qga0").prop("bus", "vser0.0").prop("chardev", "qga");
        hw.devices.push(port.prop("name", QGA_PORT_NAME));
        hw
    }
}

/// Renders a `netdev_add` argument object as a keyval `-netdev` value (`type` first, without its key).
fn netdev_cli(netdev: &Value) -> String {
    let Some(map) = netdev.as_object() else {
        return String::new();
    };
    let mut out = map.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
    for (key, value) in map.iter().filter(|(k, _)| *k != "type") {
        if let Some(list) = value.as_array() {
            // A list of `{"str": ...}` on the command line is the key repeated (`hostfwd=a,hostfwd=b`).
            for item in list {
                let item = item.get("str").and_then(Value::as_str).unwrap_or_default();
                out.push_str(&format!(",{key}={}", keyval_escape(item)));
            }
            continue;
        }
        let value = value.as_str().map_or_else(|| value.to_string(), keyval_escape);
        out.push_str(&format!(",{key}={value}"));
    }
    out
}

/// The full argument list (without the binary) for `spec`, its devices placed as `tree` says, under `accel`.
pub fn qemu_args(spec: &VmSpec, tree: &DeviceTree, accel: Accel, layout: &LaunchLayout) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::with_capacity(64);
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| args.extend(items.iter().map(|i| i.as_ref().to_owned()));

    push(&[&"-name", &format!("guest={},debug-threads=on", keyval_escape(&spec.name))]);
    push(&[&"-uuid", &spec.uuid().to_string()]);
    push(&[&"-nodefaults", &"-no-user-config", &"-S"]);
    let mut machine = spec.machine.clone();
    for property in layout.uefi.iter().flat_map(|uefi| &uefi.machine) {
        machine.push(',');
        machine.push_str(property);
    }
    push(&[&"-machine", &machine]);
    for arg in layout.uefi.iter().flat_map(|uefi| &uefi.args).chain(layout.tpm.iter().flatten()) {
        push(&[arg]);
    }
    push(&[&"-accel", &accel.to_string()]);
    match spec.cpu.as_deref() {
        Some(model) => push(&[&"-cpu", &model]),
        // VMs created before CPU models were pinned keep what they had.
        None if accel == Accel::Kvm => push(&[&"-cpu", &"host"]),
        None => {}
    }
    let mut smp = spec.vcpus.to_string();
    if spec.max_vcpus() > spec.vcpus {
        smp.push_str(&format!(",maxcpus={}", spec.max_vcpus()));
    }
    push(&[&"-smp", &smp]);
    let mut memory = format!("{}M", spec.memory_mib);
    if spec.max_memory_mib() > spec.memory_mib {
        memory.push_str(&format!(",slots={MEMORY_SLOTS},maxmem={}M", spec.max_memory_mib()));
    }
    push(&[&"-m", &memory]);
    push(&[&"-sandbox", &"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    push(&[&"-msg", &"timestamp=on"]);
    match spec.vnc_display {
        Some(display) => push(&[&"-vnc", &format!("127.0.0.1:{display}")]),
        None => push(&[&"-display", &"none"]),
    }
    push(&[&"-chardev", &format!("socket,id=qmp,fd={},server=on,wait=off", layout.qmp_fd)]);
    push(&[&"-mon", &"chardev=qmp,mode=control"]);
    if let Some(fd) = layout.serial_fd {
        push(&[&"-chardev", &format!("socket,id=serial0,fd={fd},server=on,wait=off")]);
    }
    push(&[&"-chardev", &format!("socket,id=qga,fd={},server=on,wait=off", layout.qga_fd)]);
    push(&[&"-pidfile", &layout.pidfile]);
    if let Some(kernel) = &spec.kernel {
        push(&[&"-kernel", &kernel.kernel]);
        if let Some(initrd) = &kernel.initrd {
            push(&[&"-initrd", initrd]);
        }
        if !kernel.cmdline.is_empty() {
            push(&[&"-append", &kernel.cmdline]);
        }
    }

    let hw = Hardware::from_spec(spec, tree, layout.seed.as_deref());
    for blockdev in &hw.blockdevs {
        push(&[&"-blockdev", &blockdev.to_string()]);
    }
    for device in &hw.devices {
        push(&[&"-device", &device.to_cli()]);
    }
    if !layout.hotplug {
        for plug in hw.disks.iter().chain(&hw.user_nics) {
            for blockdev in &plug.blockdevs {
                push(&[&"-blockdev", &blockdev.to_string()]);
            }
            if let Some(netdev) = &plug.netdev {
                push(&[&"-netdev", &netdev_cli(netdev)]);
            }
            push(&[&"-device", &plug.device.to_cli()]);
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, KernelBoot, NicSpec};

    fn spec() -> VmSpec {
        let mut spec = VmSpec::from_text("name: web,1\nuuid: 6f1e9a43-3b1a-4c57-9d8c-2f6e4b1a7c10\n").unwrap();
        spec.disks.push(DiskSpec {
            id: None,
            path: Some("/img/a,b.qcow2".into()),
            volume: None,
            format: DiskFormat::Qcow2,
            read_only: false,
            cache: CacheMode::None,
            aio: AioMode::IoUring,
        });
        spec.nics.push(NicSpec {
            id: None,
            kind: NicKind::User,
            network: None,
            mac: Some("52:54:00:12:34:56".into()),
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        spec.fill_device_ids();
        spec
    }

    fn tree(spec: &VmSpec) -> DeviceTree {
        DeviceTree::new(spec).unwrap()
    }

    fn layout() -> LaunchLayout {
        LaunchLayout {
            qmp_fd: 3,
            serial_fd: Some(4),
            qga_fd: 5,
            pidfile: "/run/vm/qemu.pid".into(),
            seed: None,
            hotplug: false,
            uefi: None,
            tpm: None,
        }
    }

    fn args_of(spec: &VmSpec, accel: Accel) -> Vec<String> {
        qemu_args(spec, &tree(spec), accel, &layout()).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn hardening_and_control_flags_are_always_there() {
        let args = args_of(&spec(), Accel::Tcg);
        for flag in ["-nodefaults", "-no-user-config", "-S"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert!(value_after(&args, "-sandbox")[0].starts_with("on,"));
        assert_eq!(value_after(&args, "-name"), ["guest=web,,1,debug-threads=on"]);
        assert_eq!(value_after(&args, "-accel"), ["tcg"]);
        assert_eq!(value_after(&args, "-pidfile"), ["/run/vm/qemu.pid"]);
        assert_eq!(value_after(&args, "-chardev")[0], "socket,id=qmp,fd=3,server=on,wait=off");
    }

    #[test]
    fn the_pinned_shape_is_on_the_command_line() {
        let mut spec = spec();
        spec.cpu = Some("x86-64-v2-AES".into());
        spec.machine = "pc-q35-7.2".into();
        spec.vcpus = 2;
        spec.max_vcpus = Some(4);
        spec.memory_mib = 512;
        spec.max_memory_mib = Some(2048);
        let args = args_of(&spec, Accel::Kvm);
        assert_eq!(value_after(&args, "-cpu"), ["x86-64-v2-AES"], "a pinned model, also under KVM");
        assert_eq!(value_after(&args, "-machine"), ["pc-q35-7.2"]);
        assert_eq!(value_after(&args, "-smp"), ["2,maxcpus=4"]);
        assert_eq!(value_after(&args, "-m"), ["512M,slots=16,maxmem=2048M"]);
        spec.cpu = Some("host".into());
        assert_eq!(value_after(&args_of(&spec, Accel::Kvm), "-cpu"), ["host"]);
    }

    #[test]
    fn uefi_flash_devices_join_the_machine_and_a_warm_seabios_qemu_never_matches() {
        let uefi = UefiArgs {
            machine: vec!["pflash0=qx-uefi-code".into(), "pflash1=qx-uefi-vars".into()],
            args: vec!["-blockdev".into(), "driver=file,node-name=qx-uefi-code,filename=/c,read-only=on".into()],
        };
        let layout = LaunchLayout { uefi: Some(uefi), ..layout() };
        let args: Vec<String> = qemu_args(&spec(), &tree(&spec()), Accel::Tcg, &layout)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(value_after(&args, "-machine"), ["q35,pflash0=qx-uefi-code,pflash1=qx-uefi-vars"]);
        assert!(
            value_after(&args, "-blockdev").contains(&"driver=file,node-name=qx-uefi-code,filename=/c,read-only=on")
        );
        let mut efi = spec();
        efi.firmware = crate::spec::Firmware::Uefi;
        let key = |s: &VmSpec| crate::warm::launch_key(s, &tree(s), Accel::Tcg);
        assert_ne!(key(&efi), key(&spec()), "a UEFI VM takes no warm SeaBIOS QEMU");
    }

    #[test]
    fn kvm_gets_the_host_cpu_when_no_model_was_pinned() {
        assert_eq!(value_after(&args_of(&spec(), Accel::Kvm), "-cpu"), ["host"]);
        assert!(value_after(&args_of(&spec(), Accel::Tcg), "-cpu").is_empty());
    }

    #[test]
    fn disks_become_blockdev_nodes_and_devices() {
        let args = args_of(&spec(), Accel::Tcg);
        let blockdevs: Vec<Value> =
            value_after(&args, "-blockdev").iter().map(|b| serde_json::from_str(b).unwrap()).collect();
        assert_eq!(blockdevs[0]["filename"], "/img/a,b.qcow2", "JSON needs no comma escaping");
        assert_eq!(blockdevs[0]["aio"], "io_uring");
        assert_eq!(blockdevs[0]["cache"]["direct"], true);
        assert_eq!(blockdevs[1]["driver"], "qcow2");
        assert_eq!(blockdevs[1]["file"], "drive-disk0-file");
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"virtio-blk-pci,id=disk-disk0,bus=rp1,drive=drive-disk0,write-cache=on,bootindex=1"));
        assert!(devices.contains(&"virtio-net-pci,id=nic-nic0,bus=rp2,netdev=netdev-nic0,mac=52:54:00:12:34:56"));
        assert_eq!(value_after(&args, "-netdev"), ["user,id=netdev-nic0"]);
        let ports = devices.iter().filter(|d| d.starts_with("pcie-root-port")).count();
        assert_eq!(ports as u32, crate::device_tree::MIN_ROOT_PORTS, "small machines all get the same ports");
    }

    #[test]
    fn i440fx_puts_devices_on_the_root_bus() {
        let mut spec = spec();
        spec.machine = "pc".into();
        let args = args_of(&spec, Accel::Tcg);
        let devices = value_after(&args, "-device");
        // The guest agent's port sits on its virtio-serial controller's bus, not a PCI one.
        let pci = devices.iter().filter(|d| !d.starts_with("virtserialport"));
        assert!(pci.clone().all(|d| !d.contains("bus=") && !d.starts_with("pcie-root-port")), "{devices:?}");
    }

    #[test]
    fn kernel_boot_takes_no_bootindex() {
        let mut spec = spec();
        spec.kernel =
            Some(KernelBoot { kernel: "/k".into(), initrd: Some("/i".into()), cmdline: "console=ttyS0".into() });
        let args = args_of(&spec, Accel::Tcg);
        assert_eq!(value_after(&args, "-kernel"), ["/k"]);
        assert_eq!(value_after(&args, "-initrd"), ["/i"]);
        assert_eq!(value_after(&args, "-append"), ["console=ttyS0"]);
        assert!(value_after(&args, "-device").iter().all(|d| !d.contains("bootindex")));
    }

    #[test]
    fn hotplug_leaves_disks_and_nics_to_qmp_at_the_same_addresses() {
        let cold = args_of(&spec(), Accel::Tcg);
        let layout = LaunchLayout { hotplug: true, ..layout() };
        let warm: Vec<String> = qemu_args(&spec(), &tree(&spec()), Accel::Tcg, &layout)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(value_after(&warm, "-blockdev").is_empty() && value_after(&warm, "-netdev").is_empty());
        let (cold_devices, warm_devices) = (value_after(&cold, "-device"), value_after(&warm, "-device"));
        assert_eq!(cold_devices[..warm_devices.len()], warm_devices[..], "launch-time devices come first, alike");
        let hw = Hardware::from_spec(&spec(), &tree(&spec()), None);
        let plugged: Vec<String> = hw.disks.iter().chain(&hw.user_nics).map(|p| p.device.to_cli()).collect();
        assert_eq!(cold_devices[warm_devices.len()..], plugged.iter().map(String::as_str).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn a_cloud_init_seed_is_a_read_only_cdrom() {
        let mut spec = spec();
        let none = args_of(&spec, Accel::Tcg);
        assert!(value_after(&none, "-device").iter().all(|d| !d.starts_with("ide-cd")));
        spec.cloud_init = Some(crate::spec::CloudInit::default());
        let layout = LaunchLayout { seed: Some("/vm/seed.img".into()), ..layout() };
        let args: Vec<String> =
            qemu_args(&spec, &tree(&spec), Accel::Tcg, &layout).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert!(value_after(&args, "-device").contains(&"ide-cd,id=cdrom0,bus=ide.0,drive=seed"));
        let blockdevs: Vec<Value> =
            value_after(&args, "-blockdev").iter().map(|b| serde_json::from_str(b).unwrap()).collect();
        let seed: Vec<&Value> =
            blockdevs.iter().filter(|b| b["node-name"].as_str().unwrap().starts_with("seed")).collect();
        assert_eq!(seed[0]["filename"], "/vm/seed.img");
        assert!(seed.iter().all(|b| b["read-only"] == true), "{seed:?}");
    }

    #[test]
    fn device_descriptions_render_for_hotplug_too() {
        let hw = Hardware::from_spec(&spec(), &tree(&spec()), None);
        let nic = &hw.user_nics[0].device;
        assert_eq!(
            nic.to_qmp(),
            json!({"driver": "virtio-net-pci", "id": "nic-nic0", "bus": "rp2", "netdev": "netdev-nic0", "mac": "52:54:00:12:34:56"})
        );
    }

    #[test]
    fn network_nics_are_left_for_qmp_with_their_port_reserved() {
        let mut spec = spec();
        spec.nics.push(NicSpec {
            id: Some("lan0".into()),
            kind: NicKind::Network,
            network: Some("lan".into()),
            mac: Some("52:54:00:00:00:09".into()),
            host_forwards: Vec::new(),
            security_groups: Vec::new(),
            ipv4: None,
        });
        let hw = Hardware::from_spec(&spec, &tree(&spec), None);
        assert_eq!(hw.network_nics.len(), 1);
        let nic = &hw.network_nics[0];
        assert_eq!((nic.slot.id.as_str(), nic.slot.netdev.as_str(), nic.slot.tap), ("lan0", "netdev-lan0", 1));
        assert_eq!(nic.device.to_qmp()["bus"], "rp3");
        assert!(hw.devices.iter().any(|d| d.id == "rp3"), "its root port is on the command line");
        assert!(hw.devices.iter().all(|d| d.id != "nic-lan0"), "the NIC itself is not");
        assert_eq!(hw.user_nics.len(), 1, "only the user-mode NIC has a command-line netdev");
    }

    #[test]
    fn every_vm_has_the_guest_agent_port() {
        let args = args_of(&spec(), Accel::Tcg);
        assert!(value_after(&args, "-chardev").contains(&"socket,id=qga,fd=5,server=on,wait=off"));
        let devices = value_after(&args, "-device");
        for device in [
            "virtio-serial-pci,id=vser0,bus=pcie.0",
            "virtserialport,id=qga0,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0",
        ] {
            assert!(devices.contains(&device), "{device} in {devices:?}");
        }
        // After the root ports: adding the controller moved no device that was there before.
        let last_port = devices.iter().rposition(|d| d.starts_with("pcie-root-port")).unwrap();
        assert!(devices.iter().position(|d| d.starts_with("virtio-serial-pci")).unwrap() > last_port);
        let mut pc = spec();
        pc.machine = "pc".into();
        assert!(value_after(&args_of(&pc, Accel::Tcg), "-device").contains(&"virtio-serial-pci,id=vser0"));
    }

    #[test]
    fn user_nics_forward_loopback_ports() {
        let mut spec = spec();
        spec.nics[0].host_forwards = vec![
            crate::spec::HostForward { host_port: 2222, guest_port: 22 },
            crate::spec::HostForward { host_port: 8080, guest_port: 80 },
        ];
        let args = args_of(&spec, Accel::Tcg);
        assert_eq!(
            value_after(&args, "-netdev"),
            ["user,id=netdev-nic0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80"]
        );
        let hw = Hardware::from_spec(&spec, &tree(&spec), None);
        assert_eq!(
            hw.user_nics[0].netdev.as_ref().unwrap()["hostfwd"],
            json!([{ "str": "tcp:127.0.0.1:2222-:22" }, { "str": "tcp:127.0.0.1:8080-:80" }])
        );
    }

    #[test]
    fn keyval_values_escape_commas() {
        let dev = Device::new("x", "a,b").prop("p", "c,d");
        assert_eq!(dev.to_cli(), "x,id=a,,b,p=c,,d");
    }

    /// Proxmox's cfg2cmd habit: each `testdata/cmdline/<case>.yaml` spec renders exactly `<case>.args` (one
    /// argument a line). Its devices are placed by `<case>.devices.json` when there is one (a stored tree), else as
    /// a new VM's are; `legacy-*` cases are specs from before device ids, placed as `DeviceTree::legacy` upgrades
    /// them. `QX_BLESS=1` rewrites the `.args` files; review the diff.
    #[test]
    fn golden_command_lines() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cmdline");
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        cases.sort();
        assert!(cases.len() >= 3, "golden cases missing in {}", dir.display());
        let bless = std::env::var_os("QX_BLESS").is_some();
        let mut failures = Vec::new();
        for case in cases {
            let name = case.file_stem().unwrap().to_string_lossy().into_owned();
            let mut spec = VmSpec::from_text(&std::fs::read_to_string(&case).unwrap()).unwrap();
            let stored = case.with_extension("devices.json");
            let tree = if stored.exists() {
                serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap()
            } else if name.starts_with("legacy-") {
                spec.fill_device_ids();
                DeviceTree::legacy(&spec)
            } else {
                spec.fill_device_ids();
                DeviceTree::new(&spec).unwrap()
            };
            let accel = if name.contains("kvm") { Accel::Kvm } else { Accel::Tcg };
            let layout = LaunchLayout {
                qmp_fd: 3,
                serial_fd: spec.serial.then_some(4),
                qga_fd: 5,
                pidfile: "/var/lib/quantix/vms/x/qemu.pid".into(),
                seed: spec.cloud_init.is_some().then(|| PathBuf::from("/var/lib/quantix/vms/x/cloud-init-seed.img")),
                hotplug: false,
                uefi: None,
                tpm: None,
            };
            let args = qemu_args(&spec, &tree, accel, &layout);
            let mut text: String = args.iter().map(|a| format!("{}\n", a.to_string_lossy())).collect();
            text.insert_str(0, "# generated by QX_BLESS=1 cargo test -p qx-vmm --lib cmdline::tests::golden\n");
            let expected_path = case.with_extension("args");
            if bless {
                std::fs::write(&expected_path, &text).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
            if expected != text {
                failures.push(format!("{name}: expected {}\n--- got ---\n{text}", expected_path.display()));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
