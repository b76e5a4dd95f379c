//! Typed commands beyond `qapi-qmp`'s, and where QEMU 7.2 and `qapi-qmp` disagree.
//!
//! `qapi-qmp` 0.15 is generated from QEMU 9.1's schema. Every command `vmm` sends goes through its types except
//! the places listed here, each of which says why:
//!
//! - [`QueryMachines`]: 9.1's `MachineInfo` requires `acpi` (added in QEMU 8.0), which 7.2 does not send, so
//!   `qapi_qmp::query_machines`' reply never decodes on 7.2. This is 7.2's shape.
//! - [`QueryBlockstats`]: 9.1's `BlockDeviceStats` requires the zoned-device counters (`zone_append_*`, added in
//!   QEMU 8.1), which 7.2 does not send. This is the subset of 7.2's members that metrics read.
//!
//! And what the schema leaves untyped on purpose: `device_add` takes any driver property (`'gen': false` in
//! QEMU's schema, an open `arguments` map in `qapi_qmp::device_add`). `vmm` renders a device, a block node or a
//! netdev once as JSON, for the command line (`-device`, `-blockdev '{..}'`, `-netdev`) and for QMP alike;
//! [`device_add`], [`blockdev_add`] and [`netdev_add`] turn such an object into the typed command, refusing one
//! the 9.1 types would not carry whole (`vmm`'s golden tests check that nothing is lost on the way).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;

/// `query-machines` as QEMU 7.2 answers it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMachines {}

impl qapi_spec::Command for QueryMachines {
    type Ok = Vec<MachineInfo>;
    const NAME: &'static str = "query-machines";
    const ALLOW_OOB: bool = false;
}

/// One machine type of `query-machines`, QEMU 7.2's members.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// The versioned name, e.g. `pc-q35-7.2`.
    pub name: String,
    /// The unversioned alias pointing at it, e.g. `q35`.
    #[serde(default)]
    pub alias: Option<String>,
    /// Whether this is the machine QEMU uses without `-machine`.
    #[serde(default)]
    pub is_default: bool,
    /// The most vCPUs the machine takes.
    pub cpu_max: i64,
    /// Whether vCPUs can be hot-plugged.
    pub hotpluggable_cpus: bool,
    /// Whether NUMA nodes can have memory.
    pub numa_mem_supported: bool,
    /// Deprecated machine types still start, with a warning.
    pub deprecated: bool,
    /// The CPU model without `-cpu`.
    #[serde(default)]
    pub default_cpu_type: Option<String>,
    /// The id of the default RAM backend.
    #[serde(default)]
    pub default_ram_id: Option<String>,
}

/// `query-blockstats` as QEMU 7.2 answers it: one entry per block backend (or per named node with
/// `query_nodes`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryBlockstats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_nodes: Option<bool>,
}

impl qapi_spec::Command for QueryBlockstats {
    type Ok = Vec<BlockStats>;
    const NAME: &'static str = "query-blockstats";
    const ALLOW_OOB: bool = false;
}

/// One entry of `query-blockstats`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStats {
    /// The backend's name; empty for `-blockdev` backends, which only have a `qdev` path.
    #[serde(default)]
    pub device: Option<String>,
    /// The QOM path of the device the backend is attached to.
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    pub stats: BlockDeviceStats,
}

/// The I/O counters of one block backend, since QEMU started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
}

/// The typed `device_add` of a device rendered as a JSON object (`driver`, `id`, `bus` and any properties).
pub fn device_add(object: &Value) -> Result<qapi_qmp::device_add, Error> {
    let invalid = |why: &str| Error::Encode {
        command: "device_add".to_owned(),
        source: serde::de::Error::custom(format!("{why}: {object}")),
    };
    let Value::Object(map) = object else { return Err(invalid("not a JSON object")) };
    let mut props: Map<String, Value> = map.clone();
    let driver = match props.remove("driver") {
        Some(Value::String(driver)) => driver,
        _ => return Err(invalid("no `driver` string")),
    };
    let mut text = |key: &str| match props.remove(key) {
        None => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(invalid(&format!("`{key}` is not a string"))),
    };
    let id = text("id")?;
    let bus = text("bus")?;
    Ok(qapi_qmp::device_add::new(driver, id, bus, props))
}

/// The typed `blockdev-add` of a block node rendered as a JSON object.
pub fn blockdev_add(object: &Value) -> Result<qapi_qmp::blockdev_add, Error> {
    typed::<qapi_qmp::BlockdevOptions>("blockdev-add", object).map(qapi_qmp::blockdev_add)
}

/// The typed `netdev_add` of a netdev rendered as a JSON object.
pub fn netdev_add(object: &Value) -> Result<qapi_qmp::netdev_add, Error> {
    typed::<qapi_qmp::Netdev>("netdev_add", object).map(qapi_qmp::netdev_add)
}

/// `object` as `T`, refusing what `T` would not carry whole: serde skips members a type does not know, and a
/// block node option dropped on the way would be a disk that behaves differently than rendered.
fn typed<T: Serialize + serde::de::DeserializeOwned>(command: &str, object: &Value) -> Result<T, Error> {
    let encode = |source| Error::Encode { command: command.to_owned(), source };
    let value: T = serde_json::from_value(object.clone()).map_err(encode)?;
    let back = serde_json::to_value(&value).map_err(encode)?;
    if !same_members(object, &back) {
        return Err(encode(serde::de::Error::custom(format!(
            "qapi-qmp's type does not carry every member of {object} (it keeps {back})"
        ))));
    }
    Ok(value)
}

