//! Stable device identity end to end: a VM directory as the version before device ids wrote it loads, is upgraded
//! and boots with the same devices at the same places; ids and root ports show in GetVm and survive updates.

mod common;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::{cmdline_of, test_guest};

/// The `-device` values of a QEMU process.
fn devices_of(pid: u32) -> Vec<String> {
    let args = cmdline_of(pid as i32);
    args.windows(2).filter(|w| w[0] == "-device").map(|w| w[1].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_from_the_previous_version_loads_upgrades_and_boots_the_same_machine() {
    let mut daemon = daemon();
    daemon.kill9();
    let disk = daemon.data_dir().parent().unwrap().join("legacy.raw");
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let guest = test_guest();
    // spec.json and state.json exactly as the previous version wrote them: no ids, no devices.json.
    let spec = serde_json::json!({
        "name": "legacy",
        "uuid": "11111111-2222-4333-8444-555555555555",
        "vcpus": 1,
        "memory_mib": 256,
        "machine": "q35",
        "accelerator": "auto",
        "firmware": "seabios",
        "kernel": { "kernel": guest.kernel, "initrd": guest.initrd, "cmdline": guest.cmdline },
        "disks": [{ "path": disk, "format": "raw", "read_only": false, "cache": "writeback", "aio": "threads" }],
        "nics": [{ "kind": "user", "mac": "52:54:00:11:22:33" }],
        "serial": true
    });
    let dir = daemon.data_dir().join("vms/legacy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spec.json"), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    std::fs::write(dir.join("state.json"), br#"{"state": "stopped", "reason": "stopped: QEMU exited"}"#).unwrap();
    daemon.restart();
    let mut client = client(&daemon).await;

    let vm = get(&mut client, "legacy").await;
    let spec = vm.spec.clone().unwrap();
    assert_eq!((spec.disks[0].id.as_str(), spec.nics[0].id.as_str()), ("disk0", "nic0"));
    assert_eq!(vm.root_ports, 8, "the machine the previous version launched");
    let places: Vec<(&str, u32, &str)> =
        vm.devices.iter().map(|d| (d.id.as_str(), d.root_port, d.qemu_device.as_str())).collect();
    assert_eq!(places, [("disk0", 1, "virtio-disk0"), ("nic0", 2, "nic0")]);
    assert!(dir.join("devices.json").exists(), "the upgrade is written once");
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
    assert_eq!(stored["disks"][0]["id"], "disk0");

    let vm = start(&mut client, "legacy").await;
    let devices = devices_of(pid(&vm));
    // What the previous version put on the command line, argument for argument, plus the guest agent's channel,
    // which every VM has now: on the root bus, it takes no root port and moves no device.
    let legacy: Vec<String> = (1..=8)
        .map(|port| format!("pcie-root-port,id=rp{port},bus=pcie.0,chassis={port}"))
        .chain(["isa-serial,id=serial0,chardev=serial0".to_owned()])
        .chain(["virtio-serial-pci,id=vser0,bus=pcie.0".to_owned()])
        .chain(["virtserialport,id=qga0,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0".to_owned()])
        .chain(["virtio-blk-pci,id=virtio-disk0,bus=rp1,drive=disk0,write-cache=on".to_owned()])
        .chain(["virtio-net-pci,id=nic0,bus=rp2,netdev=net0,mac=52:54:00:11:22:33".to_owned()])
        .collect();
    assert_eq!(devices, legacy);
    let mut console = boot(&mut client, "legacy").await;
    assert_eq!(console.sh("cat /sys/block/vda/size").await, "16384", "the disk is there, 8 MiB");
    let request = pb::StopVmRequest { name: "legacy".into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_ids_are_given_or_generated_and_kept_across_updates() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let root = daemon.data_dir().parent().unwrap().to_owned();
    let (a, b) = (root.join("a.raw"), root.join("b.raw"));
    for path in [&a, &b] {
        std::fs::File::create(path).unwrap().set_len(1 << 20).unwrap();
    }
    let extra = format!(
        "disks:\n  - path: {}\n  - id: data\n    path: {}\nnics:\n  - kind: user\n  - kind: user\n    id: mgmt\n",
        a.display(),
        b.display()
    );
    let spec_text = test_guest().spec_yaml("ids", &extra);
    let vm = client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.unwrap().into_inner();
    let places: Vec<(&str, u32)> = vm.devices.iter().map(|d| (d.id.as_str(), d.root_port)).collect();
    assert_eq!(places, [("disk0", 1), ("data", 2), ("nic0", 3), ("mgmt", 4)]);
    assert_eq!(vm.root_ports, 16);

    // Removing the first disk and NIC moves nothing else; a new disk takes the free port.
    let mut spec = vm.spec.unwrap();
    spec.disks.remove(0);
    spec.nics.remove(0);
    spec.disks.push(pb::Disk { path: a.display().to_string(), id: "late".into(), ..Default::default() });
    let request = pb::UpdateVmRequest { spec: Some(spec.clone()), spec_text: String::new() };
    let vm = client.update_vm(request).await.unwrap().into_inner();
    let places: Vec<(&str, u32)> = vm.devices.iter().map(|d| (d.id.as_str(), d.root_port)).collect();
    assert_eq!(places, [("data", 2), ("late", 1), ("mgmt", 4)]);

    // Bad and duplicate ids are refused by field; nothing changes.
    spec.nics[0].id = "data".into();
    let request = pb::UpdateVmRequest { spec: Some(spec.clone()), spec_text: String::new() };
    let status = client.update_vm(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("nics[0].id: \"data\" is already used"), "{}", status.message());
    spec.nics[0].id = "bad id".into();
    let request = pb::UpdateVmRequest { spec: Some(spec), spec_text: String::new() };
    let status = client.update_vm(request).await.unwrap_err();
    assert!(status.message().contains("nics[0].id"), "{}", status.message());
    assert_eq!(get(&mut client, "ids").await.devices, vm.devices);

    // The guest sees the disks where the tree put them, and again after a restart.
    start(&mut client, "ids").await;
    let mut console = boot(&mut client, "ids").await;
    let before = console.sh("ls /sys/bus/pci/devices").await;
    let request = pb::StopVmRequest { name: "ids".into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request.clone()).await.unwrap();
    start(&mut client, "ids").await;
    let mut console = boot(&mut client, "ids").await;
    assert_eq!(console.sh("ls /sys/bus/pci/devices").await, before);
    client.stop_vm(request).await.unwrap();
}
