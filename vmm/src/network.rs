//! The seam between VM NICs on node networks and what provides those networks. The daemon implements
//! [`NetworkBackend`] over Open vSwitch; this crate only asks for a tap's fds at start and gives them to QEMU.

use std::os::fd::OwnedFd;

use crate::device_tree::NicSlot;
use crate::spec::{NicKind, ValidationErrors, VmSpec};

pub use qx_common::BoxFuture;

/// The host side of NICs of kind `network`.
pub trait NetworkBackend: Send + Sync {
    /// Checks, before anything is created, that every network NIC of `vm` can be attached (its network exists,
    /// the switch answers). Errors name the field (`nics[1].network`) and value.
    fn check<'a>(&'a self, vm: &'a VmSpec) -> BoxFuture<'a, Result<(), ValidationErrors>>;

    /// Creates the host side of the NIC placed at `nic` (`vm.nic(&nic.id)`: a tap named from the VM's UUID and
    /// `nic.tap`, plugged into its network with `iface-id` `<vm uuid>-<nic id>`) and returns the tap's queue fds
    /// for QEMU.
    fn attach<'a>(&'a self, vm: &'a VmSpec, nic: &'a NicSlot) -> BoxFuture<'a, Result<Vec<OwnedFd>, String>>;

    /// Removes what `attach` created. Idempotent: called after every exit, failed start and NIC detach, also
    /// when `vm` no longer has the NIC.
    fn detach<'a>(&'a self, vm: &'a VmSpec, nic: &'a NicSlot) -> BoxFuture<'a, ()>;
}

/// Queues per tap (and virtio-net queue pairs): one per vCPU, at most 8, so each vCPU has its own.
pub fn nic_queues(vm: &VmSpec) -> u16 {
    vm.vcpus.clamp(1, 8) as u16
}

/// Indexes of the NICs of `vm` that are on node networks.
pub fn network_nics(vm: &VmSpec) -> impl Iterator<Item = usize> + '_ {
    vm.nics.iter().enumerate().filter(|(_, nic)| nic.kind == NicKind::Network).map(|(i, _)| i)
}

/// The OVS `external_ids:iface-id` (the OVN logical port) of NIC `nic_id` of the VM `vm_uuid`.
pub fn iface_id(vm_uuid: &uuid::Uuid, nic_id: &str) -> String {
    format!("{vm_uuid}-{nic_id}")
}
