//! Hotplug: disks, NICs, vCPUs and memory added to or removed from a VM while it runs, or its spec changed while it
//! is stopped (the next start has them). Every device is placed by the device tree (`device_tree.rs`) and rendered
//! by the same functions as the command line (`cmdline::disk_plug`, `nic_device`), so a device attached live sits
//! where it will sit after a restart.
//!
//! Sequences (QEMU 7.2, raw QMP until typed commands land):
//! - attach disk: `blockdev-add` file node, `blockdev-add` format node, `device_add virtio-blk-pci`, then the tree
//!   and spec are written. A failure at any step undoes the earlier ones (`blockdev-del` in reverse), so no node is
//!   left behind.
//! - attach NIC: the backend's tap and switch port (network NICs), `getfd` per queue, `netdev_add`, `device_add
//!   virtio-net-pci`, then the tree and spec; a failure removes the netdev, the passed fds, the tap and the port.
//! - detach: `device_del`, then a bounded wait for `DEVICE_DELETED` naming the device (the event also fires for
//!   child objects such as `.../virtio-backend` without a `device` member: those are ignored), then the backend
//!   (`blockdev-del` nodes, `netdev_del` and the tap), then the tree and spec. When the guest does not release the
//!   device in time the answer is [`VmError::DetachTimeout`] and the device stays in the spec and tree: QEMU still
//!   has it. A `DEVICE_DELETED` that comes later finishes the removal ([`VmManager::on_device_event`]).
//! - vCPUs: `query-hotpluggable-cpus`, `device_add` of the free slots in order, or `device_del` of the highest
//!   present ones (never the first), up to `max_vcpus`.
//! - memory: grown by `pc-dimm`s (`object-add memory-backend-ram` + `device_add pc-dimm`) up to `max_memory_mib`.
//!   A running VM's memory cannot shrink (the machine has no balloon); a stopped VM's can.
//!
//! Crash safety: the spec and tree are written only after QEMU has the device, and on reattach
//! ([`VmManager::reconcile_devices`]) QEMU is compared with them: a device QEMU still has that the spec lacks (an
//! attach cut short) is removed, and a device the spec has that QEMU no longer has (a detach whose event came
//! while qx-node was down) is finished.

use std::collections::BTreeSet;
use std::time::Duration;

use qx_common::{blocking, error_chain};
use qx_qmp::{Event, QmpClient, QmpEvent};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::{info, warn};

use super::error::place_error;
use super::{validated, Entry, Runtime, VmError, VmInfo, VmManager};
use crate::cmdline::{disk_plug, nic_device, user_nic_plug, Plug};
use crate::device_tree::{DeviceTree, Growth, NicSlot};
use crate::persist::write_atomic;
use crate::spec::{DiskSpec, NicKind, NicSpec, ValidationErrors, VmSpec};
use crate::state::VmState;
use std::sync::Arc;

/// How long a detach waits for the guest to release a device: libvirt and Proxmox wait 5 s, Incus 10 s; guests
/// under TCG on a busy host need the longer one.
pub const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Memory is hot-added in multiples of this: Linux onlines memory in 128 MiB blocks on x86-64.
pub const MEMORY_STEP_MIB: u64 = 128;

/// What a hotplug operation works on: a stopped VM's spec, or a running QEMU too.
fn target(entry: &Entry, operation: &'static str) -> Result<Option<Arc<Runtime>>, VmError> {
    match entry.state() {
        VmState::Stopped | VmState::Crashed => Ok(None),
        VmState::Running | VmState::Paused => entry.runtime().map(Some).ok_or_else(|| wrong_state(entry, operation)),
        _ => Err(wrong_state(entry, operation)),
    }
}

fn wrong_state(entry: &Entry, operation: &'static str) -> VmError {
    VmError::WrongState {
        name: entry.name.clone(),
        state: entry.state(),
        operation,
        needs: "running, paused or stopped",
    }
}

