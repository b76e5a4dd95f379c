//! Firmware, TPM and placement against real QEMU booting the test guest: OVMF with Secure Boot reaches the ready
//! marker and keeps its NVRAM per VM, swtpm's state survives a restart of swtpm and QEMU, the guest sees the NUMA
//! nodes it was given, and vCPU threads run where they were pinned.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qx_devices::firmware::Ovmf;
use qx_devices::placement::{self, CpuList, GuestNumaNode, MemoryBacking};
use qx_devices::tpm::Swtpm;
use qx_devices::HostRoot;
use qx_test_infra::{test_guest, wait_until, READY_LINE};

/// TCG boots on two shared cores; OVMF with Secure Boot alone takes about 15 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A QEMU of this test, killed on drop, with its serial console on a socket.
struct Vm {
    child: Child,
    serial: Serial,
    qmp: PathBuf,
}

impl Vm {
    fn start(dir: &Path, args: &[String]) -> Self {
        let serial_path = dir.join("serial.sock");
        let qmp = dir.join("qmp.sock");
        let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-display", "none", "-no-user-config", "-m", "256"])
            .arg("-chardev")
            .arg(format!("socket,id=ser0,path={},server=on,wait=on", serial_path.display()))
            .args(["-serial", "chardev:ser0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 runs");
        let stream = wait_until(Duration::from_secs(30), || UnixStream::connect(&serial_path).ok())
            .unwrap_or_else(|| panic!("QEMU did not open its serial socket: {}", qemu_log(dir)));
        Self { child, serial: Serial::new(stream), qmp }
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || self.child.try_wait().ok().flatten()).is_some()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
}

/// The guest's serial console: everything it printed, and a way to type.
struct Serial {
    stream: UnixStream,
    seen: Arc<Mutex<String>>,
}

impl Serial {
    fn new(stream: UnixStream) -> Self {
        let seen = Arc::new(Mutex::new(String::new()));
        let (mut reader, sink) = (stream.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self { stream, seen }
    }

    fn seen(&self) -> String {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `needle` has been printed `count` times.
    fn expect_count(&self, needle: &str, count: usize, timeout: Duration) {
        let found = wait_until(timeout, || (self.seen().matches(needle).count() >= count).then_some(()));
        assert!(found.is_some(), "the guest never printed {needle:?} ({count}x); it printed:\n{}", self.seen());
    }

    /// Runs a shell line and waits for `answer` to appear (once more than before).
    fn run(&mut self, line: &str, answer: &str) {
        let before = self.seen().matches(answer).count();
        self.stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        self.expect_count(answer, before + 1, Duration::from_secs(60));
    }
}

fn tcg_q35(machine_props: &[String]) -> Vec<String> {
    let mut machine = "q35,accel=tcg".to_owned();
    for prop in machine_props {
        machine.push(',');
        machine.push_str(prop);
    }
    vec!["-machine".into(), machine]
}

/// The test guest through PVH (fast, no firmware).
fn pvh_kernel() -> Vec<String> {
    let guest = test_guest();
    vec![
        "-kernel".into(),
        guest.kernel.display().to_string(),
        "-initrd".into(),
        guest.initrd.display().to_string(),
        "-append".into(),
        guest.cmdline.clone(),
    ]
}

/// The test guest's EFI-stub bzImage (vmlinuz; OVMF cannot boot the PVH vmlinux) under `ovmf` with NVRAM `vars`.
fn uefi_boot(ovmf: &Ovmf, vars: &Path) -> Vec<String> {
    let guest = test_guest();
    let uefi = ovmf.qemu_args(vars);
    let mut args = tcg_q35(&uefi.machine);
    args.extend(uefi.args);
    args.extend([
        "-kernel".into(),
        guest.bzimage().display().to_string(),
        "-initrd".into(),
        guest.initrd.display().to_string(),
        "-append".into(),
        guest.cmdline.clone(),
    ]);
    args
}

#[test]
fn ovmf_with_secure_boot_boots_the_guest_and_keeps_its_nvram_per_vm() {
    let ovmf = Ovmf::locate(&HostRoot::default(), true).expect("the install script installs ovmf");
    ovmf.check_machine("q35").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (vars, created) = ovmf.ensure_vars(dir.path()).unwrap();
    assert!(created);
    let args = uefi_boot(&ovmf, &vars);
    let mut vm = Vm::start(dir.path(), &args);
    vm.serial.expect_count(READY_LINE, 1, BOOT_TIMEOUT);
    // The kernel saw Secure Boot on in the firmware's variables and locked itself down.
    vm.serial.run("dmesg | grep -q 'locked down from EFI Secure Boot' && echo qx-sb-$((1+1))", "qx-sb-2");
    vm.serial.run("poweroff", "reboot: Power down");
    assert!(vm.wait_exit(Duration::from_secs(60)), "QEMU exits when the guest powers off");
    // OVMF wrote its boot variables into this VM's copy, not into the template; the copy is kept next time.
    assert_ne!(std::fs::read(&vars).unwrap(), std::fs::read(&ovmf.vars_template).unwrap());
    let written = std::fs::read(&vars).unwrap();
    assert_eq!(ovmf.ensure_vars(dir.path()).unwrap(), (vars.clone(), false));
    assert_eq!(std::fs::read(&vars).unwrap(), written);
}

/// TPM2 commands the guest writes to /dev/tpm0 as raw bytes (busybox has no TPM tools), and the shell line that
/// prints `qx-rc-<response code>`.
fn tpm_command(bytes: &str) -> String {
    format!(
        "exec 3<>/dev/tpm0; printf '{bytes}' >&3; dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | \
         awk 'NR==1 {{print \"qx-rc-\" $7 $8 $9 $10}}'; exec 3>&-"
    )
}

/// TPM2_NV_ReadPublic of index 0x01500001.
const NV_READ_PUBLIC: &str = r"\x80\x01\x00\x00\x00\x0e\x00\x00\x01\x69\x01\x50\x00\x01";
/// TPM2_NV_DefineSpace of index 0x01500001 (8 bytes, owner read/write) with the empty owner password.
const NV_DEFINE_SPACE: &str = concat!(
    r"\x80\x02\x00\x00\x00\x2d\x00\x00\x01\x2a\x40\x00\x00\x01",
    r"\x00\x00\x00\x09\x40\x00\x00\x09\x00\x00\x00\x00\x00",
    r"\x00\x00\x00\x0e\x01\x50\x00\x01\x00\x0b\x00\x02\x00\x02\x00\x00\x00\x08"
);

/// A swtpm of this test, killed on drop.
struct SwtpmProcess(Child);

impl SwtpmProcess {
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_until(timeout, || self.0.try_wait().ok().flatten())
    }
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the VM's swtpm with its control socket's listener, in a process group of its own like the daemon does.
fn start_swtpm(tpm: &Swtpm) -> SwtpmProcess {
    let listener = tpm.prepare().unwrap();
    let fd = listener.as_raw_fd();
    let log = std::fs::File::create(tpm.run_dir.join("swtpm.stdout")).unwrap();
    let mut command = Command::new(qx_devices::tpm::SWTPM_BINARY);
    command.args(tpm.args(fd)).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).process_group(0);
    // SAFETY: fcntl on an fd this process owns, between fork and exec: async-signal-safe, and only clears
    // FD_CLOEXEC so the listener survives exec at the number the arguments name.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("swtpm runs (the install script installs it)");
    drop(listener);
    SwtpmProcess(child)
}

#[test]
fn swtpm_state_survives_a_restart_of_swtpm_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::new(&dir.path().join("vm"), &dir.path().join("run"));
    // UEFI, as a Windows 11 VM has it (under SeaBIOS with PVH the guest kernel finds no TPM).
    let ovmf = Ovmf::locate(&HostRoot::default(), false).expect("the install script installs ovmf");
    let (vars, _) = ovmf.ensure_vars(dir.path()).unwrap();
    let boot = |round: usize| {
        let swtpm = start_swtpm(&tpm);
        let mut args = uefi_boot(&ovmf, &vars);
        args.extend(tpm.qemu_args());
        let vm_dir = dir.path().join(format!("qemu{round}"));
        std::fs::create_dir_all(&vm_dir).unwrap();
        let vm = Vm::start(&vm_dir, &args);
        vm.serial.expect_count(READY_LINE, 1, BOOT_TIMEOUT);
        (vm, swtpm)
    };

