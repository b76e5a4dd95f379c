//! Pinning QEMU's threads to host CPUs with `sched_setaffinity`: each vCPU thread (ids from `query-cpus-fast`) to
//! its CPUs, and the emulator's other threads (main loop, I/O) to theirs.

use rustix::process::Pid;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

use super::CpuList;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("query-cpus-fast answered {reply}, which has no cpu-index/thread-id list")]
    Reply { reply: String },
    #[error("cannot pin thread {thread} to CPUs {cpus}")]
    Set {
        thread: i32,
        cpus: CpuList,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the affinity of thread {thread}")]
    Get {
        thread: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("CPU {cpu} is above what the kernel's CPU sets hold ({max})")]
    TooHigh { cpu: u32, max: usize },
}

/// A vCPU and the host thread that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuThread {
    pub cpu_index: u32,
    pub thread_id: i32,
}

/// The vCPU threads in a `query-cpus-fast` reply (the array under `return`, or the array itself).
pub fn vcpu_threads(reply: &serde_json::Value) -> Result<Vec<VcpuThread>, PinError> {
    let list = reply.get("return").unwrap_or(reply);
    let bad = || PinError::Reply { reply: reply.to_string() };
    list.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|cpu| {
            let index = cpu.get("cpu-index").and_then(|v| v.as_u64()).ok_or_else(bad)?;
            let thread = cpu.get("thread-id").and_then(|v| v.as_i64()).ok_or_else(bad)?;
            Ok(VcpuThread { cpu_index: index as u32, thread_id: thread as i32 })
        })
        .collect()
}

/// The threads of process `pid` that are not vCPUs: QEMU's main loop, I/O threads, workers.
pub fn emulator_threads(root: &crate::HostRoot, pid: i32, vcpus: &[VcpuThread]) -> Vec<i32> {
    let dir = root.path(format!("/proc/{pid}/task"));
    let mut threads: Vec<i32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid| !vcpus.iter().any(|v| v.thread_id == *tid))
        .collect();
    threads.sort();
    threads
}

pub fn pin_thread(thread: i32, cpus: &CpuList) -> Result<(), PinError> {
    let mut set = CpuSet::new();
    for cpu in cpus.ids() {
        if cpu as usize >= CpuSet::MAX_CPU {
            return Err(PinError::TooHigh { cpu, max: CpuSet::MAX_CPU });
        }
        set.set(cpu as usize);
    }
    sched_setaffinity(Pid::from_raw(thread), &set).map_err(|e| PinError::Set {
        thread,
        cpus: cpus.clone(),
        source: e.into(),
    })
}

/// The CPUs `thread` may run on.
pub fn affinity(thread: i32) -> Result<CpuList, PinError> {
    let set = sched_getaffinity(Pid::from_raw(thread)).map_err(|e| PinError::Get { thread, source: e.into() })?;
    Ok((0..CpuSet::MAX_CPU).filter(|cpu| set.is_set(*cpu)).map(|cpu| cpu as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_query_cpus_fast() {
        let reply = serde_json::json!({"return": [
            {"cpu-index": 0, "thread-id": 1201, "qom-path": "/machine/unattached/device[0]", "target": "x86_64"},
            {"cpu-index": 1, "thread-id": 1202, "qom-path": "/machine/unattached/device[2]", "target": "x86_64"},
        ]});
        let threads = vcpu_threads(&reply).unwrap();
        assert_eq!(threads[1], VcpuThread { cpu_index: 1, thread_id: 1202 });
        let e = vcpu_threads(&serde_json::json!({"return": [{"cpu-index": 0}]})).unwrap_err();
        assert!(e.to_string().contains("no cpu-index/thread-id"), "{e}");
    }

    #[test]
    fn pins_a_thread_of_this_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            tx.send(rustix::thread::gettid().as_raw_nonzero().get()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let cpu0: CpuList = "0".parse().unwrap();
        pin_thread(tid, &cpu0).unwrap();
        assert_eq!(affinity(tid).unwrap(), cpu0);
        let e = pin_thread(tid, &"4000".parse().unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("CPU 4000 is above"), "{e}");
        done_tx.send(()).unwrap();
        worker.join().unwrap();
    }
}
