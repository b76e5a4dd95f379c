//! vCPU and emulator pinning through the API: each vCPU thread of the real QEMU (found by its `CPU n/TCG` name,
//! independently of qx-node) runs only on the host CPUs its spec names, and so do QEMU's other threads; specs that
//! name CPUs the host does not have are refused naming the field.

mod common;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::test_guest;

/// The CPUs thread `tid` of `pid` may run on, as the kernel says (`Cpus_allowed_list`).
fn allowed(pid: u32, tid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_owned()
}

/// QEMU's threads by name (`CPU 0/TCG`, `qemu-system-x86`, ...), each with its thread id.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            Some((comm.trim().to_owned(), tid))
        })
        .collect();
    threads.sort();
    threads
}

fn request(name: &str, extra: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest { spec: None, spec_text: test_guest().spec_yaml(name, &format!("vcpus: 2\n{extra}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpus_and_emulator_threads_run_where_the_spec_pins_them() {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let last: u32 = online.trim().rsplit(['-', ',']).next().unwrap().parse().unwrap();
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let pins = format!("placement:\n  vcpu_cpus: [\"{last}\", \"0\"]\n  emulator_cpus: \"{last}\"\n");
    client.create_vm(request("pinned", &pins)).await.expect("CreateVm");
    let vm = start(&mut client, "pinned").await;
    let pid = pid(&vm);
    let threads = threads(pid);
    let tid_of = |name: &str| threads.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
    let (cpu0, cpu1) = (tid_of("CPU 0/TCG").expect("vCPU 0's thread"), tid_of("CPU 1/TCG").expect("vCPU 1's thread"));
    assert_eq!(allowed(pid, &cpu0), last.to_string(), "vCPU 0: {threads:?}");
    assert_eq!(allowed(pid, &cpu1), "0", "vCPU 1: {threads:?}");
    assert_eq!(allowed(pid, &pid.to_string()), last.to_string(), "QEMU's main loop");
    let shown = get(&mut client, "pinned").await.spec.unwrap().placement.unwrap();
    assert_eq!(shown.vcpu_cpus, [last.to_string(), "0".to_owned()]);

    let mut console = Console::open(&mut client, "pinned").await;
    console.expect(qx_test_infra::READY_LINE, BOOT_TIMEOUT).await;
    assert_eq!(console.sh("cat /sys/devices/system/cpu/online").await, "0-1", "the guest runs both vCPUs");

    let beyond = last + 1;
    for (extra, field, problem) in [
        (format!("placement:\n  vcpu_cpus: [\"{beyond}\"]\n"), "placement.vcpu_cpus[0]", "does not have online"),
        ("placement:\n  emulator_cpus: \"0-x\"\n".to_owned(), "placement", "CPU list \"0-x\""),
        ("placement:\n  vcpu_cpus: [\"0\", \"0\", \"0\"]\n".to_owned(), "placement.vcpu_cpus", "at most 2"),
    ] {
        let refused = client.create_vm(request("bad", &extra)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{extra}: {refused:?}");
        assert!(
            refused.message().contains(field) && refused.message().contains(problem),
            "{extra}: {}",
            refused.message()
        );
    }
    // The same through the typed spec names the exact field.
    let mut spec = pb::VmSpec { name: "bad".into(), vcpus: 2, memory_mib: 256, ..Default::default() };
    spec.placement = Some(pb::Placement { vcpu_cpus: vec!["0".into(), "1-".into()], emulator_cpus: String::new() });
    let refused = client.create_vm(pb::CreateVmRequest { spec: Some(spec), spec_text: String::new() }).await;
    let message = refused.unwrap_err().message().to_owned();
    assert!(message.contains("placement.vcpu_cpus[1]: \"1-\""), "{message}");
    let listed = client.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.vms.len(), 1, "nothing else was created");
}
