//! `/metrics`: the node's figures for Prometheus, gathered when scraped. Node facts and VM counts come from
//! [`Node::info`], per-VM state, vCPUs and memory from the VM list, CPU time and resident memory from the QEMU
//! process's threads in `/proc` ([`procfs`]), block I/O from `query-blockstats`, network I/O from the VM's taps,
//! and RPC counts and latencies from the layer on the gRPC routers ([`rpc`]). The exposition is written by
//! prometheus-client (OpenMetrics) and served in the classic text format to scrapers that do not ask for
//! OpenMetrics ([`classic`]), so `promtool check metrics` passes it.
//!
//! Not for: history. A scrape says what holds now; Prometheus keeps the series.
//!
//! ```no_run
//! # async fn demo(node: &qx_agent::node::Node) {
//! let rpc = qx_agent::metrics::RpcMetrics::default();
//! let text = qx_agent::metrics::scrape(node, &rpc, qx_agent::metrics::Format::Classic).await;
//! assert!(text.contains("qx_node_cpus"));
//! # }
//! ```

pub mod classic;
pub mod procfs;
pub mod rpc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use qx_vmm::spec::NicKind;
use qx_vmm::{DiskStats, HostRoot, VmInfo, VmState};
use std::sync::atomic::AtomicU64;
use tracing::debug;

pub use rpc::RpcMetrics;

use crate::node::Node;

/// Which text format a scrape gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, for scrapers whose `Accept` names `application/openmetrics-text`.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4.
    Classic,
}

