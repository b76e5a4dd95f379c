//! Between wire types (`qx_proto`) and domain types (`qx_vmm`), both ways. Wire values the domain has no word for
//! are refused here, naming the field, before anything reaches a VM.

use std::collections::BTreeMap;

use qx_proto::node::v1 as pb;
use qx_vmm::spec::{
    AccelChoice, AioMode, CacheMode, DiskFormat, DiskSpec, FieldError, Firmware, KernelBoot, NicKind, NicSpec,
};
use qx_vmm::{ValidationErrors, VmEvent, VmInfo, VmSpec, VmState};

use crate::network::{NetworkSpec, NicStatus};
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
    let firmware = p.choice("firmware".into(), &spec.firmware, |v| (v == "seabios").then_some(Firmware::Seabios));
    let disks = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, disk)| DiskSpec {
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
            kind: p.choice(format!("nics[{i}].kind"), &nic.kind, |v| match v {
                "user" => Some(NicKind::User),
                "network" => Some(NicKind::Network),
                _ => None,
            }),
            network: (!nic.network.is_empty()).then(|| nic.network.clone()),
            mac: (!nic.mac.is_empty()).then(|| nic.mac.clone()),
        })
        .collect();
    let machine = if spec.machine.is_empty() { "q35".to_owned() } else { spec.machine };
    if !p.0.is_empty() {
        return Err(ValidationErrors(p.0));
    }
    Ok(VmSpec {
        name: spec.name,
        uuid,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        machine,
        accelerator,
        firmware,
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
    })
}

pub fn spec_to_pb(spec: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: spec.name.clone(),
        uuid: spec.uuid.map(|u| u.to_string()).unwrap_or_default(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        machine: spec.machine.clone(),
        accelerator: spec.accelerator.to_string(),
        firmware: spec.firmware.to_string(),
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
            })
            .collect(),
        nics: spec
            .nics
            .iter()
            .map(|n| pb::Nic {
                kind: n.kind.to_string(),
                mac: n.mac.clone().unwrap_or_default(),
                network: n.network.clone().unwrap_or_default(),
            })
            .collect(),
        serial: Some(spec.serial),
        vnc_display: spec.vnc_display,
        labels: spec.labels.clone().into_iter().collect(),
    }
}

pub fn network_to_pb(network: &NetworkSpec) -> pb::Network {
    pb::Network {
        name: network.name.clone(),
        bridge: network.bridge.clone(),
        vlan: network.vlan.map(u32::from),
        mtu: network.mtu,
    }
}

/// VLANs too large for 16 bits become `u16::MAX`, which validation refuses by name like any other bad VLAN.
pub fn network_from_pb(network: pb::Network) -> NetworkSpec {
    NetworkSpec {
        name: network.name,
        bridge: network.bridge,
        vlan: network.vlan.map(|vlan| u16::try_from(vlan).unwrap_or(u16::MAX)),
        mtu: network.mtu,
    }
}

pub fn nic_status_to_pb(nic: &NicStatus) -> pb::NicStatus {
    pb::NicStatus {
        index: nic.index as u32,
        network: nic.network.clone(),
        tap: nic.tap.clone(),
        ofport: nic.ofport.unwrap_or(0),
    }
}

pub fn volume_to_pb(pool: &str, volume: &qx_storage::Volume) -> pb::Volume {
    pb::Volume {
        pool: pool.to_owned(),
        name: volume.name.clone(),
        format: match volume.format {
            qx_storage::ImageFormat::Raw => pb::DiskFormat::Raw,
            qx_storage::ImageFormat::Qcow2 => pb::DiskFormat::Qcow2,
        } as i32,
        capacity_bytes: volume.capacity,
        allocated_bytes: volume.allocated,
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
        }),
    }
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
        data_dir: info.data_dir,
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
                    nics:\n  - mac: 52:54:00:00:00:01\nserial: false\nvnc_display: 3\nlabels:\n  env: prod\n";
        let spec = VmSpec::from_text(text).unwrap();
        assert_eq!(spec_from_pb(spec_to_pb(&spec)).unwrap(), spec);
    }

    #[test]
    fn unknown_wire_values_name_their_field() {
        let spec = pb::VmSpec {
            name: "a".into(),
            uuid: "not-a-uuid".into(),
            accelerator: "hvf".into(),
            disks: vec![pb::Disk { path: "/d".into(), format: 9, cache: "sometimes".into(), ..Default::default() }],
            ..Default::default()
        };
        let fields: Vec<String> = spec_from_pb(spec).unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["uuid", "accelerator", "disks[0].format", "disks[0].cache"]);
    }

    #[test]
    fn text_errors_are_reported_on_spec_text() {
        let err = spec_from_request(None, "name: a\nbogus: 1\n").unwrap_err();
        assert_eq!(err.first_field(), "spec_text");
        assert!(err.to_string().contains("bogus"));
    }
}
