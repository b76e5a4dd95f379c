//! The warm pool end to end: qx-node keeps paused QEMUs of a configured shape; a new VM of that shape takes one's
//! identity at creation and starts from it; the guest sees the same machine a cold start gives; stop and delete
//! work; the pool refills.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::{pid_alive, test_guest, wait_until, Daemon};

const POOL_SIZE: u32 = 2;

fn warm_daemon() -> Daemon {
    let guest = test_guest();
    let config = format!(
        "warm_pool:\n  - vcpus: 1\n    memory_mib: 256\n    count: {POOL_SIZE}\n    kernel:\n      kernel: {}\n      \
         initrd: {}\n      cmdline: \"{}\"\n",
        guest.kernel.display(),
        guest.initrd.display(),
        guest.cmdline
    );
    Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config))
}

async fn pool_counts(client: &mut Client) -> (u32, u32) {
    let info = client.get_node_info(pb::GetNodeInfoRequest {}).await.unwrap().into_inner();
    (info.warm_pool_ready, info.warm_pool_reserved)
}

async fn wait_for_pool(client: &mut Client, want: (u32, u32)) {
    for _ in 0..600 {
        if pool_counts(client).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the warm pool did not reach {want:?}; it is at {:?}", pool_counts(client).await);
}

/// What the guest sees of its machine: PCI functions with vendor and device ids, block devices, NICs.
async fn guest_view(console: &mut Console) -> BTreeSet<String> {
    let script = "for d in /sys/bus/pci/devices/*; do echo HW pci ${d##*/} $(cat $d/vendor $d/device); done; \
                  for b in /sys/block/vd*; do echo HW blk ${b##*/} $(cat $b/size); done; \
                  for n in /sys/class/net/eth*; do echo HW net ${n##*/} $(cat $n/address); done; echo VIEW''-DONE\n";
    console.input.send(pb::ConsoleInput { data: script.as_bytes().to_vec(), ..Default::default() }).await.unwrap();
    console.expect("VIEW-DONE", Duration::from_secs(30)).await;
    let start = console.seen.rfind("VIEW''-DONE").unwrap_or(0);
    console.seen[start..].lines().filter(|l| l.starts_with("HW ")).map(|l| l.trim().to_owned()).collect()
}

async fn create_spec(client: &mut Client, name: &str, extra: &str) -> pb::Vm {
    let spec_text = test_guest().spec_yaml(name, extra);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_start_from_the_warm_pool_and_see_the_same_machine_as_cold_ones() {
    let mut daemon = warm_daemon();
    let mut client = client(&daemon).await;
    wait_for_pool(&mut client, (POOL_SIZE, 0)).await;
    let warm_pids = daemon.qemu_pids();
    assert_eq!(warm_pids.len(), POOL_SIZE as usize, "one QEMU per ready slot");

    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(16 << 20).unwrap();
    let devices = format!("disks:\n  - path: {}\nnics:\n  - kind: user\n", disk.path().display());

    // A new VM of the pool's shape takes a warm QEMU's identity and, at start, the QEMU itself.
    let vm = create_spec(&mut client, "warm1", &devices).await;
    let uuid = vm.spec.unwrap().uuid;
    assert!(daemon.data_dir().join("warm").join(&uuid).is_dir(), "the VM's UUID is a warm QEMU's");
    wait_for_pool(&mut client, (POOL_SIZE, 1)).await;
    let started = start(&mut client, "warm1").await;
    assert!(warm_pids.contains(&(pid(&started) as i32)), "started from the pool, pid {}", pid(&started));
    let mut console = boot(&mut client, "warm1").await;
    let warm_view = guest_view(&mut console).await;
    console
        .input
        .send(pb::ConsoleInput { data: b"cat /sys/class/dmi/id/product_uuid\n".to_vec(), ..Default::default() })
        .await
        .unwrap();
    console.expect(&uuid, Duration::from_secs(30)).await;

    // A warm-started VM survives a daemon kill like any other; the ready QEMUs the old daemon left are stopped
    // and replaced.
    let warm_pid = pid(&started) as i32;
    daemon.kill9();
    daemon.restart();
    client = common::client(&daemon).await;
    let vm = get(&mut client, "warm1").await;
    assert_eq!((state(&vm), pid(&vm) as i32), (pb::VmState::Running, warm_pid), "reattached");
    for stale in warm_pids.iter().filter(|&&p| p != warm_pid) {
        assert!(wait_until(Duration::from_secs(10), || (!pid_alive(*stale)).then_some(())).is_some(), "{stale}");
    }
    wait_for_pool(&mut client, (POOL_SIZE, 0)).await;
    let mut console = Console::open(&mut client, "warm1").await;
    console
        .input
        .send(pb::ConsoleInput { data: b"echo AFTER''-RESTART\n".to_vec(), ..Default::default() })
        .await
        .unwrap();
    console.expect("AFTER-RESTART", Duration::from_secs(30)).await;

    // The same devices started cold (a given UUID never comes from the pool) look the same to the guest.
    let cold_uuid = uuid::Uuid::new_v4();
    create_spec(&mut client, "cold1", &format!("uuid: {cold_uuid}\n{devices}")).await;
    client.stop_vm(pb::StopVmRequest { name: "warm1".into(), force: true, timeout_seconds: 0 }).await.unwrap();
    let cold = start(&mut client, "cold1").await;
    assert!(!warm_pids.contains(&(pid(&cold) as i32)));
    let mut console = boot(&mut client, "cold1").await;
    let mut cold_view = guest_view(&mut console).await;
    // The MAC is each VM's own; everything else must match.
    let mac = |view: &BTreeSet<String>| view.iter().find(|l| l.starts_with("HW net")).cloned().unwrap_or_default();
    let (warm_mac, cold_mac) = (mac(&warm_view), mac(&cold_view));
    cold_view.remove(&cold_mac);
    cold_view.insert(warm_mac);
    assert_eq!(warm_view, cold_view, "a warm-started VM sees the machine a cold-started one does");
    assert!(warm_view.iter().any(|l| l == "HW blk vda 32768"), "{warm_view:?}");

    // Stop, restart (cold: its QEMU was used) and delete work on a VM that started warm; the pool refills.
    client.stop_vm(pb::StopVmRequest { name: "cold1".into(), force: true, timeout_seconds: 0 }).await.unwrap();
    let again = start(&mut client, "warm1").await;
    assert_eq!(state(&again), pb::VmState::Running);
    boot(&mut client, "warm1").await;
    client.stop_vm(pb::StopVmRequest { name: "warm1".into(), force: false, timeout_seconds: 60 }).await.unwrap();
    client.delete_vm(pb::VmRef { name: "warm1".into() }).await.unwrap();
    wait_for_pool(&mut client, (POOL_SIZE, 0)).await;

    // Deleting a VM that never started gives its reserved QEMU back (it is stopped, and a fresh one replaces it).
    let vm = create_spec(&mut client, "never", "").await;
    let reserved = daemon.data_dir().join("warm").join(vm.spec.unwrap().uuid);
    assert!(reserved.is_dir());
    client.delete_vm(pb::VmRef { name: "never".into() }).await.unwrap();
    assert!(wait_until(Duration::from_secs(10), || (!reserved.exists()).then_some(())).is_some());
    wait_for_pool(&mut client, (POOL_SIZE, 0)).await;

    // A daemon that exits stops its idle warm QEMUs (VMs, none running here, would keep running).
    let ready = daemon.qemu_pids();
    assert_eq!(ready.len(), POOL_SIZE as usize, "{ready:?}");
    let daemon_pid = rustix::process::Pid::from_raw(daemon.pid().unwrap()).unwrap();
    rustix::process::kill_process(daemon_pid, rustix::process::Signal::TERM).unwrap();
    for pid in ready {
        assert!(wait_until(Duration::from_secs(10), || (!pid_alive(pid)).then_some(())).is_some(), "{pid}");
    }
}

/// A paused start from the pool: the warm QEMU gets the VM's devices plugged and stays before its first
/// instruction (nothing on the serial console); ResumeVm boots a guest that has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_start_can_leave_the_vm_paused_with_its_devices_plugged() {
    let daemon = warm_daemon();
    let mut client = client(&daemon).await;
    wait_for_pool(&mut client, (POOL_SIZE, 0)).await;
    let warm_pids = daemon.qemu_pids();
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(16 << 20).unwrap();
    create_spec(&mut client, "held", &format!("disks:\n  - path: {}\n", disk.path().display())).await;

    let request = pb::StartVmRequest { name: "held".into(), paused: true };
    let vm = client.start_vm(request).await.expect("StartVm paused").into_inner();
    assert_eq!(state(&vm), pb::VmState::Paused);
    assert!(warm_pids.contains(&(pid(&vm) as i32)), "started from the pool, pid {}", pid(&vm));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let printed = std::fs::read(daemon.data_dir().join("vms/held/console.log")).unwrap_or_default();
    assert!(printed.is_empty(), "a paused guest printed {:?}", String::from_utf8_lossy(&printed));

    let mut console = Console::open(&mut client, "held").await;
    let vm = client.resume_vm(pb::VmRef { name: "held".into() }).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Running);
    console.expect(qx_test_infra::READY_LINE, BOOT_TIMEOUT).await;
    let view = guest_view(&mut console).await;
    assert!(view.iter().any(|l| l == "HW blk vda 32768"), "the disk plugged while paused: {view:?}");
    client.stop_vm(pb::StopVmRequest { name: "held".into(), force: true, timeout_seconds: 0 }).await.unwrap();
}
