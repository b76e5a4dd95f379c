//! Between wire types (`qx_proto`) and domain types (`qx_vmm`), both ways. Wire values the domain has no word for
//! are refused here, naming the field, before anything reaches a VM.

use std::collections::BTreeMap;

use qx_proto::node::v1 as pb;
use qx_storage::cloudinit::{Addressing, Ethernet, NetworkConfig, RunCmd, User, UserData};
use qx_storage::{
    CopyPlan, CreateVolume, FromImage, Image, ImageFormat, ImageKind, ImportImage, PoolKind, PoolStats, Preallocation,
    Volume, VolumeOrigin, VolumeSource,
};
use qx_vmm::spec::CloudInit;
use qx_vmm::spec::{
    AccelChoice, AioMode, CacheMode, CpuList, DiskFormat, DiskSpec, FieldError, Firmware, HostForward, KernelBoot,
    NicKind, NicSpec, Placement,
};
use qx_vmm::{ValidationErrors, VmEvent, VmInfo, VmSpec, VmState};

use crate::network::{NetworkKind, NetworkSpec, NicStatus};
use crate::node::NodeInfo;

/// Collects conversion problems so that every bad field is reported at once.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: String, value: &str, problem: &str) {
        self.0.push(FieldError { field, value: value.to_owned(), problem: problem.to_owned() });
    }

    fn choice<T: Default>(&mut self, field: String, value: &str, parse: impl Fn(&str) -> Option<T>) -> T {
        if value.is_empty() {
            return T::default();
        }
        parse(value).unwrap_or_else(|| {
            self.add(field, value, "is not one of the accepted values");
            T::default()
        })
    }
}

/// One disk of a hotplug request; field errors are named `disk.<field>`.
pub fn disk_from_pb(disk: pb::Disk) -> Result<DiskSpec, ValidationErrors> {
    let spec = pb::VmSpec { disks: vec![disk], ..Default::default() };
    let mut spec = spec_from_pb(spec).map_err(|e| rename(e, "disks[0]", "disk"))?;
    Ok(spec.disks.remove(0))
}

/// One NIC of a hotplug request; field errors are named `nic.<field>`.
pub fn nic_from_pb(nic: pb::Nic) -> Result<NicSpec, ValidationErrors> {
    let spec = pb::VmSpec { nics: vec![nic], ..Default::default() };
    let mut spec = spec_from_pb(spec).map_err(|e| rename(e, "nics[0]", "nic"))?;
    Ok(spec.nics.remove(0))
}

fn rename(ValidationErrors(mut errors): ValidationErrors, from: &str, to: &str) -> ValidationErrors {
    for error in &mut errors {
        error.field = error.field.replacen(from, to, 1);
    }
    ValidationErrors(errors)
}

/// A spec given either as a message or as YAML/JSON text.
pub fn spec_from_request(spec: Option<pb::VmSpec>, text: &str) -> Result<VmSpec, ValidationErrors> {
    if !text.is_empty() {
        return VmSpec::from_text(text)
            .map_err(|e| ValidationErrors::one("spec_text", "", format!("is not a valid spec: {e}")));
    }
    let spec = spec.ok_or_else(|| ValidationErrors::one("spec", "", "is required (or spec_text)"))?;
    spec_from_pb(spec)
}

