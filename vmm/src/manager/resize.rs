//! Online disk growth: a running or paused VM's disk grows through QMP `block_resize` on its format node (qcow2
//! writes the new virtual size into its header, raw truncates the file), and the guest sees the new capacity at
//! once: virtio-blk raises a config change, Linux re-reads the size ("capacity change" in its log). `block_resize`
//! and `query-named-block-nodes` have the same shape in QEMU 7.2 and in `qapi-qmp`'s 9.1 schema, so both are typed.
//! A stopped VM's disk is only a file: whoever owns it (a storage pool) resizes it offline.

use qx_qmp::qapi_qmp;
use tracing::info;

use super::{VmError, VmInfo, VmManager};
use crate::spec::ValidationErrors;
use crate::state::VmState;

/// The sector size the guest counts its disk in.
const SECTOR: u64 = 512;

impl VmManager {
    /// Grows disk `disk` (its id) of VM `name` to `size` bytes, without a reboot. Valid when running or paused.
    /// Refused, naming the field and value: a size below the disk's current one (a disk in use never shrinks: the
    /// guest's data past the end would be cut), a size that is not whole sectors, a read-only disk. The same size
    /// changes nothing.
    pub async fn grow_disk(&self, name: &str, disk: &str, size: u64) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let wrong_state = || VmError::WrongState {
            name: name.to_owned(),
            state: entry.state(),
            operation: "grow a disk",
            needs: "running or paused",
        };
        entry.require("grow a disk", "running or paused", &[VmState::Running, VmState::Paused])?;
        let runtime = entry.runtime().ok_or_else(wrong_state)?;
        let no_disk = || VmError::NoDevice { name: name.to_owned(), kind: "disk", id: disk.to_owned() };
        let (read_only, node) = {
            let status = entry.status();
            let spec = status.spec.disk(disk).ok_or_else(no_disk)?;
            (spec.read_only, status.devices.disk(disk).ok_or_else(no_disk)?.node.clone())
        };
        if read_only {
            return Err(ValidationErrors::one("disk", disk, "is read-only; only a writable disk can grow").into());
        }
        let wanted = i64::try_from(size).ok().filter(|_| size % SECTOR == 0).ok_or_else(|| {
            ValidationErrors::one("size", size, format!("is not a whole number of {SECTOR}-byte sectors"))
        })?;
        let nodes = runtime
            .qmp
            .execute(qapi_qmp::query_named_block_nodes { flat: Some(true) })
            .await
            .map_err(entry.qmp_error("query-named-block-nodes"))?;
        let current = nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(node.as_str()))
            .map(|n| n.image.base.virtual_size)
            .ok_or_else(no_disk)?;
        if wanted < current {
            let problem = format!("is below the disk's current size {current}; a disk in use cannot shrink");
            return Err(ValidationErrors::one("size", size, problem).into());
        }
        if wanted > current {
            let resize = qapi_qmp::block_resize { device: None, node_name: Some(node), size: wanted };
            runtime.qmp.execute(resize).await.map_err(entry.qmp_error("block_resize"))?;
            info!(vm = %name, disk, from = current, to = size, "disk grown online");
        }
        Ok(entry.info())
    }
}
