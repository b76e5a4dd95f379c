//! Where a VM runs on the host: vCPU and emulator thread pinning, guest NUMA nodes and their memory backends, huge
//! pages, and per-VM cgroup limits ([`cgroup`]).

pub mod cgroup;
mod cpulist;
mod memory;
mod pin;

pub use cpulist::{CpuList, CpuListError};
pub use memory::{memory_args, GuestNumaNode, MemoryArgs, MemoryBacking, MemoryError};
pub use pin::{affinity, emulator_threads, pin_thread, vcpu_threads, PinError, VcpuThread};