fn spec_from_pb(spec: pb::VmSpec) -> Result<VmSpec, ValidationErrors> {
    let mut p = Problems::default();
    let uuid = match spec.uuid.as_str() {
        "" => None,
        text => match uuid::Uuid::parse_str(text) {
            Ok(uuid) => Some(uuid),
            Err(_) => {
                p.add("uuid".into(), text, "is not a UUID");
                None
            }
        },
    };
    let accelerator = p.choice("accelerator".into(), &spec.accelerator, |v| match v {
        "auto" => Some(AccelChoice::Auto),
        "kvm" => Some(AccelChoice::Kvm),
        "tcg" => Some(AccelChoice::Tcg),
        _ => None,
    });
    let firmware = p.choice("firmware".into(), &spec.firmware, |v| match v {
        "seabios" => Some(Firmware::Seabios),
        "uefi" => Some(Firmware::Uefi),
        _ => None,
    });
    let placement = spec.placement.as_ref().map_or_else(Placement::default, |pl| {
        let mut cpus = |field: String, text: &str| match text.parse::<CpuList>() {
            Ok(cpus) => Some(cpus),
            Err(e) => {
                p.add(field, text, &format!("{}; expected CPU numbers and ranges such as 0-3,8", e.reason));
                None
            }
        };
        let vcpu_cpus =
            pl.vcpu_cpus.iter().enumerate().filter_map(|(i, c)| cpus(format!("placement.vcpu_cpus[{i}]"), c)).collect();
        let emulator_cpus =
            (!pl.emulator_cpus.is_empty()).then(|| cpus("placement.emulator_cpus".into(), &pl.emulator_cpus)).flatten();
        Placement { vcpu_cpus, emulator_cpus }
    });
    let disks = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, disk)| DiskSpec {
            id: (!disk.id.is_empty()).then(|| disk.id.clone()),
            path: (!disk.path.is_empty()).then(|| disk.path.clone().into()),
            volume: (!disk.volume.is_empty()).then(|| disk.volume.clone()),
            format: match pb::DiskFormat::try_from(disk.format) {
                Ok(pb::DiskFormat::Qcow2) => DiskFormat::Qcow2,
                Ok(_) => DiskFormat::Raw,
                Err(_) => {
                    p.add(format!("disks[{i}].format"), &disk.format.to_string(), "is not a known disk format");
                    DiskFormat::Raw
                }
            },
            read_only: disk.read_only,
            cache: p.choice(format!("disks[{i}].cache"), &disk.cache, |v| match v {
                "none" => Some(CacheMode::None),
                "writeback" => Some(CacheMode::Writeback),
                "writethrough" => Some(CacheMode::Writethrough),
                "directsync" => Some(CacheMode::Directsync),
                "unsafe" => Some(CacheMode::Unsafe),
                _ => None,
            }),
            aio: p.choice(format!("disks[{i}].aio"), &disk.aio, |v| match v {
                "threads" => Some(AioMode::Threads),
                "native" => Some(AioMode::Native),
                "io_uring" => Some(AioMode::IoUring),
                _ => None,
            }),
        })
        .collect();
    let nics = spec
        .nics
        .iter()
        .enumerate()
        .map(|(i, nic)| NicSpec {
            id: (!nic.id.is_empty()).then(|| nic.id.clone()),
            kind: p.choice(format!("nics[{i}].kind"), &nic.kind, |v| match v {
                "user" => Some(NicKind::User),
                "network" => Some(NicKind::Network),
                _ => None,
            }),
            network: (!nic.network.is_empty()).then(|| nic.network.clone()),
            mac: (!nic.mac.is_empty()).then(|| nic.mac.clone()),
            host_forwards: nic
                .host_forwards
                .iter()
                .enumerate()
                .map(|(k, f)| {
                    let mut port = |name: &str, value: u32| {
                        u16::try_from(value).unwrap_or_else(|_| {
                            p.add(format!("nics[{i}].host_forwards[{k}].{name}"), &value.to_string(), "is above 65535");
                            0
                        })
                    };
                    HostForward {
                        host_port: port("host_port", f.host_port),
                        guest_port: port("guest_port", f.guest_port),
                    }
                })
                .collect(),
            security_groups: nic.security_groups.clone(),
            ipv4: (!nic.ipv4.is_empty())
                .then(|| match nic.ipv4.parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        p.add(format!("nics[{i}].ipv4"), &nic.ipv4, "is not an IPv4 address");
                        None
                    }
                })
                .flatten(),
        })
        .collect();
    let machine = if spec.machine.is_empty() { "q35".to_owned() } else { spec.machine };
    let cloud_init = spec.cloud_init.map(|c| cloud_init_from_pb(c, &mut p));
    if !p.0.is_empty() {
        return Err(ValidationErrors(p.0));
    }
    Ok(VmSpec {
        name: spec.name,
        uuid,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        max_vcpus: spec.max_vcpus,
        max_memory_mib: spec.max_memory_mib,
        machine,
        cpu: (!spec.cpu.is_empty()).then_some(spec.cpu),
        accelerator,
        firmware,
        secure_boot: spec.secure_boot,
        tpm: spec.tpm,
        placement,
        kernel: spec.kernel_boot.map(|k| KernelBoot {
            kernel: k.kernel.into(),
            initrd: (!k.initrd.is_empty()).then(|| k.initrd.into()),
            cmdline: k.cmdline,
        }),
        disks,
        nics,
        serial: spec.serial.unwrap_or(true),
        vnc_display: spec.vnc_display,
        labels: spec.labels.into_iter().collect::<BTreeMap<_, _>>(),
        cloud_init,
    })
}