fn hotplug_error(entry: &Entry, device: &str, stage: &'static str) -> impl FnOnce(qx_qmp::Error) -> VmError {
    let (name, device) = (entry.name.clone(), device.to_owned());
    move |source| VmError::Hotplug { name, device, stage, source: Box::new(source) }
}

/// Whether `event` is the `DEVICE_DELETED` of the device `id` (QOM path `/machine/peripheral/<id>`), not of one
/// of its children.
fn deleted(event: &QmpEvent, id: &str) -> bool {
    event.name == "DEVICE_DELETED"
        && (event.data.get("device").and_then(Value::as_str) == Some(id)
            || event.data.get("path").and_then(Value::as_str) == Some(&format!("/machine/peripheral/{id}")))
}

/// Waits up to `timeout` for the `DEVICE_DELETED` of `id` (a device id or, for boot vCPUs, a QOM path).
async fn wait_deleted(events: &mut broadcast::Receiver<Event>, id: &str, timeout: Duration) -> bool {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(Event::Qemu(event))
                    if deleted(&event, id)
                        || (event.name == "DEVICE_DELETED"
                            && event.data.get("path").and_then(Value::as_str) == Some(id)) =>
                {
                    return true
                }
                Ok(Event::Closed { .. }) | Err(broadcast::error::RecvError::Closed) => return false,
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}

/// Plugs a disk or user-mode NIC, undoing what was added when a step fails.
async fn plug_undoable(qmp: &QmpClient, plug: &Plug) -> Result<(), (&'static str, qx_qmp::Error)> {
    let mut nodes: Vec<String> = Vec::new();
    let undo = |nodes: Vec<String>| async move {
        for node in nodes.iter().rev() {
            if let Err(e) = qmp.execute_raw("blockdev-del", Some(json!({ "node-name": node }))).await {
                warn!(node = %node, error = %e, "cannot remove a block node of a failed attach");
            }
        }
    };
    for blockdev in &plug.blockdevs {
        if let Err(e) = qmp.execute_raw("blockdev-add", Some(blockdev.clone())).await {
            undo(nodes).await;
            return Err(("blockdev-add", e));
        }
        nodes.push(blockdev["node-name"].as_str().unwrap_or_default().to_owned());
    }
    if let Some(netdev) = &plug.netdev {
        qmp.execute_raw("netdev_add", Some(netdev.clone())).await.map_err(|e| ("netdev_add", e))?;
    }
    if let Err(e) = qmp.execute_raw("device_add", Some(plug.device.to_qmp())).await {
        if let Some(id) = plug.netdev.as_ref().and_then(|n| n["id"].as_str()) {
            let _ = qmp.execute_raw("netdev_del", Some(json!({ "id": id }))).await;
        }
        undo(nodes).await;
        return Err(("device_add", e));
    }
    Ok(())
}

impl VmManager {
    /// Writes a VM's new device tree and spec (tree first: see `update`) and makes them current.
    async fn commit(&self, entry: &Entry, spec: VmSpec, devices: DeviceTree) -> Result<(), VmError> {
        let (dir, written_spec, written_devices) = (entry.dir.clone(), spec.clone(), devices.clone());
        blocking(move || {
            write_atomic(&dir.devices(), &serde_json::to_vec_pretty(&written_devices)?)?;
            write_atomic(&dir.spec(), &serde_json::to_vec_pretty(&written_spec)?)
        })
        .await
        .map_err(|source| VmError::Persist { name: entry.name.clone(), source })?;
        let mut status = entry.status();
        status.spec = spec;
        status.devices = devices;
        Ok(())
    }