    let (mut vm, mut swtpm) = boot(1);
    let pid: i32 = std::fs::read_to_string(tpm.pidfile()).unwrap().trim().parse().unwrap();
    assert_eq!(pid, swtpm.0.id() as i32);
    assert!(qx_devices::tpm::is_swtpm_of(&HostRoot::default(), pid, &tpm), "the pidfile names our swtpm");
    vm.serial.run("cat /sys/class/tpm/tpm0/tpm_version_major | sed 's/^/qx-tpm-v/'", "qx-tpm-v2");
    // Fresh state: the index does not exist yet (TPM_RC_HANDLE for parameter 1).
    vm.serial.run(&tpm_command(NV_READ_PUBLIC), "qx-rc-0000018b");
    vm.serial.run(&tpm_command(NV_DEFINE_SPACE), "qx-rc-00000000");
    vm.serial.run("poweroff", "reboot: Power down");
    assert!(vm.wait_exit(Duration::from_secs(60)), "QEMU exits when the guest powers off");
    // --terminate: swtpm goes when QEMU closes the connection.
    assert!(swtpm.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
    assert!(tpm.state_dir.join("tpm2-00.permall").exists());
    drop(vm);

    let (mut vm, mut swtpm) = boot(2);
    vm.serial.run(&tpm_command(NV_READ_PUBLIC), "qx-rc-00000000");
    vm.serial.run("poweroff", "reboot: Power down");
    assert!(vm.wait_exit(Duration::from_secs(60)));
    assert!(swtpm.wait_exit(Duration::from_secs(30)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_sees_its_numa_nodes_and_vcpus_run_where_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostRoot::default();
    let numa = [
        GuestNumaNode { cpus: "0".parse().unwrap(), memory_mib: 128, host_nodes: Some("0".parse().unwrap()) },
        GuestNumaNode { cpus: "1".parse().unwrap(), memory_mib: 128, host_nodes: None },
    ];
    let memory = placement::memory_args(&host, 2, 256, &numa, MemoryBacking::Ram).unwrap();
    let mut args = tcg_q35(&memory.machine);
    args.extend(["-smp".into(), "2".into()]);
    args.extend(memory.args);
    args.extend(pvh_kernel());
    let mut vm = tokio::task::block_in_place(|| Vm::start(dir.path(), &args));
    let qmp = qx_qmp::QmpClient::connect(&vm.qmp, qx_qmp::ConnectOptions::default()).await.unwrap();

    let reply = qmp.execute_raw("query-cpus-fast", None).await.unwrap();
    let vcpus = placement::vcpu_threads(&reply).unwrap();
    assert_eq!(vcpus.len(), 2);
    // Opposite CPUs to their indices (on a host with 2 CPUs or more), so the default cannot pass for it.
    let online: CpuList = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap().parse().unwrap();
    let cpus: Vec<u32> = online.ids().collect();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let want = [CpuList::from_iter([last]), CpuList::from_iter([first])];
    for (vcpu, cpus) in vcpus.iter().zip(&want) {
        placement::pin_thread(vcpu.thread_id, cpus).unwrap();
    }
    let emulator = placement::emulator_threads(&host, vm.child.id() as i32, &vcpus);
    assert!(!emulator.is_empty(), "QEMU has a main loop thread besides its vCPUs");
    for thread in &emulator {
        placement::pin_thread(*thread, &CpuList::from_iter([first])).unwrap();
    }
    for (vcpu, cpus) in vcpus.iter().zip(&want) {
        assert_eq!(&placement::affinity(vcpu.thread_id).unwrap(), cpus, "vCPU {}", vcpu.cpu_index);
    }
    assert_eq!(placement::affinity(emulator[0]).unwrap(), CpuList::from_iter([first]));

    tokio::task::block_in_place(|| {
        vm.serial.expect_count(READY_LINE, 1, BOOT_TIMEOUT);
        vm.serial.run("echo qx-nodes-$(ls -d /sys/devices/system/node/node* | wc -l)", "qx-nodes-2");
        vm.serial.run("cat /sys/devices/system/node/node1/cpulist | sed 's/^/qx-node1-cpus-/'", "qx-node1-cpus-1");
        vm.serial.run("poweroff", "reboot: Power down");
        assert!(vm.wait_exit(Duration::from_secs(60)));
    });
}
