//! Snapshot operations: take, list, revert and delete qcow2 internal snapshots of every writable disk of a VM at
//! once, with or without the guest's memory. They run under the VM's operation lock.
//!
//! - running or paused VM: memory snapshots are QEMU 7.2's `snapshot-save` / `snapshot-load` / `snapshot-delete`
//!   jobs (the vCPUs stop while the state is written, and run again after if they ran before); disk-only snapshots
//!   are one QMP `transaction` of `blockdev-snapshot-internal-sync` for all disks, between the guest agent's
//!   `guest-fsfreeze-freeze` and `-thaw` when the agent answers (thawed on every path; "not quiesced" otherwise);
//! - stopped VM: `qemu-img snapshot -c|-a|-d` on each disk file.
//!
//! Reverting a disk-only snapshot needs the VM stopped; reverting a memory snapshot needs it running (start it,
//! then revert: the guest resumes where the snapshot was). Raw disks cannot hold internal snapshots and are
//! refused by name.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qx_common::blocking;
use qx_qmp::QmpClient;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::{Entry, Runtime, VmError, VmInfo, VmManager};
use crate::guest_agent::AgentState;
use crate::snapshot::{check_name, Snapshot, SnapshotKind, SnapshotState, SnapshotTree};
use crate::spec::{DiskFormat, FieldError, ValidationErrors};
use crate::state::VmState;

/// How often a snapshot job is asked how it is doing.
const JOB_POLL: Duration = Duration::from_millis(50);
/// A snapshot job that does not conclude in this time is reported as failed (it is left to QEMU).
const JOB_TIMEOUT: Duration = Duration::from_secs(1800);

/// The disks a snapshot covers: QEMU's format node and the file, for each writable disk.
struct SnapshotDisks {
    nodes: Vec<String>,
    files: Vec<PathBuf>,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn snapshot_failed(entry: &Entry, snapshot: &str, stage: &'static str, reason: String) -> VmError {
    VmError::Snapshot { name: entry.name.clone(), snapshot: snapshot.to_owned(), stage, source: reason.into() }
}

/// Runs a QEMU snapshot job to its end and dismisses it; Err holds QEMU's reason.
async fn run_job(qmp: &QmpClient, command: &str, mut arguments: Value, id: &str) -> Result<(), String> {
    arguments["job-id"] = json!(id);
    qmp.execute_raw(command, Some(arguments)).await.map_err(|e| qx_common::error_chain(&e))?;
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    let outcome = loop {
        let jobs = qmp.execute_raw("query-jobs", None).await.map_err(|e| qx_common::error_chain(&e))?;
        let job = jobs.as_array().and_then(|jobs| jobs.iter().find(|j| j["id"] == id)).cloned();
        match job {
            Some(job) if job["status"] == "concluded" => {
                break job["error"].as_str().map_or(Ok(()), |e| Err(e.to_owned()));
            }
            Some(_) => {}
            None => break Err(format!("job {id} vanished")),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("job {id} did not conclude within {JOB_TIMEOUT:?}"));
        }
        tokio::time::sleep(JOB_POLL).await;
    };
    if let Err(e) = qmp.execute_raw("job-dismiss", Some(json!({ "id": id }))).await {
        warn!(job = id, error = %e, "cannot dismiss the snapshot job");
    }
    outcome
}

/// `qemu-img snapshot <flag> <tag>` on each file, in order; stops at the first failure.
async fn qemu_img_snapshot(flag: &str, tag: &str, files: &[PathBuf]) -> Result<(), String> {
    for file in files {
        // 7.2's `qemu-img snapshot` takes no `-f`; `--image-opts` names the format so nothing is probed (commas
        // in the path are doubled, QEMU's option escaping).
        let opts =
            format!("driver=qcow2,file.driver=file,file.filename={}", file.display().to_string().replace(',', ",,"));
        let output = tokio::process::Command::new("qemu-img")
            .args(["snapshot", "-q", "--image-opts", flag, tag])
            .arg(opts)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run qemu-img: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!("qemu-img snapshot {flag} {tag} {}: {}", file.display(), stderr.trim()));
        }
    }
    Ok(())
}

impl VmManager {
    async fn snapshot_disks(&self, entry: &Entry) -> Result<SnapshotDisks, VmError> {
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        let spec = self.resolve_volumes(&entry.name, spec).await?;
        let mut problems = Vec::new();
        let mut disks = SnapshotDisks { nodes: Vec::new(), files: Vec::new() };
        for (i, disk) in spec.disks.iter().enumerate() {
            if disk.read_only {
                continue;
            }
            let id = disk.id.clone().unwrap_or_default();
            if disk.format != DiskFormat::Qcow2 {
                let value = disk.volume.clone().or(disk.path.as_ref().map(|p| p.display().to_string()));
                problems.push(FieldError::new(
                    format!("disks[{i}]"),
                    value.unwrap_or(id),
                    "is a raw disk, which cannot hold internal snapshots",
                ));
                continue;
            }
            let node = devices.disks.iter().find(|d| d.id == id).map(|d| d.node.clone()).unwrap_or_default();
            disks.nodes.push(node);
            disks.files.push(disk.path.clone().unwrap_or_default());
        }
        if disks.nodes.is_empty() && problems.is_empty() {
            problems.push(FieldError::new("disks", "", "the VM has no writable disk to snapshot"));
        }
        if !problems.is_empty() {
            return Err(VmError::SnapshotRefused(ValidationErrors(problems)));
        }
        Ok(disks)
    }

