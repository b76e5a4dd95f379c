//! Passthrough and SR-IOV on a fake sysfs tree, and the same checks on the real host where it is safe.

use std::sync::Arc;

use crate::fake::{FakeHost, FakeKernel};
use crate::kernel::{HostKernel, Kernel};
use crate::pci::{self, PciAddress, PciIds};
use crate::sriov::VfNetConfig;
use crate::{DeviceError, HostDevices, HostRoot};

const NIC: &str = "0000:03:00.0";
const NIC_FN1: &str = "0000:03:00.1";
const BRIDGE: &str = "0000:00:1c.0";
const GPU: &str = "0000:05:00.0";
const GPU_AUDIO: &str = "0000:05:00.1";
const DISK: &str = "0000:04:00.0";
const PF: &str = "0000:06:00.0";

fn addr(text: &str) -> PciAddress {
    text.parse().unwrap()
}

/// A host with an Intel NIC (two functions in separate groups, igb), a GPU with its audio function in one group
/// behind a bridge, an NVMe disk, and an SR-IOV PF with 8 VFs possible.
fn host() -> (FakeHost, Arc<FakeKernel>) {
    let host = FakeHost::new();
    host.device(BRIDGE, (0x8086, 0xa110), 0x060400, Some("pcieport"), Some(7));
    host.device(NIC, (0x8086, 0x1521), 0x020000, Some("igb"), Some(10));
    host.device(NIC_FN1, (0x8086, 0x1521), 0x020000, Some("igb"), Some(11));
    host.net(NIC, "enp3s0f0", 4);
    host.net(NIC_FN1, "enp3s0f1", 5);
    host.device(GPU, (0x10de, 0x1eb8), 0x030000, Some("nouveau"), Some(7));
    host.device(GPU_AUDIO, (0x10de, 0x10f8), 0x040300, Some("snd_hda_intel"), Some(7));
    host.device(DISK, (0x144d, 0xa808), 0x010802, Some("nvme"), Some(12));
    host.disk(DISK, "nvme0n1", 2);
    host.device(PF, (0x8086, 0x1572), 0x020000, Some("i40e"), Some(13));
    host.sriov_pf(PF, 8);
    host.net(PF, "enp6s0", 6);
    let mut kernel = FakeKernel::new(&host);
    for (a, d) in [(NIC, "igb"), (NIC_FN1, "igb"), (GPU, "nouveau"), (GPU_AUDIO, "snd_hda_intel"), (DISK, "nvme")] {
        kernel.native_drivers.insert(a.into(), d.into());
    }
    (host, Arc::new(kernel))
}

fn open(host: &FakeHost, kernel: &Arc<FakeKernel>) -> HostDevices {
    HostDevices::open(host.root(), kernel.clone(), &host.path("state")).unwrap()
}