/// Whether `a` and `b` are the same JSON, ignoring member order.
fn same_members(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter().all(|(key, value)| b.get(key).is_some_and(|other| same_members(value, other)))
        }
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_members(a, b)),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::encode_arguments;
    use serde_json::json;

    #[test]
    fn query_machines_decodes_qemu_7_2() {
        // Captured from Debian's QEMU 7.2 (no `acpi`, which qapi-qmp's MachineInfo requires).
        let reply = json!([
            {"hotpluggable-cpus": true, "name": "pc-q35-7.2", "numa-mem-supported": false, "default-cpu-type":
             "qemu64-x86_64-cpu", "cpu-max": 288, "deprecated": false, "default-ram-id": "pc.ram", "alias": "q35"},
            {"hotpluggable-cpus": true, "name": "pc-i440fx-7.2", "numa-mem-supported": false, "is-default": true,
             "cpu-max": 255, "deprecated": false, "alias": "pc", "default-ram-id": "pc.ram"}
        ]);
        let machines: Vec<MachineInfo> = serde_json::from_value(reply.clone()).unwrap();
        assert_eq!(machines[0].name, "pc-q35-7.2");
        assert_eq!(machines[0].alias.as_deref(), Some("q35"));
        assert!(machines[1].is_default && !machines[0].is_default);
        assert!(serde_json::from_value::<Vec<qapi_qmp::MachineInfo>>(reply).is_err(), "qapi-qmp learned 7.2's shape");
        assert_eq!(encode_arguments(&QueryMachines {}).unwrap(), None);
    }

    #[test]
    fn query_blockstats_decodes_qemu_7_2() {
        // Captured from Debian's QEMU 7.2 (a -blockdev qcow2 node on a file node, under virtio-blk-pci): no
        // `zone_append_*`, which qapi-qmp's BlockDeviceStats requires.
        let stats = json!({"unmap_operations": 0, "unmap_merged": 0, "flush_total_time_ns": 0, "wr_highest_offset": 0,
            "wr_total_time_ns": 7, "failed_wr_operations": 0, "failed_rd_operations": 0, "wr_merged": 0,
            "wr_bytes": 4096, "timed_stats": [], "failed_unmap_operations": 0, "failed_flush_operations": 0,
            "account_invalid": true, "rd_total_time_ns": 9, "invalid_unmap_operations": 0, "flush_operations": 1,
            "wr_operations": 1, "unmap_bytes": 0, "rd_merged": 0, "rd_bytes": 512, "unmap_total_time_ns": 0,
            "invalid_flush_operations": 0, "account_failed": true, "rd_operations": 2, "invalid_wr_operations": 0,
            "invalid_rd_operations": 0});
        let reply = json!([{"device": "", "parent": {"stats": stats.clone(), "node-name": "f0"}, "stats": stats,
            "node-name": "disk0", "qdev": "/machine/peripheral/vd0/virtio-backend"}]);
        let blocks: Vec<BlockStats> = serde_json::from_value(reply.clone()).unwrap();
        assert_eq!(blocks[0].qdev.as_deref(), Some("/machine/peripheral/vd0/virtio-backend"));
        assert_eq!(blocks[0].node_name.as_deref(), Some("disk0"));
        let expected = BlockDeviceStats {
            rd_bytes: 512,
            wr_bytes: 4096,
            rd_operations: 2,
            wr_operations: 1,
            flush_operations: 1,
            rd_total_time_ns: 9,
            wr_total_time_ns: 7,
        };
        assert_eq!(blocks[0].stats, expected);
        assert!(serde_json::from_value::<Vec<qapi_qmp::BlockStats>>(reply).is_err(), "qapi-qmp learned 7.2's shape");
        assert_eq!(encode_arguments(&QueryBlockstats::default()).unwrap(), None);
    }

    #[test]
    fn device_add_keeps_every_property() {
        let object = json!({"driver": "virtio-blk-pci", "id": "virtio-disk0", "bus": "rp1", "drive": "disk0",
                            "write-cache": true, "bootindex": 1});
        let command = device_add(&object).unwrap();
        assert_eq!(encode_arguments(&command).unwrap().unwrap(), object);
        assert!(device_add(&json!({"id": "x"})).is_err());
        assert!(device_add(&json!({"driver": "x", "bus": 3})).is_err());
        assert!(device_add(&json!("virtio-blk-pci")).is_err());
    }

    #[test]
    fn blockdev_and_netdev_objects_type_whole() {
        for object in [
            json!({"driver": "file", "node-name": "disk0-file", "filename": "/var/lib/a.raw", "aio": "io_uring",
                   "cache": {"direct": true, "no-flush": false}, "read-only": false, "discard": "unmap"}),
            json!({"driver": "qcow2", "node-name": "disk0", "file": "disk0-file",
                   "cache": {"direct": true, "no-flush": false}, "read-only": false, "discard": "unmap"}),
        ] {
            assert_eq!(encode_arguments(&blockdev_add(&object).unwrap()).unwrap().unwrap(), object);
        }
        for object in [
            json!({"type": "user", "id": "net0"}),
            json!({"type": "tap", "id": "net1", "fd": "net1-q0"}),
            json!({"type": "tap", "id": "net1", "fds": "net1-q0:net1-q1"}),
        ] {
            assert_eq!(encode_arguments(&netdev_add(&object).unwrap()).unwrap().unwrap(), object);
        }
    }

    #[test]
    fn members_the_types_would_drop_are_refused() {
        let err =
            blockdev_add(&json!({"driver": "file", "node-name": "a", "filename": "/a", "made-up": 1})).unwrap_err();
        assert!(err.to_string().contains("blockdev-add"), "{err}");
        assert!(netdev_add(&json!({"type": "teleport", "id": "n"})).is_err());
    }
}
