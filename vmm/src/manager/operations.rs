//! Operations on a VM's definition (create, update, delete) and on its running QEMU (stop, reboot, reset, pause,
//! resume, the serial console). Each one documents the states it is valid in, and runs under the VM's operation
//! lock but for force stop.

use std::fs;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use qx_common::blocking;
use qx_qmp::qapi_qmp::ShutdownAction;
use qx_qmp::{Event, QemuEvent};
use tokio::sync::broadcast;
use tracing::{error, info, warn};

use super::error::place_error;
use super::{create_vm_dir, validated, Entry, Runtime, VmError, VmInfo, VmManager};
use crate::console::SerialConsole;
use crate::device_tree::{DeviceTree, Growth};
use crate::persist::{write_atomic, StateRecord, VmDir};
use crate::qmp_ops::{self, Simple};
use crate::spec::{ValidationErrors, VmSpec};
use crate::state::VmState;

/// How long `quit` gets after the guest ignored the power button, before SIGKILL.
pub(super) const QUIT_GRACE: Duration = Duration::from_secs(5);

impl VmManager {
    /// Defines a VM. Valid in no state: the name must be new. The VM starts out stopped.
    pub async fn create(&self, mut spec: VmSpec) -> Result<VmInfo, VmError> {
        spec = validated(spec).await?;
        let _membership = self.inner.membership.lock().await;
        if self.vms_read().contains_key(&spec.name) {
            return Err(VmError::AlreadyExists(spec.name));
        }
        spec.pin_shape(&self.inner.caps);
        spec.validate_shape(&self.inner.caps)?;
        spec.fill_device_ids();
        let devices = DeviceTree::new(&spec).map_err(|e| place_error(&spec, e))?;
        if spec.uuid.is_none() {
            if let Ok(accel) = self.resolve_accel(&spec) {
                spec.uuid = self.inner.warm.reserve(&spec, &devices, accel, &spec.name);
            }
        }
        spec.fill_generated();
        if let Some(other) = self.vms_read().values().find(|e| e.status().spec.uuid == spec.uuid) {
            return Err(
                ValidationErrors::one("uuid", spec.uuid(), format!("is already used by VM {:?}", other.name)).into()
            );
        }
        let dir = VmDir::new(&self.inner.vms_dir, &spec.name);
        let record = StateRecord::default();
        let write = {
            let (dir, spec, devices, record) = (dir.clone(), spec.clone(), devices.clone(), record.clone());
            blocking(move || create_vm_dir(&dir, &spec, &devices, &record)).await
        };
        if let Err(source) = write {
            self.inner.warm.release(&spec.name);
            return Err(VmError::Persist { name: spec.name.clone(), source });
        }
        let entry = Entry::new(spec.name.clone(), dir, spec.clone(), devices, record);
        self.vms_write().insert(spec.name.clone(), Arc::clone(&entry));
        info!(vm = %spec.name, "created");
        self.emit(&entry, Some(VmState::Stopped), None, "created");
        Ok(entry.info())
    }