pub fn spec_to_pb(spec: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: spec.name.clone(),
        uuid: spec.uuid.map(|u| u.to_string()).unwrap_or_default(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        machine: spec.machine.clone(),
        cpu: spec.cpu.clone().unwrap_or_default(),
        max_vcpus: spec.max_vcpus,
        max_memory_mib: spec.max_memory_mib,
        accelerator: spec.accelerator.to_string(),
        firmware: spec.firmware.to_string(),
        secure_boot: spec.secure_boot,
        tpm: spec.tpm,
        placement: (!spec.placement.is_unset()).then(|| pb::Placement {
            vcpu_cpus: spec.placement.vcpu_cpus.iter().map(ToString::to_string).collect(),
            emulator_cpus: spec.placement.emulator_cpus.as_ref().map(ToString::to_string).unwrap_or_default(),
        }),
        kernel_boot: spec.kernel.as_ref().map(|k| pb::KernelBoot {
            kernel: k.kernel.display().to_string(),
            initrd: k.initrd.as_ref().map(|i| i.display().to_string()).unwrap_or_default(),
            cmdline: k.cmdline.clone(),
        }),
        disks: spec
            .disks
            .iter()
            .map(|d| pb::Disk {
                path: d.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                volume: d.volume.clone().unwrap_or_default(),
                format: match d.format {
                    DiskFormat::Raw => pb::DiskFormat::Raw,
                    DiskFormat::Qcow2 => pb::DiskFormat::Qcow2,
                } as i32,
                read_only: d.read_only,
                cache: d.cache.to_string(),
                aio: d.aio.to_string(),
                id: d.id.clone().unwrap_or_default(),
            })
            .collect(),
        nics: spec
            .nics
            .iter()
            .map(|n| pb::Nic {
                kind: n.kind.to_string(),
                mac: n.mac.clone().unwrap_or_default(),
                network: n.network.clone().unwrap_or_default(),
                id: n.id.clone().unwrap_or_default(),
                host_forwards: n
                    .host_forwards
                    .iter()
                    .map(|f| pb::HostForward { host_port: f.host_port.into(), guest_port: f.guest_port.into() })
                    .collect(),
                security_groups: n.security_groups.clone(),
                ipv4: n.ipv4.map(|ip| ip.to_string()).unwrap_or_default(),
            })
            .collect(),
        serial: Some(spec.serial),
        vnc_display: spec.vnc_display,
        labels: spec.labels.clone().into_iter().collect(),
        cloud_init: spec.cloud_init.as_ref().map(cloud_init_to_pb),
    }
}

pub fn network_to_pb(network: &NetworkSpec) -> pb::Network {
    pb::Network {
        name: network.name.clone(),
        bridge: network.bridge.clone(),
        vlan: network.vlan.map(u32::from),
        mtu: network.mtu,
        kind: network.kind.as_str().to_owned(),
        logical_switch: network.logical_switch.clone().unwrap_or_default(),
        subnet: network.subnet.map(|s| s.to_string()).unwrap_or_default(),
        gateway: network.gateway.map(|g| g.to_string()).unwrap_or_default(),
        dns_servers: network.dns_servers.iter().map(ToString::to_string).collect(),
        dhcp: (network.kind == NetworkKind::Ovn).then_some(network.dhcp),
    }
}