fn state_dir(host: &FakeHost) -> std::path::PathBuf {
    let dir = host.path("state");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn inventory_reads_ids_names_class_driver_numa_group_and_sriov() {
    let (host, kernel) = host();
    std::fs::create_dir_all(host.path("usr/share/misc")).unwrap();
    std::fs::write(
        host.path("usr/share/misc/pci.ids"),
        "8086  Intel Corporation\n\t1521  I350 Gigabit Network Connection\nC 02  Network controller\n\t00  Ethernet controller\n",
    )
    .unwrap();
    state_dir(&host);
    let devices = open(&host, &kernel);
    devices.set_vf_count(addr(PF), 2).unwrap();
    let list = devices.list().unwrap();
    let addresses: Vec<String> = list.iter().map(|d| d.device.address.to_string()).collect();
    assert_eq!(
        addresses,
        [BRIDGE, NIC, NIC_FN1, DISK, GPU, GPU_AUDIO, PF, "0000:06:10.0", "0000:06:10.1"],
        "sorted by address, VFs included"
    );
    let nic = &list[1].device;
    assert_eq!((nic.vendor_id, nic.device_id, nic.class), (0x8086, 0x1521, 0x020000));
    assert_eq!(nic.vendor_name.as_deref(), Some("Intel Corporation"));
    assert_eq!(nic.device_name.as_deref(), Some("I350 Gigabit Network Connection"));
    assert_eq!(nic.class_name.as_deref(), Some("Ethernet controller"));
    assert_eq!(nic.driver.as_deref(), Some("igb"));
    assert_eq!(nic.numa_node, Some(0));
    assert_eq!(nic.iommu_group, Some(10));
    assert!(nic.iommu_group_peers.is_empty());
    assert_eq!(nic.net_interfaces, ["enp3s0f0"]);
    let gpu = &list[4].device;
    assert_eq!(gpu.vendor_name, None, "no name for an id the database lacks");
    assert_eq!(gpu.iommu_group_peers, [addr(BRIDGE), addr(GPU_AUDIO)]);
    let pf = &list[6].device;
    let sriov = pf.sriov.as_ref().unwrap();
    assert_eq!((sriov.total_vfs, sriov.num_vfs), (8, 2));
    assert_eq!(sriov.vfs, [addr("0000:06:10.0"), addr("0000:06:10.1")]);
    assert_eq!(list[8].device.physfn, Some((addr(PF), 1)));
    assert!(list[1].assigned_to.is_none() && list[1].host_use.is_none());
}

#[test]
fn a_virtio_nic_carrying_the_host_address_stays_with_the_host() {
    // A host that is itself a VM: its management NIC is virtio-net, whose interface sits under virtio0/net.
    let (host, kernel) = host();
    const VIRTIO: &str = "0000:00:03.0";
    host.device(VIRTIO, (0x1af4, 0x1041), 0x020000, Some("virtio-pci"), Some(20));
    host.virtio_net(VIRTIO, "eth0");
    host.route("eth0");
    state_dir(&host);
    let list = open(&host, &kernel).list().unwrap();
    let nic = list.iter().find(|d| d.device.address == addr(VIRTIO)).unwrap();
    assert_eq!(nic.device.net_interfaces, ["eth0"]);
    assert_eq!(nic.host_use.as_deref(), Some("its network interface eth0 carries a host address"));
}

#[test]
fn bind_and_restore_go_through_driver_override_and_the_ledger() {
    let (host, kernel) = host();
    state_dir(&host);
    let devices = open(&host, &kernel);
    let assigned = devices.assign("vm-a", &[addr(NIC)]).unwrap();
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].iommu_group, 10);
    assert_eq!(assigned[0].group_device, std::path::Path::new("/dev/vfio/10"));
    assert_eq!(host.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(host.override_of(NIC), "vfio-pci");
    assert_eq!(
        kernel.writes(),
        [
            (format!("sys/bus/pci/devices/{NIC}/driver_override"), "vfio-pci".into()),
            ("sys/bus/pci/drivers/igb/unbind".into(), NIC.into()),
            ("sys/bus/pci/drivers_probe".into(), NIC.into()),
        ]
    );
    let ledger = std::fs::read_to_string(host.path("state/hostdevs.json")).unwrap();
    assert!(ledger.contains("\"original_driver\": \"igb\"") && ledger.contains("vm-a"), "{ledger}");
    assert_eq!(devices.list().unwrap()[1].assigned_to.as_deref(), Some("vm-a"));

    // Assigning it again to the same VM changes nothing; to another VM is refused naming both.
    let before = kernel.writes().len();
    devices.assign("vm-a", &[addr(NIC)]).unwrap();
    let e = devices.assign("vm-b", &[addr(NIC)]).unwrap_err();
    assert!(matches!(e, DeviceError::Taken { .. }), "{e}");
    assert_eq!(e.to_string(), format!("{NIC} is already given to vm-a"));
    assert_eq!(kernel.writes().len(), before, "nothing rebound");

    assert_eq!(devices.release("vm-a").unwrap(), [addr(NIC)]);
    assert_eq!(host.driver_of(NIC).as_deref(), Some("igb"));
    assert_eq!(host.override_of(NIC), "(null)");
    assert!(devices.claims().is_empty());
    assert!(devices.release("vm-a").unwrap().is_empty(), "releasing twice is a no-op");
}