impl Format {
    /// The format a request's `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Classic,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

const STATES: [VmState; 6] =
    [VmState::Stopped, VmState::Starting, VmState::Running, VmState::Paused, VmState::Stopping, VmState::Crashed];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
    qemu_version: String,
    accelerator: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmStateLabels {
    vm: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VcpuLabels {
    vm: String,
    vcpu: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    vm: String,
    disk: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NicLabels {
    vm: String,
    nic: String,
}

type FloatCounter = Counter<f64, AtomicU64>;

/// What one running VM's QEMU and taps say, read off the runtime threads.
#[derive(Debug, Default)]
struct VmFigures {
    process: Option<procfs::ProcessFigures>,
    disks: Vec<DiskStats>,
    /// (NIC id, counters) of its taps.
    nics: Vec<(String, procfs::TapCounters)>,
}

/// The exposition of everything the node knows now, in `format`.
pub async fn scrape(node: &Node, rpc: &RpcMetrics, format: Format) -> String {
    let info = node.info().await;
    let vms = node.vms().list();
    let mut figures = Vec::with_capacity(vms.len());
    for vm in &vms {
        figures.push(vm_figures(node, vm).await);
    }

    let mut registry = Registry::with_prefix("qx");
    let node_info = Family::<NodeLabels, Gauge>::default();
    node_info
        .get_or_create(&NodeLabels {
            node: info.node_name.clone(),
            qemu_version: info.qemu_version.clone(),
            accelerator: info.accel.accel.to_string(),
        })
        .set(1);
    registry.register("node_info", "The node's name, QEMU version and accelerator (always 1)", node_info);
    let gauge = |value: u64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        gauge
    };
    registry.register("node_cpus", "Logical CPUs of the host", gauge(info.cpu_count.into()));
    registry.register_with_unit("node_memory_total", "Memory of the host", Unit::Bytes, gauge(info.memory_total_bytes));
    registry.register_with_unit(
        "node_memory_available",
        "Memory the host can still give out",
        Unit::Bytes,
        gauge(info.memory_available_bytes),
    );
    registry.register("warm_pool_ready", "Warm-pool QEMUs ready for new VMs", gauge(info.warm_ready.into()));
    registry.register(
        "warm_pool_reserved",
        "Warm-pool QEMUs kept for created VMs' first start",
        gauge(info.warm_reserved.into()),
    );

    let by_state = Family::<StateLabels, Gauge>::default();
    let state = Family::<VmStateLabels, Gauge>::default();
    let vcpus = Family::<VmLabels, Gauge>::default();
    let memory = Family::<VmLabels, Gauge>::default();
    let started = Family::<VmLabels, Gauge>::default();
    let resident = Family::<VmLabels, Gauge>::default();
    let cpu = Family::<VmLabels, FloatCounter>::default();
    let vcpu = Family::<VcpuLabels, FloatCounter>::default();
    let [read_bytes, written_bytes, reads, writes, flushes]: [Family<DiskLabels, Counter>; 5] = Default::default();
    let [read_time, write_time]: [Family<DiskLabels, FloatCounter>; 2] = Default::default();
    let [rx_bytes, tx_bytes, rx_packets, tx_packets]: [Family<NicLabels, Counter>; 4] = Default::default();
    for kind in STATES {
        let count = vms.iter().filter(|vm| vm.state == kind).count();
        by_state.get_or_create(&StateLabels { state: kind.to_string() }).set(count as i64);
    }
    for (vm, figures) in vms.iter().zip(&figures) {
        let name = || vm.spec.name.clone();
        for kind in STATES {
            state.get_or_create(&VmStateLabels { vm: name(), state: kind.to_string() }).set((vm.state == kind).into());
        }
        let labels = VmLabels { vm: name() };
        vcpus.get_or_create(&labels).set(vm.spec.vcpus.into());
        memory.get_or_create(&labels).set(i64::try_from(vm.spec.memory_mib * 1024 * 1024).unwrap_or(i64::MAX));
        if let Some(at) = vm.started_at_unix.filter(|_| vm.state.is_active()) {
            started.get_or_create(&labels).set(at);
        }
        if let Some(process) = &figures.process {
            resident.get_or_create(&labels).set(i64::try_from(process.resident_bytes).unwrap_or(i64::MAX));
            cpu.get_or_create(&labels).inc_by(process.cpu_seconds);
            for (index, seconds) in &process.vcpus {
                vcpu.get_or_create(&VcpuLabels { vm: name(), vcpu: index.to_string() }).inc_by(*seconds);
            }
        }
        for stats in &figures.disks {
            let labels = DiskLabels { vm: name(), disk: stats.disk.clone() };
            let s = &stats.stats;
            read_bytes.get_or_create(&labels).inc_by(s.rd_bytes);
            written_bytes.get_or_create(&labels).inc_by(s.wr_bytes);
            reads.get_or_create(&labels).inc_by(s.rd_operations);
            writes.get_or_create(&labels).inc_by(s.wr_operations);
            flushes.get_or_create(&labels).inc_by(s.flush_operations);
            read_time.get_or_create(&labels).inc_by(s.rd_total_time_ns as f64 / 1e9);
            write_time.get_or_create(&labels).inc_by(s.wr_total_time_ns as f64 / 1e9);
        }
        for (id, tap) in &figures.nics {
            let labels = NicLabels { vm: name(), nic: id.clone() };
            // The guest receives what the host's end of the tap transmits, and the other way round.
            rx_bytes.get_or_create(&labels).inc_by(tap.tx_bytes);
            tx_bytes.get_or_create(&labels).inc_by(tap.rx_bytes);
            rx_packets.get_or_create(&labels).inc_by(tap.tx_packets);
            tx_packets.get_or_create(&labels).inc_by(tap.rx_packets);
        }
    }
    registry.register("vms", "VMs of the node by state", by_state);
    registry.register("vm_state", "1 for the state each VM is in, 0 for the others", state);
    registry.register("vm_vcpus", "vCPUs of each VM", vcpus);
    registry.register_with_unit("vm_memory", "Memory of each VM, as its spec gives it", Unit::Bytes, memory);
    registry.register_with_unit(
        "vm_start_time",
        "When each active VM's QEMU started, as a Unix time",
        Unit::Seconds,
        started,
    );
    registry.register_with_unit(
        "vm_memory_resident",
        "Host memory each running VM's QEMU holds (VmRSS)",
        Unit::Bytes,
        resident,
    );
    registry.register_with_unit("vm_cpu", "CPU time of each VM's QEMU, all threads", Unit::Seconds, cpu);
    registry.register_with_unit("vm_vcpu", "CPU time of each vCPU thread", Unit::Seconds, vcpu);
    registry.register_with_unit("vm_disk_read", "Bytes each disk read", Unit::Bytes, read_bytes);
    registry.register_with_unit("vm_disk_written", "Bytes each disk wrote", Unit::Bytes, written_bytes);
    registry.register("vm_disk_reads", "Read operations of each disk", reads);
    registry.register("vm_disk_writes", "Write operations of each disk", writes);
    registry.register("vm_disk_flushes", "Flush operations of each disk", flushes);
    registry.register_with_unit("vm_disk_read_time", "Time each disk spent reading", Unit::Seconds, read_time);
    registry.register_with_unit("vm_disk_write_time", "Time each disk spent writing", Unit::Seconds, write_time);
    registry.register_with_unit(
        "vm_network_receive",
        "Bytes each NIC on a node network received",
        Unit::Bytes,
        rx_bytes,
    );
    registry.register_with_unit("vm_network_transmit", "Bytes each NIC on a node network sent", Unit::Bytes, tx_bytes);
    registry.register("vm_network_receive_packets", "Packets each NIC on a node network received", rx_packets);
    registry.register("vm_network_transmit_packets", "Packets each NIC on a node network sent", tx_packets);
    rpc.register(&mut registry);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String does not fail");
    match format {
        Format::OpenMetrics => text,
        Format::Classic => classic::to_classic(&text),
    }
}

/// What the kernel and QEMU say about `vm` now; nothing for a VM without a QEMU.
async fn vm_figures(node: &Node, vm: &VmInfo) -> VmFigures {
    let Some(pid) = vm.pid.filter(|_| vm.state.is_active()) else { return VmFigures::default() };
    let disks = match node.vms().disk_stats(&vm.spec.name).await {
        Ok(disks) => disks,
        Err(error) => {
            debug!(vm = %vm.spec.name, error = %crate::grpc::error_chain(&error), "no block statistics");
            Vec::new()
        }
    };
    let root = HostRoot::new(&node.config().host_root);
    let taps: Vec<(String, String)> = match vm.spec.uuid {
        Some(uuid) => vm
            .spec
            .nics
            .iter()
            .zip(&vm.devices.nics)
            .filter(|(spec, _)| spec.kind == NicKind::Network)
            .map(|(_, slot)| (slot.id.clone(), qx_net::names::tap_name(&uuid, slot.tap).as_str().to_owned()))
            .collect(),
        None => Vec::new(),
    };
    let read = move || {
        let process = procfs::process(&root, pid);
        let mut interfaces = procfs::interfaces(&root);
        let nics = taps.into_iter().filter_map(|(id, tap)| Some((id, interfaces.remove(&tap)?))).collect();
        (process, nics)
    };
    let (process, nics) = tokio::task::spawn_blocking(read).await.unwrap_or_default();
    VmFigures { process, disks, nics }
}