    /// Adds a disk. Valid when running or paused (plugged at once: the guest sees a new block device) and when
    /// stopped (the next start has it). Its id is given or generated (`disk<n>`); it takes the lowest free root port.
    pub async fn attach_disk(&self, name: &str, disk: DiskSpec) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let runtime = target(&entry, "attach a disk")?;
        let (mut spec, mut devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        let index = spec.disks.len();
        spec.disks.push(disk);
        spec.fill_device_ids();
        let spec = validated(spec).await?;
        let id = spec.disks[index].id.clone().unwrap_or_default();
        let growth = if runtime.is_some() { Growth::Fixed } else { Growth::Allowed };
        devices.reconcile(&spec, growth).map_err(|e| place_error(&spec, e))?;
        if let Some(runtime) = runtime {
            let resolved = self.resolve_volumes(name, spec.clone()).await?;
            let slot = devices.disk(&id).expect("reconcile placed the disk").clone();
            let plug = disk_plug(&resolved.disks[index], &slot, false);
            plug_undoable(&runtime.qmp, &plug).await.map_err(|(stage, e)| hotplug_error(&entry, &id, stage)(e))?;
            if let Err(e) = self.commit(&entry, spec, devices).await {
                self.unplug_disk(&runtime, &slot.device, &slot.node, &slot.file_node()).await;
                return Err(e);
            }
            info!(vm = %name, disk = %id, port = ?slot.port, "disk attached");
        } else {
            self.commit(&entry, spec, devices).await?;
            info!(vm = %name, disk = %id, "disk added to the stopped VM");
        }
        Ok(entry.info())
    }

    /// Best-effort removal of a disk plugged by an attach that cannot complete.
    async fn unplug_disk(&self, runtime: &Runtime, device: &str, node: &str, file: &str) {
        let mut events = runtime.qmp.subscribe();
        if runtime.qmp.execute_raw("device_del", Some(json!({ "id": device }))).await.is_ok() {
            wait_deleted(&mut events, device, DEFAULT_DETACH_TIMEOUT).await;
        }
        for node in [node, file] {
            let _ = runtime.qmp.execute_raw("blockdev-del", Some(json!({ "node-name": node }))).await;
        }
    }

    /// Removes disk `id`. Valid when running or paused (the guest is asked to release it and `timeout`, default
    /// [`DEFAULT_DETACH_TIMEOUT`], is waited for) and when stopped.
    pub async fn detach_disk(&self, name: &str, id: &str, timeout: Option<Duration>) -> Result<VmInfo, VmError> {
        self.detach(name, id, timeout, DeviceKind::Disk).await
    }

    /// Removes NIC `id`, its tap and switch port. Valid like [`detach_disk`](Self::detach_disk).
    pub async fn detach_nic(&self, name: &str, id: &str, timeout: Option<Duration>) -> Result<VmInfo, VmError> {
        self.detach(name, id, timeout, DeviceKind::Nic).await
    }