/// VLANs too large for 16 bits become `u16::MAX`, which validation refuses by name like any other bad VLAN; text
/// that does not parse (kind, subnet, addresses) is refused here, every field at once.
pub fn network_from_pb(network: pb::Network) -> Result<NetworkSpec, ValidationErrors> {
    let mut p = Problems::default();
    let kind = p.choice("kind".to_owned(), &network.kind, |v| match v {
        "" | "ovs" => Some(NetworkKind::Ovs),
        "ovn" => Some(NetworkKind::Ovn),
        _ => None,
    });
    let subnet = (!network.subnet.is_empty())
        .then(|| match network.subnet.parse::<qx_net::ovn::Ipv4Cidr>() {
            Ok(subnet) => Some(subnet),
            Err(problem) => {
                p.add("subnet".into(), &network.subnet, &problem);
                None
            }
        })
        .flatten();
    let mut address = |field: String, text: &str| match text.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            p.add(field, text, "is not an IPv4 address");
            None
        }
    };
    let gateway = (!network.gateway.is_empty()).then(|| address("gateway".into(), &network.gateway)).flatten();
    let dns_servers =
        network.dns_servers.iter().enumerate().filter_map(|(i, t)| address(format!("dns_servers[{i}]"), t)).collect();
    if !p.0.is_empty() {
        return Err(ValidationErrors(p.0));
    }
    Ok(NetworkSpec {
        name: network.name,
        kind,
        bridge: network.bridge,
        vlan: network.vlan.map(|vlan| u16::try_from(vlan).unwrap_or(u16::MAX)),
        mtu: network.mtu,
        logical_switch: (!network.logical_switch.is_empty()).then_some(network.logical_switch),
        subnet,
        gateway,
        dns_servers,
        dhcp: network.dhcp.unwrap_or(true),
    })
}

pub fn nic_status_to_pb(nic: &NicStatus) -> pb::NicStatus {
    pb::NicStatus {
        index: nic.index as u32,
        network: nic.network.clone(),
        tap: nic.tap.clone(),
        ofport: nic.ofport.unwrap_or(0),
        id: nic.id.clone(),
        iface_id: nic.iface_id.clone(),
        ipv4: nic.ipv4.map(|ip| ip.to_string()).unwrap_or_default(),
        up: nic.up,
    }
}

pub fn format_to_pb(format: ImageFormat) -> pb::DiskFormat {
    match format {
        ImageFormat::Raw => pb::DiskFormat::Raw,
        ImageFormat::Qcow2 => pb::DiskFormat::Qcow2,
    }
}

pub fn volume_to_pb(pool: &str, volume: &Volume) -> pb::Volume {
    let (origin, origin_name) = match &volume.origin {
        VolumeOrigin::Empty => ("empty", ""),
        VolumeOrigin::Overlay { image } => ("overlay", image.as_str()),
        VolumeOrigin::Copy { image } => ("copy", image.as_str()),
        VolumeOrigin::Clone { volume } => ("clone", volume.as_str()),
    };
    pb::Volume {
        pool: pool.to_owned(),
        name: volume.name.clone(),
        format: format_to_pb(volume.format) as i32,
        capacity_bytes: volume.capacity,
        allocated_bytes: volume.allocated,
        origin: origin.to_owned(),
        origin_name: origin_name.to_owned(),
        backing_image: volume.backing_image.clone().unwrap_or_default(),
        created_unix: volume.created_unix as i64,
    }
}

pub fn image_to_pb(pool: &str, image: &Image) -> pb::Image {
    pb::Image {
        pool: pool.to_owned(),
        name: image.name.clone(),
        kind: match image.kind {
            ImageKind::Iso => pb::ImageKind::Iso,
            ImageKind::CloudImage => pb::ImageKind::CloudImage,
            ImageKind::Template => pb::ImageKind::Template,
        } as i32,
        format: format_to_pb(image.format) as i32,
        virtual_size_bytes: image.virtual_size,
        file_size_bytes: image.file_size,
        sha256: image.sha256.map(|d| d.to_string()).unwrap_or_default(),
        created_unix: image.created_unix as i64,
    }
}

/// A pool as GetPool answers it; `copy` is how copies into it move data (None: not measured yet).
pub fn pool_to_pb(name: &str, kind: PoolKind, stats: &PoolStats, copy: Option<&CopyPlan>) -> pb::Pool {
    pb::Pool {
        name: name.to_owned(),
        kind: match kind {
            PoolKind::Dir => "dir",
            _ => "other",
        }
        .to_owned(),
        capacity_bytes: stats.capacity,
        available_bytes: stats.available,
        allocated_bytes: stats.allocated,
        volumes: stats.volumes as u32,
        images: stats.images as u32,
        copy_method: copy.map_or_else(|| "not measured yet".to_owned(), CopyPlan::summary),
        copy_method_reason: copy.map_or_else(
            || "measured at the pool's first copy, import or clone".to_owned(),
            |plan| plan.reason.clone(),
        ),
    }
}