    async fn save_tree(&self, entry: &Entry, tree: &SnapshotTree) -> Result<(), VmError> {
        let (path, tree) = (entry.dir.snapshots(), tree.clone());
        blocking(move || tree.save(&path)).await.map_err(|source| VmError::Persist { name: entry.name.clone(), source })
    }

    async fn load_tree(&self, entry: &Entry) -> Result<SnapshotTree, VmError> {
        let path = entry.dir.snapshots();
        blocking(move || SnapshotTree::load(&path))
            .await
            .map_err(|source| VmError::Persist { name: entry.name.clone(), source })
    }

    /// The VM's snapshots. Valid in every state.
    pub async fn list_snapshots(&self, name: &str) -> Result<SnapshotTree, VmError> {
        let entry = self.entry(name)?;
        self.load_tree(&entry).await
    }

    /// Takes snapshot `snapshot` of every writable disk (and, for [`SnapshotKind::Memory`], the guest's state).
    /// Disk-only: valid when stopped, running or paused; memory: when running or paused.
    pub async fn create_snapshot(&self, name: &str, snapshot: &str, kind: SnapshotKind) -> Result<Snapshot, VmError> {
        check_name(snapshot)?;
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let state = match kind {
            SnapshotKind::DiskOnly => entry.require(
                "disk-only snapshot",
                "stopped, running or paused",
                &[VmState::Stopped, VmState::Crashed, VmState::Running, VmState::Paused],
            )?,
            SnapshotKind::Memory => {
                entry.require("memory snapshot", "running or paused", &[VmState::Running, VmState::Paused])?
            }
        };
        let mut tree = self.load_tree(&entry).await?;
        if tree.get(snapshot).is_some() {
            return Err(VmError::SnapshotExists { name: name.to_owned(), snapshot: snapshot.to_owned() });
        }
        let disks = self.snapshot_disks(&entry).await?;
        let mut record = Snapshot {
            name: snapshot.to_owned(),
            kind,
            parent: tree.current.clone(),
            created_at_unix_ms: now_unix_ms(),
            quiesced: false,
            state: SnapshotState::Creating,
        };
        tree.snapshots.push(record.clone());
        self.save_tree(&entry, &tree).await?;
        let runtime = entry.runtime().filter(|_| matches!(state, VmState::Running | VmState::Paused));
        let taken = match (&runtime, kind) {
            (Some(runtime), SnapshotKind::Memory) => {
                let arguments = json!({ "tag": snapshot, "vmstate": disks.nodes[0], "devices": disks.nodes });
                run_job(&runtime.qmp, "snapshot-save", arguments, &format!("snapshot-save-{snapshot}")).await
            }
            (Some(runtime), SnapshotKind::DiskOnly) => {
                let (taken, quiesced) = self.disk_snapshot_live(runtime, state, snapshot, &disks).await;
                record.quiesced = quiesced;
                taken
            }
            (None, _) => qemu_img_snapshot("-c", snapshot, &disks.files).await,
        };
        if let Err(reason) = taken {
            tree.remove(snapshot);
            tree.current = record.parent.clone();
            self.save_tree(&entry, &tree).await?;
            return Err(snapshot_failed(&entry, snapshot, "taking the snapshot", reason));
        }
        record.state = SnapshotState::Ready;
        if let Some(stored) = tree.snapshots.iter_mut().find(|s| s.name == snapshot) {
            *stored = record.clone();
        }
        tree.current = Some(snapshot.to_owned());
        self.save_tree(&entry, &tree).await?;
        info!(vm = %name, snapshot, kind = kind.as_str(), quiesced = record.quiesced, "snapshot taken");
        Ok(record)
    }