    async fn detach(
        &self,
        name: &str,
        id: &str,
        timeout: Option<Duration>,
        kind: DeviceKind,
    ) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let runtime = target(&entry, kind.detach_operation())?;
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        let device = match kind {
            DeviceKind::Disk => devices.disk(id).map(|d| d.device.clone()),
            DeviceKind::Nic => devices.nic(id).map(|n| n.device.clone()),
        };
        let present = match kind {
            DeviceKind::Disk => spec.disk(id).is_some(),
            DeviceKind::Nic => spec.nic(id).is_some(),
        };
        let (Some(device), true) = (device, present) else {
            return Err(VmError::NoDevice { name: name.to_owned(), kind: kind.name(), id: id.to_owned() });
        };
        let Some(runtime) = runtime else {
            self.forget_device(&entry, id).await?;
            info!(vm = %name, device = %id, "device removed from the stopped VM");
            return Ok(entry.info());
        };
        let mut events = runtime.qmp.subscribe();
        if let Err(e) = runtime.qmp.execute_raw("device_del", Some(json!({ "id": device }))).await {
            // A second detach of a device whose first one timed out: QEMU is still waiting for the guest.
            if !error_chain(&e).contains("in the process of unplug") {
                return Err(hotplug_error(&entry, id, "device_del")(e));
            }
        }
        let timeout = timeout.unwrap_or(DEFAULT_DETACH_TIMEOUT);
        if !wait_deleted(&mut events, &device, timeout).await {
            warn!(vm = %name, device = %id, ?timeout, "the guest did not release the device; it stays attached");
            return Err(VmError::DetachTimeout { name: name.to_owned(), device: id.to_owned(), waited: timeout });
        }
        self.finish_detach(&entry, &runtime, id).await?;
        info!(vm = %name, device = %id, "device detached");
        Ok(entry.info())
    }

    /// After QEMU removed device `id`'s frontend: its backend (block nodes, or netdev and tap), then the device
    /// leaves the tree and spec.
    async fn finish_detach(&self, entry: &Entry, runtime: &Runtime, id: &str) -> Result<(), VmError> {
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        if let Some(slot) = devices.disk(id) {
            for node in [slot.node.clone(), slot.file_node()] {
                if let Err(e) = runtime.qmp.execute_raw("blockdev-del", Some(json!({ "node-name": node }))).await {
                    warn!(vm = %entry.name, node = %node, error = %e, "cannot remove a block node of a detached disk");
                }
            }
        }
        if let Some(slot) = devices.nic(id) {
            self.remove_netdev(&runtime.qmp, &spec, slot).await;
        }
        self.forget_device(entry, id).await
    }

    /// Removes a NIC's netdev, and its tap and switch port when it is on a node network.
    async fn remove_netdev(&self, qmp: &QmpClient, spec: &VmSpec, slot: &NicSlot) {
        if let Err(e) = qmp.execute_raw("netdev_del", Some(json!({ "id": slot.netdev }))).await {
            warn!(netdev = %slot.netdev, error = %e, "cannot remove the netdev of a detached NIC");
        }
        let on_network = spec.nic(&slot.id).is_some_and(|n| n.kind == NicKind::Network);
        if let (true, Some(backend)) = (on_network, &self.inner.backends.network) {
            backend.detach(spec, slot).await;
        }
    }

    /// Drops device `id` from the spec and tree.
    async fn forget_device(&self, entry: &Entry, id: &str) -> Result<(), VmError> {
        let (mut spec, mut devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        spec.disks.retain(|d| d.id.as_deref() != Some(id));
        spec.nics.retain(|n| n.id.as_deref() != Some(id));
        devices.reconcile(&spec, Growth::Fixed).map_err(|e| place_error(&spec, e))?;
        self.commit(entry, spec, devices).await
    }

    /// Adds a NIC. Valid when running or paused (plugged at once; a network NIC gets its tap and switch port
    /// first) and when stopped. Its id is given or generated (`nic<n>`), its MAC generated when absent.
    pub async fn attach_nic(&self, name: &str, nic: NicSpec) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let runtime = target(&entry, "attach a NIC")?;
        let (mut spec, mut devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        let index = spec.nics.len();
        spec.nics.push(nic);
        spec.fill_generated();
        let spec = validated(spec).await?;
        let id = spec.nics[index].id.clone().unwrap_or_default();
        let growth = if runtime.is_some() { Growth::Fixed } else { Growth::Allowed };
        devices.reconcile(&spec, growth).map_err(|e| place_error(&spec, e))?;
        if spec.nics[index].kind == NicKind::Network {
            let mut only = spec.clone();
            only.nics = vec![spec.nics[index].clone()];
            self.check_networks(&only).await.map_err(|e| renumber(e, index))?;
        }
        let Some(runtime) = runtime else {
            self.commit(&entry, spec, devices).await?;
            info!(vm = %name, nic = %id, "NIC added to the stopped VM");
            return Ok(entry.info());
        };
        let slot = devices.nic(&id).expect("reconcile placed the NIC").clone();
        let nic = &spec.nics[index];
        match nic.kind {
            NicKind::User => {
                let plug = user_nic_plug(nic, &slot);
                plug_undoable(&runtime.qmp, &plug).await.map_err(|(stage, e)| hotplug_error(&entry, &id, stage)(e))?;
            }
            NicKind::Network => self.plug_network_nic_undoable(&entry, &runtime, &spec, &slot, index).await?,
        }
        if let Err(e) = self.commit(&entry, spec.clone(), devices).await {
            let mut events = runtime.qmp.subscribe();
            if runtime.qmp.execute_raw("device_del", Some(json!({ "id": slot.device }))).await.is_ok() {
                wait_deleted(&mut events, &slot.device, DEFAULT_DETACH_TIMEOUT).await;
            }
            self.remove_netdev(&runtime.qmp, &spec, &slot).await;
            return Err(e);
        }
        info!(vm = %name, nic = %id, port = ?slot.port, tap = slot.tap, "NIC attached");
        Ok(entry.info())
    }

    /// Tap and switch port, fds, netdev, device; on failure everything made so far is removed again.
    async fn plug_network_nic_undoable(
        &self,
        entry: &Entry,
        runtime: &Runtime,
        spec: &VmSpec,
        slot: &NicSlot,
        index: usize,
    ) -> Result<(), VmError> {
        let qmp = &runtime.qmp;
        let backend = self.inner.backends.network.as_ref().expect("check_networks found a backend");
        let fds = backend.attach(spec, slot).await.map_err(|problem| {
            let field = format!("nics[{index}].network");
            let value = spec.nics[index].network.clone().unwrap_or_default();
            VmError::from(ValidationErrors::one(field, value, format!("cannot be attached: {problem}")))
        })?;
        let mut names = Vec::with_capacity(fds.len());
        let result = async {
            for (queue, fd) in fds.iter().enumerate() {
                let name = format!("{}-q{queue}", slot.netdev);
                qmp.getfd(&name, std::os::fd::AsFd::as_fd(fd)).await.map_err(|e| ("getfd", e))?;
                names.push(name);
            }
            let netdev = match names.as_slice() {
                [one] => json!({ "type": "tap", "id": slot.netdev, "fd": one }),
                many => json!({ "type": "tap", "id": slot.netdev, "fds": many.join(":") }),
            };
            qmp.execute_raw("netdev_add", Some(netdev)).await.map_err(|e| ("netdev_add", e))?;
            let device = nic_device(&spec.nics[index], slot, crate::network::nic_queues(spec));
            if let Err(e) = qmp.execute_raw("device_add", Some(device.to_qmp())).await {
                let _ = qmp.execute_raw("netdev_del", Some(json!({ "id": slot.netdev }))).await;
                return Err(("device_add", e));
            }
            Ok(())
        }
        .await;
        if let Err((stage, e)) = result {
            for name in &names {
                // netdev_add consumed them when it succeeded; otherwise they are still QEMU's.
                let _ = qmp.closefd(name).await;
            }
            backend.detach(spec, slot).await;
            return Err(hotplug_error(entry, &slot.id, stage)(e));
        }
        Ok(())
    }

    /// Sets the number of vCPUs, within `1..=max_vcpus`. Running or paused: vCPUs are plugged into the free
    /// slots QEMU lists (`query-hotpluggable-cpus`) or the highest ones unplugged, waiting `DEFAULT_DETACH_TIMEOUT`
    /// for the guest to release each; the guest onlines added ones. Stopped: the next start has them.
    pub async fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let runtime = target(&entry, "set vCPUs")?;
        let (mut spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        if runtime.is_some() && vcpus > spec.max_vcpus() {
            let problem = format!("is above max_vcpus ({}), fixed while the VM runs", spec.max_vcpus());
            return Err(ValidationErrors::one("vcpus", vcpus, problem).into());
        }
        spec.vcpus = vcpus;
        let mut spec = validated(spec).await?;
        if let Some(runtime) = runtime {
            let reached = self.plug_vcpus(&entry, &runtime, vcpus).await;
            if let Err((reached, error)) = reached {
                // What QEMU has now is what the spec says: a partial change is kept, not hidden.
                spec.vcpus = reached;
                self.commit(&entry, spec, devices).await?;
                return Err(error);
            }
        }
        self.commit(&entry, spec, devices).await?;
        info!(vm = %name, vcpus, "vCPUs set");
        Ok(entry.info())
    }

    /// Plugs or unplugs vCPUs until `want` are present; on failure, how many are present and why.
    async fn plug_vcpus(&self, entry: &Entry, runtime: &Runtime, want: u32) -> Result<(), (u32, VmError)> {
        let qmp = &runtime.qmp;
        let list = qmp.execute_raw("query-hotpluggable-cpus", None).await;
        let list = list.map_err(|e| (0, hotplug_error(entry, "vcpus", "query-hotpluggable-cpus")(e)))?;
        let mut slots: Vec<Value> = list.as_array().cloned().unwrap_or_default();
        let key = |slot: &Value| {
            let prop = |name: &str| slot["props"][name].as_i64().unwrap_or(0);
            (prop("socket-id"), prop("die-id"), prop("core-id"), prop("thread-id"))
        };
        slots.sort_by_key(key);
        let present = |slot: &Value| slot.get("qom-path").is_some();
        let mut count = slots.iter().filter(|s| present(s)).count() as u32;
        if want > count {
            for slot in slots.iter().filter(|s| !present(s)).take((want - count) as usize) {
                let (socket, die, core, thread) = key(slot);
                let mut args = slot["props"].as_object().cloned().unwrap_or_default();
                args.remove("node-id");
                args.insert("driver".into(), slot["type"].clone());
                args.insert("id".into(), format!("cpu-s{socket}-d{die}-c{core}-t{thread}").into());
                if let Err(e) = qmp.execute_raw("device_add", Some(Value::Object(args))).await {
                    return Err((count, hotplug_error(entry, "vcpus", "device_add")(e)));
                }
                count += 1;
            }
        } else {
            let removable: Vec<&Value> = slots.iter().filter(|s| present(s)).skip(1).collect();
            for slot in removable.into_iter().rev().take((count - want) as usize) {
                let path = slot["qom-path"].as_str().unwrap_or_default().to_owned();
                let mut events = qmp.subscribe();
                if let Err(e) = qmp.execute_raw("device_del", Some(json!({ "id": path }))).await {
                    return Err((count, hotplug_error(entry, "vcpus", "device_del")(e)));
                }
                // QEMU 7.2 reports the vCPU's removal only for its child (`.../lapic`): also watch the slot empty.
                let emptied = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let Ok(list) = qmp.execute_raw("query-hotpluggable-cpus", None).await else { continue };
                        let still =
                            list.as_array().into_iter().flatten().any(|s| s["qom-path"].as_str() == Some(&path));
                        if !still {
                            return true;
                        }
                    }
                };
                let gone = tokio::select! {
                    gone = wait_deleted(&mut events, &path, DEFAULT_DETACH_TIMEOUT) => gone,
                    gone = tokio::time::timeout(DEFAULT_DETACH_TIMEOUT, emptied) => gone.unwrap_or(false),
                };
                if !gone {
                    let waited = DEFAULT_DETACH_TIMEOUT;
                    return Err((count, VmError::DetachTimeout { name: entry.name.clone(), device: path, waited }));
                }
                count -= 1;
            }
        }
        Ok(())
    }

    /// Sets the memory, within `spec::MIN_MEMORY_MIB..=max_memory_mib`. Running or paused: only grows, by DIMMs of a
    /// multiple of [`MEMORY_STEP_MIB`] (the guest onlines them). Stopped: any size; the next start has it.
    pub async fn set_memory(&self, name: &str, memory_mib: u64) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let runtime = target(&entry, "set memory")?;
        let (mut spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        let current = spec.memory_mib;
        spec.memory_mib = memory_mib;
        let spec = validated(spec).await?;
        if let Some(runtime) = &runtime {
            let problem = if memory_mib < current {
                Some(format!("is below the running VM's {current} MiB; memory only grows while it runs"))
            } else if memory_mib > spec.max_memory_mib() {
                Some(format!("is above max_memory_mib ({}), fixed while the VM runs", spec.max_memory_mib()))
            } else if (memory_mib - current) % MEMORY_STEP_MIB != 0 {
                Some(format!(
                    "grows the running VM by {} MiB, not a multiple of {MEMORY_STEP_MIB} MiB",
                    memory_mib - current
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ValidationErrors::one("memory_mib", memory_mib, problem).into());
            }
            if memory_mib > current {
                let (object, dimm) = (format!("mem-at-{current}"), format!("dimm-at-{current}"));
                let size = (memory_mib - current) << 20;
                let backend = json!({ "qom-type": "memory-backend-ram", "id": object, "size": size });
                runtime.qmp.execute_raw("object-add", Some(backend)).await.map_err(hotplug_error(
                    &entry,
                    &dimm,
                    "object-add",
                ))?;
                let device = json!({ "driver": "pc-dimm", "id": dimm, "memdev": object });
                if let Err(e) = runtime.qmp.execute_raw("device_add", Some(device)).await {
                    let _ = runtime.qmp.execute_raw("object-del", Some(json!({ "id": object }))).await;
                    return Err(hotplug_error(&entry, &dimm, "device_add")(e));
                }
            }
        }
        self.commit(&entry, spec, devices).await?;
        info!(vm = %name, memory_mib, "memory set");
        Ok(entry.info())
    }

    /// Called by the supervisor for every QMP event: a `DEVICE_DELETED` of a device in the tree (a detach that
    /// timed out and that the guest completed later) finishes its removal.
    pub(super) fn on_device_event(&self, entry: &Arc<Entry>, runtime: &Arc<Runtime>, event: &QmpEvent) {
        if event.name != "DEVICE_DELETED" {
            return;
        }
        let id = {
            let status = entry.status();
            let devices = &status.devices;
            let disk = devices.disks.iter().find(|d| deleted(event, &d.device)).map(|d| d.id.clone());
            disk.or_else(|| devices.nics.iter().find(|n| deleted(event, &n.device)).map(|n| n.id.clone()))
        };
        let Some(id) = id else { return };
        let (manager, entry, runtime) = (self.clone(), Arc::clone(entry), Arc::clone(runtime));
        tokio::spawn(async move {
            // A detach still waiting finishes it itself; this one then finds nothing left to do.
            let _op = entry.op.lock().await;
            let still_there = {
                let status = entry.status();
                status.devices.disk(&id).is_some() || status.devices.nic(&id).is_some()
            };
            if still_there && entry.runtime().is_some_and(|r| Arc::ptr_eq(&r, &runtime)) {
                match manager.finish_detach(&entry, &runtime, &id).await {
                    Ok(()) => info!(vm = %entry.name, device = %id, "late DEVICE_DELETED: device detached"),
                    Err(e) => warn!(vm = %entry.name, device = %id, error = %e, "cannot finish a late detach"),
                }
            }
        });
    }

    /// After a reattach: makes the spec and tree and QEMU agree on the disks and NICs (see the module doc).
    pub(super) async fn reconcile_devices(&self, entry: &Arc<Entry>, runtime: &Arc<Runtime>) {
        let Ok(pci) = runtime.qmp.execute_raw("query-pci", None).await else { return };
        let mut in_qemu = BTreeSet::new();
        collect_qdev_ids(&pci, &mut in_qemu);
        let devices = entry.status().devices.clone();
        for slot in &devices.disks {
            if !in_qemu.contains(&slot.device) {
                info!(vm = %entry.name, disk = %slot.id, "the disk left QEMU while qx-node was down; finishing its detach");
                let _ = self.finish_detach(entry, runtime, &slot.id).await;
            }
        }
        for slot in &devices.nics {
            if !in_qemu.contains(&slot.device) {
                info!(vm = %entry.name, nic = %slot.id, "the NIC left QEMU while qx-node was down; finishing its detach");
                let _ = self.finish_detach(entry, runtime, &slot.id).await;
            }
        }
        let known: BTreeSet<String> = devices
            .disks
            .iter()
            .map(|d| d.device.clone())
            .chain(devices.nics.iter().map(|n| n.device.clone()))
            .collect();
        for stray in
            in_qemu.iter().filter(|id| (id.starts_with("disk-") || id.starts_with("nic-")) && !known.contains(*id))
        {
            info!(vm = %entry.name, device = %stray, "removing a device of an attach cut short by a qx-node restart");
            let mut events = runtime.qmp.subscribe();
            if runtime.qmp.execute_raw("device_del", Some(json!({ "id": stray }))).await.is_ok() {
                wait_deleted(&mut events, stray, DEFAULT_DETACH_TIMEOUT).await;
            }
        }
        // Block nodes and netdevs of attaches cut short (with or without their device).
        if let Ok(nodes) = runtime.qmp.execute_raw("query-named-block-nodes", Some(json!({ "flat": true }))).await {
            let ours: BTreeSet<String> = devices.disks.iter().flat_map(|d| [d.node.clone(), d.file_node()]).collect();
            let mut stray: Vec<String> = nodes
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["node-name"].as_str())
                .filter(|n| n.starts_with("drive-") && !ours.contains(*n))
                .map(str::to_owned)
                .collect();
            // Format nodes before the file nodes under them.
            stray.sort_by_key(|n| n.ends_with("-file"));
            for node in stray {
                let _ = runtime.qmp.execute_raw("blockdev-del", Some(json!({ "node-name": node }))).await;
            }
        }
    }
}

