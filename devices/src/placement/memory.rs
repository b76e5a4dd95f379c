//! Guest memory layout: NUMA nodes (`-numa node` over one memory backend each, optionally bound to host nodes)
//! and the backing (ordinary RAM, or huge pages through `memory-backend-memfd` with `hugetlb=on`, which needs no
//! hugetlbfs mount).

use serde::{Deserialize, Serialize};

use super::CpuList;
use crate::host::HostRoot;

/// The id of the single memory backend of a VM without NUMA nodes.
const MEM_ID: &str = "qx-mem";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MemoryError {
    pub field: String,
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> MemoryError {
    MemoryError { field: field.into(), message: message.into() }
}

/// One guest NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestNumaNode {
    /// The vCPUs (by index) in this node.
    pub cpus: CpuList,
    pub memory_mib: u64,
    /// Host NUMA nodes the node's memory must come from (`policy=bind`); any node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_nodes: Option<CpuList>,
}

/// What guest memory is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MemoryBacking {
    #[default]
    Ram,
    /// Huge pages of `page_kib` (2048 or 1048576 on x86), reserved on the host beforehand (`vm.nr_hugepages`).
    HugePages { page_kib: u64 },
}

/// QEMU arguments for the memory layout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryArgs {
    /// `-machine` properties (`memory-backend=` when there are no NUMA nodes and a backend is needed).
    pub machine: Vec<String>,
    pub args: Vec<String>,
}

