//! VMs on UEFI through the API: the test guest boots under OVMF with its own NVRAM copy, kept across restarts;
//! with Secure Boot the firmware runs in SMM with secure flash and the guest kernel sees it on; specs that cannot
//! work are refused naming the field; a VM with a TPM gets its own swtpm, which outlives a daemon crash and ends
//! with the VM.

mod common;

use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::{cmdline_of, pid_alive, test_guest, wait_until};

/// The test guest on UEFI: its `vmlinux` is a PVH ELF for SeaBIOS's fast path, which OVMF does not load; the
/// bzImage's EFI stub is what UEFI starts.
fn create_request(name: &str, extra: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest { spec: None, spec_text: test_guest().efi_spec_yaml(name, extra) }
}

/// The value after `-machine` and the `-blockdev` values of a QEMU process.
fn machine_and_blockdevs(pid: u32) -> (String, Vec<String>) {
    let args = cmdline_of(pid as i32);
    let after = |flag: &str| args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect::<Vec<_>>();
    (after("-machine").remove(0), after("-blockdev"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uefi_vm_boots_under_ovmf_with_its_own_nvram_kept_across_restarts() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    client.create_vm(create_request("efi", "firmware: uefi\n")).await.expect("CreateVm");
    let vm = start(&mut client, "efi").await;
    let (machine, blockdevs) = machine_and_blockdevs(pid(&vm));
    assert!(machine.ends_with(",pflash0=qx-uefi-code,pflash1=qx-uefi-vars"), "{machine}");
    let vars = daemon.data_dir().join("vms/efi/uefi-vars.fd");
    assert!(blockdevs.iter().any(|b| b.contains("OVMF_CODE_4M.fd") && b.contains("read-only=on")), "{blockdevs:?}");
    assert!(blockdevs.iter().any(|b| b.contains(&vars.display().to_string())), "{blockdevs:?}");
    let mut console = Console::open(&mut client, "efi").await;
    console.expect(qx_test_infra::READY_LINE, BOOT_TIMEOUT).await;
    assert_eq!(console.sh("ls /sys/firmware/efi >/dev/null 2>&1 && echo efi || echo bios").await.trim(), "efi");
    let shown = get(&mut client, "efi").await.spec.unwrap();
    assert_eq!((shown.firmware.as_str(), shown.secure_boot), ("uefi", false));

    client.stop_vm(pb::StopVmRequest { name: "efi".into(), force: true, ..Default::default() }).await.expect("StopVm");
    // What the firmware stored during the first boot (its boot entries) is the VM's, not the template's.
    let stored = std::fs::read(&vars).unwrap();
    let template = std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.fd").unwrap();
    assert_eq!(stored.len(), template.len());
    std::fs::write(&vars, [&stored[..stored.len() - 1], b"\x5a"].concat()).unwrap();
    let vm = start(&mut client, "efi").await;
    assert!(pid(&vm) > 0);
    assert_eq!(std::fs::read(&vars).unwrap().last(), Some(&0x5a), "a restart keeps the VM's NVRAM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_boot_runs_the_firmware_in_smm_and_impossible_specs_are_refused() {
    let daemon = daemon();
    let mut client = client(&daemon).await;

    let refused = client.create_vm(create_request("sb1", "secure_boot: true\n")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("needs firmware uefi, not seabios"), "{}", refused.message());
    let refused = client.create_vm(create_request("sb2", "firmware: uefi\nsecure_boot: true\nmachine: pc\n")).await;
    let refused = refused.unwrap_err();
    assert!(refused.message().contains("needs a q35 machine"), "{}", refused.message());
    let refused = client.create_vm(create_request("sb3", "firmware: coreboot\n")).await.unwrap_err();
    assert!(refused.message().contains("firmware"), "{}", refused.message());
    let listed = client.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_inner();
    assert!(listed.vms.is_empty(), "nothing was created: {listed:?}");

    client.create_vm(create_request("sb", "firmware: uefi\nsecure_boot: true\n")).await.expect("CreateVm");
    let vm = start(&mut client, "sb").await;
    let (machine, blockdevs) = machine_and_blockdevs(pid(&vm));
    assert!(machine.contains(",smm=on"), "{machine}");
    assert!(blockdevs.iter().any(|b| b.contains("OVMF_CODE_4M.secboot.fd")), "{blockdevs:?}");
    let args = cmdline_of(pid(&vm) as i32);
    assert!(args.windows(2).any(|w| w == ["-global", "driver=cfi.pflash01,property=secure,value=on"]), "{args:?}");
    let template = std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").unwrap();
    assert_eq!(std::fs::read(daemon.data_dir().join("vms/sb/uefi-vars.fd")).unwrap().len(), template.len());
    let mut console = Console::open(&mut client, "sb").await;
    console.expect(qx_test_infra::READY_LINE, BOOT_TIMEOUT).await;
    // The kernel saw Secure Boot on in the firmware's variables and locked itself down.
    let locked = console.sh("dmesg | grep -c 'locked down from EFI Secure Boot'").await;
    assert_eq!(locked.trim(), "1", "{}", console.seen);
}

/// The pid in the VM's swtpm pidfile once swtpm has written one other than `not`, alive.
fn swtpm_pid(vm_dir: &std::path::Path, not: i32) -> i32 {
    let pidfile = vm_dir.join("swtpm.pid");
    let read = || std::fs::read_to_string(&pidfile).ok()?.trim().parse::<i32>().ok();
    wait_until(Duration::from_secs(10), || read().filter(|&pid| pid != not && pid_alive(pid)))
        .unwrap_or_else(|| panic!("no swtpm pidfile in {}", vm_dir.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_vm_gets_its_own_swtpm_which_outlives_a_daemon_crash_and_ends_with_the_vm() {
    let mut daemon = daemon();
    let mut client = client(&daemon).await;
    client.create_vm(create_request("tpm", "firmware: uefi\ntpm: true\n")).await.expect("CreateVm");
    let vm = start(&mut client, "tpm").await;
    let vm_dir = daemon.data_dir().join("vms/tpm");
    let swtpm = swtpm_pid(&vm_dir, 0);
    let swtpm_args = cmdline_of(swtpm);
    assert!(
        swtpm_args.iter().any(|a| a.starts_with(&format!("dir={}", vm_dir.join("tpm").display()))),
        "{swtpm_args:?}"
    );
    let args = cmdline_of(pid(&vm) as i32);
    assert!(args.iter().any(|a| a.starts_with("tpm-crb,")), "{args:?}");
    assert!(get(&mut client, "tpm").await.spec.unwrap().tpm);
    let mut console = Console::open(&mut client, "tpm").await;
    console.expect(qx_test_infra::READY_LINE, BOOT_TIMEOUT).await;
    assert_eq!(console.sh("ls /sys/class/tpm").await, "tpm0", "the guest finds its TPM");
    assert!(vm_dir.join("tpm/tpm2-00.permall").exists(), "the TPM's state is kept with the VM");

    // A daemon crash leaves QEMU and swtpm running; the restarted daemon stops the VM and swtpm goes with it.
    daemon.kill9();
    assert!(pid_alive(swtpm) && pid_alive(pid(&vm) as i32));
    daemon.restart();
    let mut client = common::client(&daemon).await;
    client.stop_vm(pb::StopVmRequest { name: "tpm".into(), force: true, ..Default::default() }).await.expect("StopVm");
    let gone = wait_until(Duration::from_secs(10), || (!pid_alive(swtpm)).then_some(()));
    assert!(gone.is_some(), "swtpm {swtpm} ends with its QEMU");

    // The next start gets a new swtpm over the same state.
    start(&mut client, "tpm").await;
    let again = swtpm_pid(&vm_dir, swtpm);
    assert!(cmdline_of(again).iter().any(|a| a.starts_with(&format!("dir={}", vm_dir.join("tpm").display()))));
}