#[test]
fn devices_of_vms_gone_during_a_crash_go_back_at_the_next_start() {
    let (host, kernel) = host();
    state_dir(&host);
    {
        let devices = open(&host, &kernel);
        devices.assign("vm-dead", &[addr(NIC)]).unwrap();
        devices.assign("vm-alive", &[addr(NIC_FN1)]).unwrap();
    }
    // The daemon died between driver_override and the unbind of a third device: the ledger holds it already.
    let ledger_path = host.path("state/hostdevs.json");
    let mut ledger: serde_json::Value = serde_json::from_slice(&std::fs::read(&ledger_path).unwrap()).unwrap();
    ledger["claims"].as_array_mut().unwrap().push(serde_json::json!(
        {"address": DISK, "owner": "vm-dead", "original_driver": "nvme"}
    ));
    std::fs::write(&ledger_path, serde_json::to_vec(&ledger).unwrap()).unwrap();
    std::fs::write(host.device_dir(DISK).join("driver_override"), "vfio-pci\n").unwrap();

    let devices = open(&host, &kernel);
    let mut recovered = devices.recover(|vm| vm == "vm-alive").unwrap();
    recovered.sort();
    assert_eq!(recovered, [addr(NIC), addr(DISK)]);
    assert_eq!(host.driver_of(NIC).as_deref(), Some("igb"));
    assert_eq!((host.driver_of(DISK).as_deref(), host.override_of(DISK).as_str()), (Some("nvme"), "(null)"));
    assert_eq!(host.driver_of(NIC_FN1).as_deref(), Some("vfio-pci"), "the running VM keeps its device");
    assert_eq!(devices.claims_of("vm-alive"), [addr(NIC_FN1)]);
}

