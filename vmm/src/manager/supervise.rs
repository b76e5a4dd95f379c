//! Supervision: reattaching to the QEMUs that outlived a daemon restart, the task that watches each QEMU (its QMP
//! events and its exit through pidfd), and what a VM becomes when its QEMU is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use qx_common::blocking;
use qx_qmp::qapi_qmp::ShutdownAction;
use qx_qmp::{Event, QemuEvent, QmpClient};
use tokio::sync::broadcast;
use tracing::{error, info, warn, Instrument};

use super::{qmp_options, Entry, Runtime, VmManager};
use crate::console::SerialConsole;
use crate::device_tree::DeviceTree;
use crate::guest_agent::{agent_options, GuestAgent, AGENT_PORT_ID};
use crate::persist::{StateRecord, VmDir};
use crate::process::{read_pidfile, QemuProcess};
use crate::qmp_ops::{self, Found};
use crate::spec::VmSpec;
use crate::state::VmState;

impl VmManager {
    pub(super) async fn load_one(&self, name: String, spec: VmSpec, devices: DeviceTree, record: StateRecord) {
        let dir = VmDir::new(&self.inner.vms_dir, &name);
        let was = record.state;
        let entry = Entry::new(name.clone(), dir.clone(), spec.clone(), devices, record.clone());
        self.vms_write().insert(name.clone(), Arc::clone(&entry));
        if !was.is_active() {
            return;
        }
        if was == VmState::Incoming {
            return self.stale_incoming(&entry, record.pid).await;
        }
        if was == VmState::Migrating {
            self.migration_cut_short(&entry).await;
        }
        let span = tracing::info_span!("vm", vm = %name);
        async {
            let pid = read_pidfile(&dir.pidfile()).or(record.pid);
            let process = match pid.map(|pid| QemuProcess::adopt(pid, spec.uuid(), &self.inner.config.host)) {
                Some(Ok(Some(process))) => process,
                Some(Err(e)) => {
                    error!(error = %e, "cannot watch the QEMU of this VM");
                    self.lost(&entry, format!("QEMU could not be watched after the restart: {e}"), false).await;
                    return;
                }
                _ => {
                    info!("QEMU exited while qx-node was not running");
                    self.lost(&entry, "QEMU exited while qx-node was not running".into(), true).await;
                    return;
                }
            };
            match self.reattach(&entry, process).await {
                Ok(state) => info!(pid = ?pid, %state, "reattached to running QEMU"),
                Err(reason) => {
                    error!(%reason, "QEMU runs but cannot be driven; it is left running");
                    self.lost(&entry, reason, false).await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn reattach(&self, entry: &Arc<Entry>, process: QemuProcess) -> Result<VmState, String> {
        let qmp = QmpClient::connect(entry.dir.qmp_socket(), qmp_options())
            .await
            .map_err(|e| format!("QMP does not answer: {e}"))?;
        let status = qmp.query_status().await.map_err(|e| format!("query-status failed: {e}"))?;
        let state = match qmp_ops::found(&status.state, entry.state()) {
            Found::Keep(state) => state,
            Found::Discard(why) => {
                info!(qemu = %status.state, why, "stopping a QEMU whose guest does not run here");
                let _ = process.kill();
                process.exited().await;
                self.lost(entry, format!("QEMU was {}: {why}", status.state), true).await;
                return Ok(VmState::Stopped);
            }
        };
        // An earlier daemon may have died halfway through a reboot, which pauses on guest shutdown.
        if let Err(e) = qmp_ops::set_shutdown_action(&qmp, ShutdownAction::poweroff).await {
            warn!(error = %e, "cannot reset the shutdown action");
        }
        let console = if entry.status().spec.serial {
            Some(
                SerialConsole::attach(&entry.dir.serial_socket(), &entry.dir.console_log())
                    .await
                    .map_err(|e| format!("serial console: {e}"))?,
            )
        } else {
            None
        };
        // The cgroup the QEMU started in is kept (its limits set again); one started before cgroups gets one.
        let spec = entry.status().spec.clone();
        self.place_in_cgroup(&spec, process.pid()).await;
        let runtime = Arc::new(Runtime {
            process,
            qmp,
            console,
            agent: GuestAgent::new(entry.dir.qga_socket(), agent_options()),
            stop_requested: AtomicBool::new(false),
            guest_shutdown: AtomicBool::new(false),
        });
        {
            let mut status = entry.status();
            // A daemon killed between StartVm's answer and the deferred `running` write left no pid on disk.
            status.record.pid = Some(runtime.process.pid());
            status.runtime = Some(Arc::clone(&runtime));
        }
        let reason = format!("reattached after a qx-node restart (QEMU reports {})", status.state);
        self.set_state(entry, state, &reason).await;
        self.supervise(Arc::clone(entry), Arc::clone(&runtime));
        self.reconcile_devices(entry, &runtime).await;
        // The port may have opened while no daemon watched: ask the agent instead of waiting for an event.
        if state == VmState::Running {
            let probed = Arc::clone(&runtime);
            tokio::spawn(async move { probed.agent.probe_and_thaw().await }.instrument(tracing::Span::current()));
        }
        Ok(state)
    }

    /// The VM's QEMU is gone or unusable after a restart. A QEMU that still runs keeps its sockets and taps.
    async fn lost(&self, entry: &Arc<Entry>, reason: String, qemu_gone: bool) {
        if !qemu_gone {
            // `crashed` with the pid kept: start refuses while that QEMU lives (see `start`).
            self.set_state(entry, VmState::Crashed, &reason).await;
            return;
        }
        let dir = entry.dir.clone();
        blocking(move || dir.remove_runtime_files()).await;
        let spec = entry.status().spec.clone();
        self.remove_cgroup(&spec).await;
        self.detach_networks(entry).await;
        {
            let mut status = entry.status();
            status.record.pid = None;
            status.record.started_at_unix = None;
        }
        self.set_state(entry, VmState::Stopped, &reason).await;
    }

    /// Watches one QEMU until it exits: follows pause/resume done behind our back and records how it ended.
    pub(super) fn supervise(&self, entry: Arc<Entry>, runtime: Arc<Runtime>) {
        let manager = self.clone();
        // A root span: the supervisor outlives the request that started the VM.
        let span = tracing::info_span!(parent: None, "vm", vm = %entry.name);
        tokio::spawn(
            async move {
                let mut events = runtime.qmp.subscribe();
                let exited = runtime.process.exited();
                tokio::pin!(exited);
                let how = loop {
                    tokio::select! {
                        how = &mut exited => break how,
                        event = events.recv() => match event {
                            Ok(Event::Qemu(event)) => {
                                manager.on_device_event(&entry, &runtime, &event);
                                manager.on_qmp_event(&entry, &runtime, event.typed()).await
                            }
                            Ok(Event::Closed { .. }) | Err(broadcast::error::RecvError::Closed) => {
                                // QMP is gone; only the process exit is left to wait for.
                                break (&mut exited).await;
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                        },
                    }
                };
                manager.on_exit(&entry, &runtime, how).await;
            }
            .instrument(span),
        );
    }

    async fn on_qmp_event(&self, entry: &Arc<Entry>, runtime: &Arc<Runtime>, event: QemuEvent) {
        match event {
            QemuEvent::Shutdown { .. } => runtime.guest_shutdown.store(true, Ordering::SeqCst),
            QemuEvent::VserportChange { id, open } if id == AGENT_PORT_ID => {
                if open {
                    // qemu-ga opened its port; its version comes with the first answer. Not awaited here: the
                    // supervisor must not wait for a guest.
                    let runtime = Arc::clone(runtime);
                    tokio::spawn(async move { runtime.agent.probe().await }.instrument(tracing::Span::current()));
                } else {
                    runtime.agent.port_closed();
                }
            }
            // Pause and resume that qx-node did not ask for (monitor, I/O error, watchdog). Operations in progress
            // set the state themselves, and events may arrive after them, so ask QEMU for the truth.
            QemuEvent::Stop | QemuEvent::Resume => {
                let Ok(_idle) = entry.op.try_lock() else {
                    return;
                };
                if !matches!(entry.state(), VmState::Running | VmState::Paused) {
                    return;
                }
                let Ok(status) = runtime.qmp.query_status().await else {
                    return;
                };
                let state = if status.state.is_running() { VmState::Running } else { VmState::Paused };
                self.set_state(entry, state, &format!("QEMU reports {}", status.state)).await;
            }
            _ => {}
        }
    }

    async fn on_exit(&self, entry: &Arc<Entry>, runtime: &Arc<Runtime>, how: Option<String>) {
        let how = how.unwrap_or_else(|| "exited".to_owned());
        if entry.state() == VmState::Incoming {
            // The source still owns the VM: this node's copy goes with its QEMU.
            return self.incoming_ended(entry, &format!("the incoming QEMU {how}")).await;
        }
        let (state, reason) = if runtime.guest_shutdown.load(Ordering::SeqCst) {
            (VmState::Stopped, "the guest powered off".to_owned())
        } else if runtime.stop_requested.load(Ordering::SeqCst) {
            (VmState::Stopped, format!("stopped: QEMU {how}"))
        } else {
            error!(%how, "QEMU exited unexpectedly");
            (VmState::Crashed, format!("QEMU {how} unexpectedly"))
        };
        let dir = entry.dir.clone();
        blocking(move || dir.remove_runtime_files()).await;
        let spec = entry.status().spec.clone();
        self.remove_cgroup(&spec).await;
        self.detach_networks(entry).await;
        {
            let mut status = entry.status();
            if status.runtime.as_ref().is_some_and(|r| Arc::ptr_eq(r, runtime)) {
                status.runtime = None;
            }
            status.record.pid = None;
            status.record.started_at_unix = None;
        }
        info!(%state, %how, "QEMU exited");
        self.set_state(entry, state, &reason).await;
    }
}