/// Checks the layout against the VM's size and the host, and renders it. `vcpus` and `memory_mib` are the VM's;
/// the nodes must split both exactly. Every problem names its field (`numa[1].cpus`, `hugepages`).
pub fn memory_args(
    root: &HostRoot,
    vcpus: u32,
    memory_mib: u64,
    numa: &[GuestNumaNode],
    backing: MemoryBacking,
) -> Result<MemoryArgs, Vec<MemoryError>> {
    let mut problems = Vec::new();
    check_numa(root, vcpus, memory_mib, numa, &mut problems);
    if let MemoryBacking::HugePages { page_kib } = backing {
        check_huge_pages(root, memory_mib, numa, page_kib, &mut problems);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let backend = |id: &str, size_mib: u64, host_nodes: Option<&CpuList>| {
        let mut object = match backing {
            MemoryBacking::Ram => format!("memory-backend-ram,id={id},size={size_mib}M"),
            MemoryBacking::HugePages { page_kib } => {
                format!("memory-backend-memfd,id={id},size={size_mib}M,hugetlb=on,hugetlbsize={page_kib}K")
            }
        };
        if let Some(nodes) = host_nodes {
            for (a, b) in nodes.ranges() {
                object.push_str(&if a == b { format!(",host-nodes={a}") } else { format!(",host-nodes={a}-{b}") });
            }
            object.push_str(",policy=bind");
        }
        ["-object".to_owned(), object]
    };
    let mut out = MemoryArgs::default();
    if numa.is_empty() {
        if backing != MemoryBacking::Ram {
            out.args.extend(backend(MEM_ID, memory_mib, None));
            out.machine.push(format!("memory-backend={MEM_ID}"));
        }
        return Ok(out);
    }
    for (i, node) in numa.iter().enumerate() {
        let id = format!("{MEM_ID}-node{i}");
        out.args.extend(backend(&id, node.memory_mib, node.host_nodes.as_ref()));
        let mut spec = format!("node,nodeid={i},memdev={id}");
        for (a, b) in node.cpus.ranges() {
            spec.push_str(&if a == b { format!(",cpus={a}") } else { format!(",cpus={a}-{b}") });
        }
        out.args.extend(["-numa".to_owned(), spec]);
    }
    Ok(out)
}

fn check_numa(root: &HostRoot, vcpus: u32, memory_mib: u64, numa: &[GuestNumaNode], problems: &mut Vec<MemoryError>) {
    if numa.is_empty() {
        return;
    }
    let mut seen = CpuList::default();
    for (i, node) in numa.iter().enumerate() {
        if node.cpus.is_empty() {
            problems.push(problem(format!("numa[{i}].cpus"), "is empty"));
        }
        for cpu in node.cpus.ids() {
            if cpu >= vcpus {
                problems.push(problem(format!("numa[{i}].cpus"), format!("vCPU {cpu} is not below vcpus {vcpus}")));
            } else if seen.contains(cpu) {
                problems.push(problem(format!("numa[{i}].cpus"), format!("vCPU {cpu} is in an earlier node too")));
            }
        }
        seen = seen.ids().chain(node.cpus.ids()).collect();
        if node.memory_mib == 0 {
            problems.push(problem(format!("numa[{i}].memory_mib"), "0 is below the minimum 1"));
        }
        for host_node in node.host_nodes.iter().flat_map(CpuList::ids) {
            if !root.path(format!("/sys/devices/system/node/node{host_node}")).exists() {
                problems.push(problem(
                    format!("numa[{i}].host_nodes"),
                    format!("host NUMA node {host_node} does not exist on this host"),
                ));
            }
        }
    }
    let missing: CpuList = (0..vcpus).filter(|c| !seen.contains(*c)).collect();
    if !missing.is_empty() {
        problems.push(problem("numa", format!("vCPUs {missing} are in no node")));
    }
    let total: u64 = numa.iter().map(|n| n.memory_mib).sum();
    if total != memory_mib {
        problems.push(problem("numa", format!("the nodes hold {total} MiB, the VM's memory_mib is {memory_mib}")));
    }
}

fn check_huge_pages(
    root: &HostRoot,
    memory_mib: u64,
    numa: &[GuestNumaNode],
    page_kib: u64,
    problems: &mut Vec<MemoryError>,
) {
    let dir = root.path(format!("/sys/kernel/mm/hugepages/hugepages-{page_kib}kB"));
    if !dir.exists() {
        problems.push(problem(
            "hugepages",
            format!("this host has no {page_kib} kB huge pages ({} does not exist)", dir.display()),
        ));
        return;
    }
    let sizes: Vec<u64> = if numa.is_empty() { vec![memory_mib] } else { numa.iter().map(|n| n.memory_mib).collect() };
    for size in &sizes {
        if (size * 1024) % page_kib != 0 {
            problems.push(problem("hugepages", format!("{size} MiB is not a multiple of the {page_kib} kB page size")));
        }
    }
    let needed: u64 = sizes.iter().map(|size| (size * 1024).div_ceil(page_kib)).sum();
    let free_path = dir.join("free_hugepages");
    let free: u64 = std::fs::read_to_string(&free_path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if free < needed {
        problems.push(problem(
            "hugepages",
            format!(
                "the VM needs {needed} free {page_kib} kB huge pages and the host has {free} ({}); reserve more \
                 with the vm.nr_hugepages sysctl",
                free_path.display()
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cpus: &str, memory_mib: u64, host_nodes: Option<&str>) -> GuestNumaNode {
        GuestNumaNode { cpus: cpus.parse().unwrap(), memory_mib, host_nodes: host_nodes.map(|n| n.parse().unwrap()) }
    }

    fn fake_host(free_2m: u64) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sys/devices/system/node/node0")).unwrap();
        std::fs::create_dir_all(root.path().join("sys/devices/system/node/node1")).unwrap();
        let pages = root.path().join("sys/kernel/mm/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&pages).unwrap();
        std::fs::write(pages.join("free_hugepages"), format!("{free_2m}\n")).unwrap();
        root
    }

    #[test]
    fn numa_nodes_render_one_backend_each() {
        let root = fake_host(0);
        let numa = [node("0-1,3", 512, Some("0")), node("2", 256, None)];
        let args = memory_args(&HostRoot::new(root.path()), 4, 768, &numa, MemoryBacking::Ram).unwrap();
        assert!(args.machine.is_empty());
        assert_eq!(
            args.args,
            [
                "-object",
                "memory-backend-ram,id=qx-mem-node0,size=512M,host-nodes=0,policy=bind",
                "-numa",
                "node,nodeid=0,memdev=qx-mem-node0,cpus=0-1,cpus=3",
                "-object",
                "memory-backend-ram,id=qx-mem-node1,size=256M",
                "-numa",
                "node,nodeid=1,memdev=qx-mem-node1,cpus=2",
            ]
        );
        let plain = memory_args(&HostRoot::new(root.path()), 4, 768, &[], MemoryBacking::Ram).unwrap();
        assert_eq!(plain, MemoryArgs::default(), "the default layout needs no arguments");
    }

    #[test]
    fn huge_pages_use_a_memfd_backend_when_the_host_has_them() {
        let root = fake_host(256);
        let host = HostRoot::new(root.path());
        let args = memory_args(&host, 2, 512, &[], MemoryBacking::HugePages { page_kib: 2048 }).unwrap();
        assert_eq!(args.machine, ["memory-backend=qx-mem"]);
        assert_eq!(args.args, ["-object", "memory-backend-memfd,id=qx-mem,size=512M,hugetlb=on,hugetlbsize=2048K"]);
        let e = memory_args(&host, 2, 1024, &[], MemoryBacking::HugePages { page_kib: 2048 }).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "hugepages");
        assert!(e[0].message.starts_with("the VM needs 512 free 2048 kB huge pages and the host has 256"), "{}", e[0]);
        let e = memory_args(&host, 2, 512, &[], MemoryBacking::HugePages { page_kib: 1048576 }).unwrap_err();
        assert!(e[0].to_string().starts_with("hugepages: this host has no 1048576 kB huge pages"), "{}", e[0]);
    }

    #[test]
    fn every_layout_problem_names_its_field() {
        let root = fake_host(0);
        let numa = [node("0-2", 100, Some("5")), node("2,7", 0, None)];
        let e = memory_args(&HostRoot::new(root.path()), 4, 512, &numa, MemoryBacking::Ram).unwrap_err();
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "numa[0].host_nodes: host NUMA node 5 does not exist on this host",
                "numa[1].cpus: vCPU 2 is in an earlier node too",
                "numa[1].cpus: vCPU 7 is not below vcpus 4",
                "numa[1].memory_mib: 0 is below the minimum 1",
                "numa: vCPUs 3 are in no node",
                "numa: the nodes hold 100 MiB, the VM's memory_mib is 512",
            ]
        );
    }

    /// This host's own huge pages: a VM asking for more than it has free (none, on most test machines) is refused
    /// naming the setting and the file read.
    #[test]
    fn the_real_host_refuses_more_huge_pages_than_it_has() {
        let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let memory_mib = (free + 1) * 2;
        let backing = MemoryBacking::HugePages { page_kib: 2048 };
        let e = memory_args(&HostRoot::default(), 1, memory_mib, &[], backing).unwrap_err();
        assert_eq!(e[0].field, "hugepages", "{}", e[0]);
        assert!(e[0].message.contains("vm.nr_hugepages") || e[0].message.contains("no 2048 kB"), "{}", e[0]);
    }
}