    /// Replaces the spec of a VM. Valid when stopped or crashed. The uuid and generated MACs are kept; devices are
    /// matched by id (devices without one get the lowest free generated id, so an unchanged list keeps its ids),
    /// and devices the VM had keep their places.
    pub async fn update(&self, mut spec: VmSpec) -> Result<VmInfo, VmError> {
        let entry = self.entry(&spec.name)?;
        let _op = entry.op.lock().await;
        entry.require("update", "stopped", &[VmState::Stopped, VmState::Crashed])?;
        let old = entry.status().spec.clone();
        match spec.uuid {
            Some(uuid) if Some(uuid) != old.uuid => {
                return Err(ValidationErrors::one("uuid", uuid, "cannot change; it identifies the VM").into());
            }
            _ => spec.uuid = old.uuid,
        }
        // The machine shape stays pinned unless the update names another one: an alias (`q35`, what a spec
        // without `machine` says) of the family the VM is pinned in keeps the pinned version.
        let alias = matches!(spec.machine.as_str(), "q35" | "pc");
        if alias && crate::device_tree::is_pcie(&spec.machine) == crate::device_tree::is_pcie(&old.machine) {
            spec.machine = old.machine.clone();
        }
        spec.machine = self.inner.caps.pin_machine(&spec.machine);
        if spec.cpu.is_none() {
            spec.cpu = old.cpu.clone();
        }
        spec.validate_shape(&self.inner.caps)?;
        spec.fill_device_ids();
        for nic in &mut spec.nics {
            if nic.mac.is_none() {
                nic.mac = nic.id.as_deref().and_then(|id| old.nic(id)).and_then(|old_nic| old_nic.mac.clone());
            }
        }
        spec = validated(spec).await?;
        spec.fill_generated();
        let mut devices = entry.status().devices.clone();
        devices.reconcile(&spec, Growth::Allowed).map_err(|e| place_error(&spec, e))?;
        let (dir, written_spec, written_devices) = (entry.dir.clone(), spec.clone(), devices.clone());
        // The tree first: one that lists devices the spec lacks is trimmed at load, so a crash between the two
        // writes leaves the old spec with a consistent tree.
        blocking(move || {
            write_atomic(&dir.devices(), &serde_json::to_vec_pretty(&written_devices)?)?;
            write_atomic(&dir.spec(), &serde_json::to_vec_pretty(&written_spec)?)
        })
        .await
        .map_err(|source| VmError::Persist { name: entry.name.clone(), source })?;
        {
            let mut status = entry.status();
            status.spec = spec;
            status.devices = devices;
        }
        // A reserved warm QEMU may no longer fit; the next start is cold either way.
        self.inner.warm.release(&entry.name);
        info!(vm = %entry.name, "spec updated");
        Ok(entry.info())
    }

    /// Removes a VM and its directory. Valid when stopped or crashed.
    pub async fn delete(&self, name: &str) -> Result<(), VmError> {
        let entry = self.entry(name)?;
        let _membership = self.inner.membership.lock().await;
        let _op = entry.op.lock().await;
        entry.require("delete", "stopped", &[VmState::Stopped, VmState::Crashed])?;
        let dir = entry.dir.path().to_owned();
        let graveyard = self.inner.vms_dir.join(format!(".deleted-{name}-{}", entry.status().spec.uuid()));
        // Renaming first makes the delete atomic: a crash halfway leaves a hidden directory, never half a VM.
        blocking(move || {
            fs::rename(&dir, &graveyard)?;
            fs::remove_dir_all(&graveyard)
        })
        .await
        .map_err(|source| VmError::Persist { name: name.to_owned(), source })?;
        self.vms_write().remove(name);
        self.inner.warm.release(name);
        info!(vm = %name, "deleted");
        self.emit(&entry, None, Some(entry.state()), "deleted");
        Ok(())
    }

    /// Stops a VM. Valid when running or paused. Graceful: the ACPI power button (skipped when paused, since a
    /// paused guest cannot answer it), `timeout` for the guest to power off, then QMP `quit`, then SIGKILL.
    /// Force: SIGKILL at once; valid in any state with a QEMU, including during a graceful stop.
    pub async fn stop(&self, name: &str, force: bool, timeout: Option<Duration>) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        if force {
            let runtime = entry.runtime().ok_or_else(|| VmError::WrongState {
                name: name.to_owned(),
                state: entry.state(),
                operation: "force stop",
                needs: "running, paused or stopping",
            })?;
            runtime.stop_requested.store(true, Ordering::SeqCst);
            if matches!(entry.state(), VmState::Running | VmState::Paused) {
                self.set_state(&entry, VmState::Stopping, "force stop requested").await;
            }
            kill(&runtime);
            entry.wait_inactive(None).await;
            return Ok(entry.info());
        }