/// A CreateVolume request as the pool takes it. Sizes and names are checked by the pool, which names the fields.
pub fn create_volume_from_pb(request: pb::CreateVolumeRequest) -> Result<CreateVolume, ValidationErrors> {
    let source = if request.image.is_empty() {
        let format = match pb::DiskFormat::try_from(request.format) {
            Ok(pb::DiskFormat::Raw) => ImageFormat::Raw,
            Ok(_) => ImageFormat::Qcow2,
            Err(_) => return Err(ValidationErrors::one("format", request.format, "is not a known disk format")),
        };
        VolumeSource::Empty { size: request.size_bytes, format, preallocation: Preallocation::Off }
    } else {
        let mode = match pb::FromImage::try_from(request.from_image) {
            Ok(pb::FromImage::Copy) => FromImage::Copy,
            Ok(_) => FromImage::Overlay,
            Err(_) => return Err(ValidationErrors::one("from_image", request.from_image, "is not overlay or copy")),
        };
        let size = (request.size_bytes != 0).then_some(request.size_bytes);
        VolumeSource::Image { image: request.image, mode, size }
    };
    Ok(CreateVolume { name: request.name, source })
}

pub fn import_image_from_pb(request: pb::ImportImageRequest) -> Result<ImportImage, ValidationErrors> {
    let mut p = Problems::default();
    let kind = match pb::ImageKind::try_from(request.kind) {
        Ok(pb::ImageKind::Iso) => ImageKind::Iso,
        Ok(pb::ImageKind::CloudImage) => ImageKind::CloudImage,
        Ok(pb::ImageKind::Template) => ImageKind::Template,
        _ => {
            p.add("kind".into(), &request.kind.to_string(), "is not one of iso, cloud-image, template");
            ImageKind::Template
        }
    };
    let format = match pb::DiskFormat::try_from(request.format) {
        Ok(pb::DiskFormat::Raw) => Some(ImageFormat::Raw),
        Ok(pb::DiskFormat::Qcow2) => Some(ImageFormat::Qcow2),
        Ok(pb::DiskFormat::Unspecified) => None,
        Err(_) => {
            p.add("format".into(), &request.format.to_string(), "is not a known disk format");
            None
        }
    };
    let sha256 = match request.sha256.as_str() {
        "" => None,
        hex => hex.parse().map_err(|_| p.add("sha256".into(), hex, "is not 64 hex digits")).ok(),
    };
    if !p.0.is_empty() {
        return Err(ValidationErrors(p.0));
    }
    Ok(ImportImage {
        name: request.name,
        kind,
        source: request.source_path.into(),
        format,
        size: request.size_bytes,
        sha256,
    })
}

/// Addresses that do not parse are reported here; everything else is checked by `VmSpec::validate`.
fn cloud_init_from_pb(c: pb::CloudInit, p: &mut Problems) -> CloudInit {
    let some = |s: String| (!s.is_empty()).then_some(s);
    let users = c
        .users
        .into_iter()
        .map(|u| User {
            name: u.name,
            ssh_authorized_keys: u.ssh_authorized_keys,
            password_hash: some(u.password_hash),
            sudo: some(u.sudo),
            groups: u.groups,
            shell: some(u.shell),
        })
        .collect();
    let runcmd =
        c.runcmd.into_iter().map(|r| if r.argv.is_empty() { RunCmd::Shell(r.shell) } else { RunCmd::Argv(r.argv) });
    let ethernets: Vec<Ethernet> = c
        .ethernets
        .into_iter()
        .enumerate()
        .map(|(i, e)| Ethernet {
            id: e.id,
            mac: some(e.mac),
            nic: some(e.nic),
            mtu: (e.mtu != 0).then_some(e.mtu),
            addressing: if e.addresses.is_empty() {
                Addressing::Dhcp { dhcp4: true, dhcp6: false }
            } else {
                let field = |name: &str| format!("cloud_init.ethernets[{i}].{name}");
                let gateway4 = match e.gateway4.as_str() {
                    "" => None,
                    text => text.parse().map_err(|_| p.add(field("gateway4"), text, "is not an IPv4 address")).ok(),
                };
                let mut nameservers = Vec::new();
                for (n, text) in e.nameservers.iter().enumerate() {
                    match text.parse() {
                        Ok(address) => nameservers.push(address),
                        Err(_) => p.add(field(&format!("nameservers[{n}]")), text, "is not an IP address"),
                    }
                }
                Addressing::Static { addresses: e.addresses, gateway4, gateway6: None, nameservers, search: e.search }
            },
        })
        .collect();
    CloudInit {
        user_data: UserData {
            hostname: some(c.hostname),
            default_user: c.default_user,
            users,
            ssh_pwauth: c.ssh_pwauth,
            packages: c.packages,
            runcmd: runcmd.collect(),
        },
        network_config: (!ethernets.is_empty()).then_some(NetworkConfig { ethernets }),
    }
}