    /// A disk-only snapshot of a running QEMU's disks in one transaction, frozen through the guest agent when it
    /// answers. Returns the outcome and whether the guest was frozen for it.
    async fn disk_snapshot_live(
        &self,
        runtime: &Arc<Runtime>,
        state: VmState,
        snapshot: &str,
        disks: &SnapshotDisks,
    ) -> (Result<(), String>, bool) {
        let agent = &runtime.agent;
        // A paused guest cannot freeze, and one whose agent is known silent would only cost the timeout.
        let frozen = if state == VmState::Running && agent.status().state != AgentState::NotResponding {
            match agent.call(|client| async move { client.fsfreeze_freeze().await }).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(snapshot, error = %e, "cannot freeze the guest's file systems; the snapshot is not quiesced");
                    false
                }
            }
        } else {
            false
        };
        let actions: Vec<Value> = disks
            .nodes
            .iter()
            .map(|node| json!({ "type": "blockdev-snapshot-internal-sync", "data": { "device": node, "name": snapshot } }))
            .collect();
        let taken = runtime
            .qmp
            .execute_raw("transaction", Some(json!({ "actions": actions })))
            .await
            .map(drop)
            .map_err(|e| qx_common::error_chain(&e));
        if frozen {
            // Thawed whatever the transaction did: a frozen guest is an outage.
            if let Err(e) = agent.call(|client| async move { client.fsfreeze_thaw().await }).await {
                warn!(snapshot, error = %e, "thawing the guest's file systems failed");
            }
        }
        (taken, frozen)
    }

    /// Puts the VM back to snapshot `snapshot`. Memory snapshot: valid when running or paused (the guest
    /// continues from the snapshot, running if it ran). Disk-only: valid when stopped.
    pub async fn revert_snapshot(&self, name: &str, snapshot: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let mut tree = self.load_tree(&entry).await?;
        let record = tree
            .get(snapshot)
            .filter(|s| s.state == SnapshotState::Ready)
            .cloned()
            .ok_or_else(|| VmError::NoSnapshot { name: name.to_owned(), snapshot: snapshot.to_owned() })?;
        let disks = self.snapshot_disks(&entry).await?;
        let reverted = match record.kind {
            SnapshotKind::Memory => {
                entry.require(
                    "revert to a memory snapshot",
                    "running or paused",
                    &[VmState::Running, VmState::Paused],
                )?;
                let runtime = entry.runtime().ok_or_else(|| VmError::WrongState {
                    name: name.to_owned(),
                    state: entry.state(),
                    operation: "revert to a memory snapshot",
                    needs: "running or paused",
                })?;
                let arguments = json!({ "tag": snapshot, "vmstate": disks.nodes[0], "devices": disks.nodes });
                run_job(&runtime.qmp, "snapshot-load", arguments, &format!("snapshot-load-{snapshot}")).await
            }
            SnapshotKind::DiskOnly => {
                entry.require("revert to a disk-only snapshot", "stopped", &[VmState::Stopped, VmState::Crashed])?;
                qemu_img_snapshot("-a", snapshot, &disks.files).await
            }
        };
        reverted.map_err(|reason| snapshot_failed(&entry, snapshot, "reverting", reason))?;
        tree.current = Some(snapshot.to_owned());
        self.save_tree(&entry, &tree).await?;
        info!(vm = %name, snapshot, "reverted to snapshot");
        self.emit(&entry, Some(entry.state()), Some(entry.state()), &format!("reverted to snapshot {snapshot}"));
        Ok(entry.info())
    }

    /// Deletes snapshot `snapshot` from every disk; later snapshots keep their data (internal snapshots share
    /// clusters by reference count). Valid in every state but starting and stopping.
    pub async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<(), VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let state = entry.require(
            "delete a snapshot",
            "stopped, running or paused",
            &[VmState::Stopped, VmState::Crashed, VmState::Running, VmState::Paused],
        )?;
        let mut tree = self.load_tree(&entry).await?;
        let Some(record) = tree.get(snapshot).cloned() else {
            return Err(VmError::NoSnapshot { name: name.to_owned(), snapshot: snapshot.to_owned() });
        };
        let disks = self.snapshot_disks(&entry).await?;
        tree.set_state(snapshot, SnapshotState::Deleting);
        self.save_tree(&entry, &tree).await?;
        let runtime = entry.runtime().filter(|_| matches!(state, VmState::Running | VmState::Paused));
        let deleted = match &runtime {
            Some(runtime) => {
                let arguments = json!({ "tag": snapshot, "devices": disks.nodes });
                run_job(&runtime.qmp, "snapshot-delete", arguments, &format!("snapshot-delete-{snapshot}")).await
            }
            None => {
                // A cut-short create may have left the tag on some disks only: delete where it is.
                let mut result = Ok(());
                for file in &disks.files {
                    let one = qemu_img_snapshot("-d", snapshot, std::slice::from_ref(file)).await;
                    if let Err(e) = one {
                        if record.state == SnapshotState::Ready || !e.contains("not found") {
                            result = Err(e);
                        }
                    }
                }
                result
            }
        };
        deleted.map_err(|reason| snapshot_failed(&entry, snapshot, "deleting", reason))?;
        tree.remove(snapshot);
        self.save_tree(&entry, &tree).await?;
        info!(vm = %name, snapshot, "snapshot deleted");
        Ok(())
    }
}