#[test]
fn a_failure_half_way_leaves_nothing_bound() {
    let (host, kernel) = host();
    state_dir(&host);
    // The VFIO open of the second device fails (its group is not viable).
    let mut k = Arc::into_inner(kernel).unwrap();
    k.vfio_fails.insert(NIC_FN1.into());
    let kernel = Arc::new(k);
    let devices = open(&host, &kernel);
    let e = devices.assign("vm-a", &[addr(NIC), addr(NIC_FN1)]).unwrap_err();
    assert!(matches!(e, DeviceError::VfioOpen { .. }), "{e}");
    assert!(e.to_string().contains(NIC_FN1), "{e}");
    for a in [NIC, NIC_FN1] {
        assert_eq!(host.driver_of(a).as_deref(), Some("igb"), "{a} given back");
        assert_eq!(host.override_of(a), "(null)");
    }
    assert!(devices.claims().is_empty());

    // vfio-pci missing: the device stays unbound after the probe, and goes back to its driver.
    std::fs::remove_dir(host.path("sys/bus/pci/drivers/vfio-pci")).unwrap();
    let e = devices.assign("vm-a", &[addr(NIC)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{NIC} is driven by no driver after binding, not vfio-pci; is the vfio-pci module loaded?")
    );
    assert_eq!(host.driver_of(NIC).as_deref(), Some("igb"));
    assert!(devices.claims().is_empty());
}

#[test]
fn a_sysfs_write_failing_gives_back_what_was_bound() {
    let (host, kernel) = host();
    state_dir(&host);
    let mut k = Arc::into_inner(kernel).unwrap();
    k.failing_writes.insert(("drivers/igb/unbind".into(), NIC_FN1.into()));
    let kernel = Arc::new(k);
    let devices = open(&host, &kernel);
    let e = devices.assign("vm-a", &[addr(NIC), addr(NIC_FN1)]).unwrap_err();
    let path = host.path("sys/bus/pci/drivers/igb/unbind");
    assert_eq!(e.to_string(), format!("cannot unbind the driver for {NIC_FN1} ({})", path.display()));
    for a in [NIC, NIC_FN1] {
        assert_eq!(host.driver_of(a).as_deref(), Some("igb"), "{a} given back");
        assert_eq!(host.override_of(a), "(null)");
    }
    assert!(devices.claims().is_empty());
}

#[test]
fn iommu_groups_go_whole_and_bridges_stay_with_the_host() {
    let (host, kernel) = host();
    state_dir(&host);
    let devices = open(&host, &kernel);
    let e = devices.assign("vm-a", &[addr(GPU)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("cannot give {GPU} to a VM: its IOMMU group 7 also holds {GPU_AUDIO}, which must go to the same VM")
    );
    let e = devices.assign("vm-a", &[addr(BRIDGE)]).unwrap_err();
    assert!(matches!(e, DeviceError::Bridge { .. }), "{e}");
    assert!(kernel.writes().is_empty(), "nothing rebound");
    // With its audio function, the GPU goes; the bridge in the group stays on pcieport.
    devices.assign("vm-a", &[addr(GPU), addr(GPU_AUDIO)]).unwrap();
    assert_eq!(host.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
    assert_eq!(host.driver_of(BRIDGE).as_deref(), Some("pcieport"));
    devices.release("vm-a").unwrap();
    assert_eq!(host.driver_of(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));
}

#[test]
fn bad_input_is_refused_naming_the_device_and_nothing_is_rebound() {
    let (host, kernel) = host();
    state_dir(&host);
    host.route("enp3s0f0");
    host.mount("/dev/nvme0n1p2", "/");
    let devices = open(&host, &kernel);

    let e = "0000:03:00".parse::<PciAddress>().unwrap_err();
    assert!(e.to_string().contains("\"0000:03:00\""), "{e}");
    let e = devices.assign("vm-a", &[addr("0000:09:00.0")]).unwrap_err();
    assert_eq!(e.to_string(), "PCI device 0000:09:00.0 does not exist on this host");
    assert!(e.is_invalid_argument());
    let e = devices.assign("vm-a", &[addr(NIC)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("cannot give {NIC} to a VM: the host uses it (its network interface enp3s0f0 carries a host address)")
    );
    let e = devices.assign("vm-a", &[addr(DISK)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot give {DISK} to a VM: the host uses it (it holds /dev/nvme0n1p2, which the host has mounted or \
             uses as swap)"
        )
    );
    // A good device with a bad one: the good one is not bound either.
    let e = devices.assign("vm-a", &[addr(NIC_FN1), addr("0000:09:00.0")]).unwrap_err();
    assert!(e.to_string().contains("0000:09:00.0"), "{e}");
    assert!(kernel.writes().is_empty(), "nothing rebound: {:?}", kernel.writes());
    assert!(devices.claims().is_empty());
    let list = devices.list().unwrap();
    assert_eq!(list[1].host_use.as_deref(), Some("its network interface enp3s0f0 carries a host address"));

    // The IOMMU off: no groups at all, and no device links to one.
    std::fs::remove_dir_all(host.path("sys/kernel/iommu_groups")).unwrap();
    std::fs::create_dir(host.path("sys/kernel/iommu_groups")).unwrap();
    for a in [BRIDGE, NIC, NIC_FN1, GPU, GPU_AUDIO, DISK, PF] {
        std::fs::remove_file(host.device_dir(a).join("iommu_group")).unwrap();
    }
    let e = devices.assign("vm-a", &[addr(NIC_FN1)]).unwrap_err();
    assert!(matches!(e, DeviceError::IommuOff { .. }), "{e}");
    assert!(e.to_string().starts_with(&format!("cannot give {NIC_FN1} to a VM: the IOMMU is off")), "{e}");
    assert!(kernel.writes().is_empty());
}

#[test]
fn vfs_are_created_through_zero_and_refused_above_the_total_or_in_use() {
    let (host, kernel) = host();
    state_dir(&host);
    let devices = open(&host, &kernel);
    let pf = addr(PF);
    let numvfs = format!("sys/bus/pci/devices/{PF}/sriov_numvfs");
    devices.set_vf_count(pf, 4).unwrap();
    devices.set_vf_count(pf, 2).unwrap();
    assert_eq!(
        kernel.writes(),
        [(numvfs.clone(), "4".into()), (numvfs.clone(), "0".into()), (numvfs.clone(), "2".into())]
    );
    assert_eq!(devices.device(pf).unwrap().sriov.unwrap().num_vfs, 2);

    let e = devices.set_vf_count(pf, 9).unwrap_err();
    assert_eq!(e.to_string(), format!("sriov_numvfs: 9 is above {PF}'s sriov_totalvfs 8"));
    assert!(e.is_invalid_argument());
    let e = devices.set_vf_count(addr(NIC), 1).unwrap_err();
    assert_eq!(e.to_string(), format!("{NIC} is not an SR-IOV physical function"));

    let e = devices.assign("vm-a", &[pf]).unwrap_err();
    assert!(e.to_string().starts_with(&format!("cannot give {PF} to a VM: it has 2 SR-IOV VFs")), "{e}");

    let vf0 = devices.free_vf(pf, &[]).unwrap();
    assert_eq!(vf0, addr("0000:06:10.0"));
    let config =
        VfNetConfig { mac: Some("52:54:00:00:00:01".parse().unwrap()), vlan: Some(42), spoof_check: Some(true) };
    devices.configure_vf(vf0, &config).unwrap();
    assert_eq!(*kernel.vf_settings.lock().unwrap(), [(6, 0, config)], "set on the PF's ifindex, VF index 0");
    devices.assign("vm-a", &[vf0]).unwrap();
    assert_eq!(devices.free_vf(pf, &[]).unwrap(), addr("0000:06:10.1"));
    let e = devices.free_vf(pf, &[addr("0000:06:10.1")]).unwrap_err();
    assert_eq!(e.to_string(), format!("{PF} has no free VF (2 exist, each given to a VM or used by the host)"));

    let writes = kernel.writes().len();
    let e = devices.set_vf_count(pf, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot change the VF count of {PF}: 0000:06:10.0 is given to vm-a (changing the count removes every VF)"
        )
    );
    assert_eq!(kernel.writes().len(), writes, "no VF removed");
    devices.release("vm-a").unwrap();
    assert_eq!(host.driver_of("0000:06:10.0").as_deref(), Some("iavf"));
    devices.set_vf_count(pf, 0).unwrap();
    assert!(devices.device(pf).unwrap().sriov.unwrap().vfs.is_empty());
    let e = devices.configure_vf(addr(NIC), &VfNetConfig::default()).unwrap_err();
    assert_eq!(e.to_string(), format!("{NIC} is not an SR-IOV virtual function"));
}

/// A kernel that must never be asked to act: the refusals below happen before any write.
#[derive(Debug)]
struct NoWrites;

impl Kernel for NoWrites {
    fn write(&self, path: &std::path::Path, value: &str) -> std::io::Result<()> {
        panic!("wrote {value:?} to {} on the real host", path.display());
    }
    fn vfio_open(&self, device_dir: &std::path::Path) -> std::io::Result<()> {
        panic!("opened {} through VFIO on the real host", device_dir.display());
    }
    fn set_vf(&self, _: u32, _: u32, _: &VfNetConfig) -> std::io::Result<()> {
        panic!("set a VF on the real host");
    }
}

/// The real host: its inventory reads, and the device carrying the host's default route is refused before any
/// write.
#[test]
fn the_real_host_lists_its_devices_and_keeps_the_ones_it_uses() {
    let state = tempfile::tempdir().unwrap();
    let devices = HostDevices::open(HostRoot::default(), Arc::new(NoWrites), state.path()).unwrap();
    let list = devices.list().unwrap();
    if list.is_empty() {
        return qx_test_infra::skip("no such hardware: this host has no PCI devices in sysfs");
    }
    for d in &list {
        assert!(d.device.vendor_id != 0 && d.device.vendor_id != 0xffff, "{d:?}");
    }
    let Some(used) = list.iter().find(|d| d.host_use.is_some()) else {
        return qx_test_infra::skip(
            "no such hardware: no PCI device of this host carries its address or a mounted disk",
        );
    };
    let e = devices.assign("vm-a", &[used.device.address]).unwrap_err();
    assert!(matches!(e, DeviceError::HostUses { .. }), "{e}");
    assert!(e.to_string().contains(&used.device.address.to_string()), "{e}");
    assert!(devices.claims().is_empty());
}

/// The bind/restore round trip for real, where the host has an IOMMU and a device no driver holds, alone in its
/// group (so that taking it cannot disturb the host).
#[test]
fn the_real_host_binds_and_restores_a_spare_device() {
    let root = HostRoot::default();
    if !pci::iommu_enabled(&root) {
        return qx_test_infra::skip("no such hardware: no IOMMU (/sys/kernel/iommu_groups is empty)");
    }
    let ids = PciIds::default();
    let spare = pci::scan(&root, &ids)
        .unwrap()
        .into_iter()
        .find(|d| d.driver.is_none() && !d.is_bridge() && d.iommu_group_peers.is_empty() && d.sriov.is_none());
    let Some(spare) = spare else {
        return qx_test_infra::skip("no such hardware: no unbound PCI device alone in its IOMMU group");
    };
    let state = tempfile::tempdir().unwrap();
    let devices = HostDevices::open(root, HostKernel::shared(), state.path()).unwrap();
    match devices.assign("qx-test", &[spare.address]) {
        Ok(assigned) => assert_eq!(assigned[0].address, spare.address),
        Err(DeviceError::NotVfio { .. }) => {
            assert!(devices.claims().is_empty());
            return qx_test_infra::skip("the vfio-pci module is not loaded (and loading modules is not allowed here)");
        }
        Err(e) => panic!("{e}"),
    }
    assert_eq!(devices.device(spare.address).unwrap().driver.as_deref(), Some("vfio-pci"));
    devices.release("qx-test").unwrap();
    assert_eq!(devices.device(spare.address).unwrap().driver, None);
}