fn cloud_init_to_pb(c: &CloudInit) -> pb::CloudInit {
    let u = &c.user_data;
    pb::CloudInit {
        hostname: u.hostname.clone().unwrap_or_default(),
        default_user: u.default_user,
        users: u
            .users
            .iter()
            .map(|user| pb::CloudInitUser {
                name: user.name.clone(),
                ssh_authorized_keys: user.ssh_authorized_keys.clone(),
                password_hash: user.password_hash.clone().unwrap_or_default(),
                sudo: user.sudo.clone().unwrap_or_default(),
                groups: user.groups.clone(),
                shell: user.shell.clone().unwrap_or_default(),
            })
            .collect(),
        ssh_pwauth: u.ssh_pwauth,
        packages: u.packages.clone(),
        runcmd: u
            .runcmd
            .iter()
            .map(|r| match r {
                RunCmd::Shell(line) => pb::RunCommand { shell: line.clone(), argv: Vec::new() },
                RunCmd::Argv(argv) => pb::RunCommand { shell: String::new(), argv: argv.clone() },
            })
            .collect(),
        ethernets: c
            .network_config
            .iter()
            .flat_map(|n| &n.ethernets)
            .map(|e| {
                let mut pb_eth = pb::CloudInitEthernet {
                    id: e.id.clone(),
                    mac: e.mac.clone().unwrap_or_default(),
                    nic: e.nic.clone().unwrap_or_default(),
                    mtu: e.mtu.unwrap_or(0),
                    ..Default::default()
                };
                if let Addressing::Static { addresses, gateway4, nameservers, search, .. } = &e.addressing {
                    pb_eth.addresses = addresses.clone();
                    pb_eth.gateway4 = gateway4.map(|g| g.to_string()).unwrap_or_default();
                    pb_eth.nameservers = nameservers.iter().map(ToString::to_string).collect();
                    pb_eth.search = search.clone();
                }
                pb_eth
            })
            .collect(),
    }
}

pub fn state_to_pb(state: VmState) -> pb::VmState {
    match state {
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Starting => pb::VmState::Starting,
        VmState::Running => pb::VmState::Running,
        VmState::Paused => pb::VmState::Paused,
        VmState::Stopping => pb::VmState::Stopping,
        VmState::Crashed => pb::VmState::Crashed,
        VmState::Migrating => pb::VmState::Migrating,
        VmState::Incoming => pb::VmState::Incoming,
    }
}

pub fn vm_to_pb(vm: &VmInfo) -> pb::Vm {
    pb::Vm {
        spec: Some(spec_to_pb(&vm.spec)),
        state: state_to_pb(vm.state) as i32,
        runtime: Some(pb::VmRuntime {
            pid: vm.pid.unwrap_or(0) as u32,
            started_at_unix: vm.started_at_unix.unwrap_or(0),
            accelerator: vm.accel.map(|a| a.to_string()).unwrap_or_default(),
            last_reason: vm.reason.clone(),
            nics: Vec::new(),
            guest_agent: vm.agent.as_ref().map(crate::grpc_guest::agent_to_pb),
        }),
        devices: devices_to_pb(&vm.devices),
        root_ports: vm.devices.root_ports,
    }
}

fn devices_to_pb(tree: &qx_vmm::DeviceTree) -> Vec<pb::DeviceSlot> {
    let disks = tree.disks.iter().map(|d| pb::DeviceSlot {
        id: d.id.clone(),
        kind: "disk".into(),
        root_port: d.port.unwrap_or(0),
        qemu_device: d.device.clone(),
    });
    let nics = tree.nics.iter().map(|n| pb::DeviceSlot {
        id: n.id.clone(),
        kind: "nic".into(),
        root_port: n.port.unwrap_or(0),
        qemu_device: n.device.clone(),
    });
    disks.chain(nics).collect()
}