        let _op = entry.op.lock().await;
        let state = entry.require("stop", "running or paused", &[VmState::Running, VmState::Paused])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        runtime.stop_requested.store(true, Ordering::SeqCst);
        self.set_state(&entry, VmState::Stopping, "stop requested").await;
        let timeout = timeout.unwrap_or(self.inner.config.stop_timeout);
        let mut stopped = false;
        if state == VmState::Running {
            match qmp_ops::simple(&runtime.qmp, Simple::SystemPowerdown, None).await {
                Ok(_) => stopped = entry.wait_inactive(Some(timeout)).await,
                Err(e) => warn!(vm = %name, error = %e, "system_powerdown failed"),
            }
            if !stopped {
                info!(vm = %name, ?timeout, "guest did not power off; quitting QEMU");
            }
        }
        if !stopped {
            let _ = qmp_ops::simple(&runtime.qmp, Simple::Quit, Some(QUIT_GRACE)).await;
            stopped = entry.wait_inactive(Some(QUIT_GRACE)).await;
        }
        if !stopped {
            warn!(vm = %name, "QEMU ignored quit; killing it");
            kill(&runtime);
            entry.wait_inactive(None).await;
        }
        Ok(entry.info())
    }

    /// Reboots with the guest's cooperation: the power button with QEMU told to pause instead of exiting, then a
    /// reset and resume. A guest that ignores the button for the stop timeout is reset instead. Valid when running.
    pub async fn reboot(&self, name: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        entry.require("reboot", "running", &[VmState::Running])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        let qmp = &runtime.qmp;
        let mut events = qmp.subscribe();
        qmp_ops::set_shutdown_action(qmp, ShutdownAction::pause).await.map_err(entry.qmp_error("set-action"))?;
        let powered_off = async {
            qmp_ops::simple(qmp, Simple::SystemPowerdown, None).await.ok()?;
            loop {
                match events.recv().await {
                    Ok(Event::Qemu(event)) if matches!(event.typed(), QemuEvent::Shutdown { .. }) => return Some(()),
                    Ok(Event::Closed { .. }) | Err(broadcast::error::RecvError::Closed) => return None,
                    _ => {}
                }
            }
        };
        let cooperative =
            matches!(tokio::time::timeout(self.inner.config.stop_timeout, powered_off).await, Ok(Some(())));
        let restore = qmp_ops::set_shutdown_action(qmp, ShutdownAction::poweroff).await;
        qmp_ops::simple(qmp, Simple::SystemReset, None).await.map_err(entry.qmp_error("system_reset"))?;
        if cooperative {
            qmp_ops::simple(qmp, Simple::Cont, None).await.map_err(entry.qmp_error("cont"))?;
        }
        // The SHUTDOWN of the reboot must not make a later crash look like a power-off.
        runtime.guest_shutdown.store(false, Ordering::SeqCst);
        restore.map_err(entry.qmp_error("set-action"))?;
        let reason = if cooperative { "rebooted" } else { "reset: the guest ignored the power button" };
        info!(vm = %name, reason, "reboot");
        self.emit(&entry, Some(VmState::Running), Some(VmState::Running), reason);
        Ok(entry.info())
    }

    /// Hard reset, like the reset button. Valid when running or paused; the state is kept.
    pub async fn reset(&self, name: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let state = entry.require("reset", "running or paused", &[VmState::Running, VmState::Paused])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        qmp_ops::simple(&runtime.qmp, Simple::SystemReset, None).await.map_err(entry.qmp_error("system_reset"))?;
        self.emit(&entry, Some(state), Some(state), "reset");
        Ok(entry.info())
    }

    /// Stops the vCPUs. Valid when running.
    pub async fn pause(&self, name: &str) -> Result<VmInfo, VmError> {
        self.vcpus(name, "pause", VmState::Running, Simple::Stop, VmState::Paused).await
    }

    /// Restarts the vCPUs. Valid when paused.
    pub async fn resume(&self, name: &str) -> Result<VmInfo, VmError> {
        self.vcpus(name, "resume", VmState::Paused, Simple::Cont, VmState::Running).await
    }

    async fn vcpus(
        &self,
        name: &str,
        operation: &'static str,
        from: VmState,
        command: Simple,
        to: VmState,
    ) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let needs = if from == VmState::Running { "running" } else { "paused" };
        entry.require(operation, needs, &[from])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        qmp_ops::simple(&runtime.qmp, command, None).await.map_err(entry.qmp_error(command.name()))?;
        self.set_state(&entry, to, &format!("{operation}d")).await;
        Ok(entry.info())
    }

    /// The serial console of a VM whose QEMU runs.
    pub fn console(&self, name: &str) -> Result<SerialConsole, VmError> {
        let entry = self.entry(name)?;
        let runtime = entry.runtime().ok_or_else(|| VmError::WrongState {
            name: name.to_owned(),
            state: entry.state(),
            operation: "console",
            needs: "running or paused",
        })?;
        runtime.console.clone().ok_or_else(|| VmError::NoConsole { name: name.to_owned() })
    }
}

pub(super) fn kill(runtime: &Runtime) {
    if let Err(e) = runtime.process.kill() {
        error!(pid = runtime.process.pid(), error = %e, "cannot kill QEMU");
    }
}