/// Every `qdev_id` under a `query-pci` answer (bridges included).
fn collect_qdev_ids(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(id) = map.get("qdev_id").and_then(Value::as_str).filter(|id| !id.is_empty()) {
                out.insert(id.to_owned());
            }
            map.values().for_each(|v| collect_qdev_ids(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_qdev_ids(v, out)),
        _ => {}
    }
}

/// A validation error about the one-NIC spec `check_networks` was given, renamed to the NIC's real index.
fn renumber(error: VmError, index: usize) -> VmError {
    match error {
        VmError::Invalid(ValidationErrors(mut errors)) => {
            for e in &mut errors {
                e.field = e.field.replacen("nics[0]", &format!("nics[{index}]"), 1);
            }
            VmError::Invalid(ValidationErrors(errors))
        }
        other => other,
    }
}

#[derive(Debug, Clone, Copy)]
enum DeviceKind {
    Disk,
    Nic,
}

impl DeviceKind {
    fn name(self) -> &'static str {
        match self {
            DeviceKind::Disk => "disk",
            DeviceKind::Nic => "NIC",
        }
    }

    fn detach_operation(self) -> &'static str {
        match self {
            DeviceKind::Disk => "detach a disk",
            DeviceKind::Nic => "detach a NIC",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: Value) -> QmpEvent {
        QmpEvent { name: name.into(), data, seconds: 0, microseconds: 0 }
    }

    #[test]
    fn device_deleted_is_matched_on_the_device_not_its_children() {
        let child = event("DEVICE_DELETED", json!({ "path": "/machine/peripheral/disk-a/virtio-backend" }));
        assert!(!deleted(&child, "disk-a"));
        let own = event("DEVICE_DELETED", json!({ "device": "disk-a", "path": "/machine/peripheral/disk-a" }));
        assert!(deleted(&own, "disk-a"));
        assert!(!deleted(&own, "disk-ab"));
        let path_only = event("DEVICE_DELETED", json!({ "path": "/machine/peripheral/nic-x" }));
        assert!(deleted(&path_only, "nic-x"));
        assert!(!deleted(&event("RESET", json!({ "device": "disk-a" })), "disk-a"));
    }

    #[test]
    fn qdev_ids_are_found_behind_bridges() {
        let pci = json!([{ "bus": 0, "devices": [
            { "qdev_id": "rp1", "pci_bridge": { "devices": [ { "qdev_id": "disk-a" } ] } },
            { "qdev_id": "" },
        ] }]);
        let mut ids = BTreeSet::new();
        collect_qdev_ids(&pci, &mut ids);
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["disk-a", "rp1"]);
    }
}