pub fn event_to_pb(event: &VmEvent) -> pb::VmEvent {
    let state = |s: Option<VmState>| s.map_or(pb::VmState::Unspecified, state_to_pb) as i32;
    pb::VmEvent {
        vm: event.vm.clone(),
        state: state(event.state),
        previous: state(event.previous),
        reason: event.reason.clone(),
        at_unix_ms: event.at_unix_ms,
    }
}

pub fn host_devices_to_pb(host: crate::node::HostDevices) -> pb::ListHostDevicesResponse {
    let devices = host
        .devices
        .into_iter()
        .map(|(d, host_use)| pb::HostDevice {
            address: d.address.to_string(),
            vendor_id: d.vendor_id.into(),
            device_id: d.device_id.into(),
            vendor_name: d.vendor_name.clone().unwrap_or_default(),
            device_name: d.device_name.clone().unwrap_or_default(),
            class_code: d.class,
            class_name: d.class_name.clone().unwrap_or_default(),
            driver: d.driver.clone().unwrap_or_default(),
            numa_node: d.numa_node,
            iommu_group: d.iommu_group,
            iommu_group_peers: d.iommu_group_peers.iter().map(ToString::to_string).collect(),
            sriov_total_vfs: d.sriov.as_ref().map_or(0, |s| s.total_vfs),
            sriov_num_vfs: d.sriov.as_ref().map_or(0, |s| s.num_vfs),
            physfn: d.physfn.map(|(pf, _)| pf.to_string()).unwrap_or_default(),
            bridge: d.is_bridge(),
            net_interfaces: d.net_interfaces,
            host_use: host_use.unwrap_or_default(),
        })
        .collect();
    pb::ListHostDevicesResponse { devices, iommu_enabled: host.iommu_enabled }
}

pub fn node_info_to_pb(info: NodeInfo) -> pb::NodeInfo {
    pb::NodeInfo {
        node_name: info.node_name,
        hostname: info.hostname,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        cpu_model: info.cpu_model,
        cpu_count: info.cpu_count,
        memory_total_bytes: info.memory_total_bytes,
        memory_available_bytes: info.memory_available_bytes,
        qemu_binary: info.qemu_binary,
        qemu_version: info.qemu_version,
        accelerator: info.accel.accel.to_string(),
        accelerator_reason: info.accel.reason,
        vms_total: info.vms_total,
        vms_running: info.vms_running,
        warm_pool_ready: info.warm_ready,
        warm_pool_reserved: info.warm_reserved,
        data_dir: info.data_dir,
        system: Some(crate::grpc_update::system_status_to_pb(info.system)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_full_spec() {
        let text = "name: a\nuuid: 6f1e9a43-3b1a-4c57-9d8c-2f6e4b1a7c10\nvcpus: 2\nmemory_mib: 256\nmachine: pc\n\
                    accelerator: tcg\nkernel:\n  kernel: /k\n  initrd: /i\n  cmdline: console=ttyS0\n\
                    disks:\n  - path: /d.qcow2\n    format: qcow2\n    read_only: true\n    cache: writeback\n    aio: io_uring\n\
                    nics:\n  - mac: 52:54:00:00:00:01\n  - kind: network\n    network: t1\n    ipv4: 10.0.0.5\n    \
                    security_groups: [web, db]\nserial: false\nvnc_display: 3\nlabels:\n  env: prod\n";
        let spec = VmSpec::from_text(text).unwrap();
        assert_eq!(spec.nics[1].ipv4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(spec_from_pb(spec_to_pb(&spec)).unwrap(), spec);
    }

    #[test]
    fn unknown_wire_values_name_their_field() {
        let spec = pb::VmSpec {
            name: "a".into(),
            uuid: "not-a-uuid".into(),
            accelerator: "hvf".into(),
            disks: vec![pb::Disk { path: "/d".into(), format: 9, cache: "sometimes".into(), ..Default::default() }],
            nics: vec![pb::Nic {
                kind: "network".into(),
                network: "t1".into(),
                ipv4: "10.0.0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let fields: Vec<String> = spec_from_pb(spec).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["uuid", "accelerator", "disks[0].format", "disks[0].cache", "nics[0].ipv4"]);
    }

    #[test]
    fn text_errors_are_reported_on_spec_text() {
        let err = spec_from_request(None, "name: a\nbogus: 1\n").unwrap_err();
        assert_eq!(err.first_field(), "spec_text");
        assert!(err.to_string().contains("bogus"));
    }
}
