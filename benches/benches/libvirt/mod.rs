//! The libvirt leg of the VM start benchmark: a private libvirtd and virtlogd started by the bench, driven through
//! libvirt's own API (`createXML`, via python3-libvirt in one long-lived helper process, so each start pays for
//! libvirt and not for a client's start-up), booting the same guest as the other legs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use qx_test_infra::{kill_pid, test_guest, READY_MARKER};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::Sample;

/// Why libvirt cannot be measured here, for the report.
pub fn unavailable() -> Option<String> {
    if !Path::new("/usr/sbin/libvirtd").exists() || !Path::new("/usr/sbin/virtlogd").exists() {
        return Some("libvirtd is not installed (run benches/install-libvirt.sh)".into());
    }
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    if !conf.lines().any(|l| l.trim() == "user = \"root\"") {
        return Some("/etc/libvirt/qemu.conf lacks user = \"root\" (run benches/install-libvirt.sh)".into());
    }
    let bindings = std::process::Command::new("/usr/bin/python3").args(["-c", "import libvirt"]).output();
    if !bindings.is_ok_and(|o| o.status.success()) {
        return Some("python3-libvirt is not installed (run benches/install-libvirt.sh)".into());
    }
    None
}

/// A line-oriented driver: `create PATH` → `createXML` → "created"; `destroy` → "destroyed".
const DRIVER: &str = r#"
import sys, libvirt
conn = libvirt.open(sys.argv[1])
dom = None
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "create":
        dom = conn.createXML(open(arg).read(), 0)
        print("created", flush=True)
    elif command == "destroy":
        dom.destroy()
        print("destroyed", flush=True)
"#;

/// libvirtd + virtlogd in a temp dir, and an API client on them. Dropping it kills all three by PID.
pub struct Libvirt {
    dir: tempfile::TempDir,
    daemons: Vec<u32>,
    client: Child,
    input: ChildStdin,
    output: Lines<BufReader<ChildStdout>>,
    xml: PathBuf,
    serial: PathBuf,
}

impl Libvirt {
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("qx-bench-libvirt-").tempdir().unwrap();
        let path = dir.path().to_owned();
        std::fs::write(
            path.join("libvirtd.conf"),
            format!("unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\n", path.display()),
        )
        .unwrap();
        let spawn = |program: &str, args: &[&Path]| {
            let log = std::fs::File::create(path.join(format!("{}.log", program.rsplit('/').next().unwrap()))).unwrap();
            std::process::Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
                .id()
        };
        let virtlogd = spawn("/usr/sbin/virtlogd", &[Path::new("-p"), &path.join("virtlogd.pid")]);
        let libvirtd = spawn(
            "/usr/sbin/libvirtd",
            &[Path::new("-f"), &path.join("libvirtd.conf"), Path::new("-p"), &path.join("libvirtd.pid")],
        );
        let socket = path.join("libvirt-sock");
        let up = qx_test_infra::wait_until(Duration::from_secs(30), || socket.exists().then_some(()));
        assert!(up.is_some(), "libvirtd did not open {}", socket.display());

        let mut client = Command::new("/usr/bin/python3")
            .args(["-u", "-c", DRIVER])
            .arg(format!("qemu:///system?socket={}", socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 libvirt driver");
        let input = client.stdin.take().unwrap();
        let output = BufReader::new(client.stdout.take().unwrap()).lines();
        let serial = path.join("serial.log");
        let guest = test_guest();
        let xml = path.join("domain.xml");
        std::fs::write(
            &xml,
            format!(
                "<domain type='qemu'><name>qxbench</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
                 <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
                 <cmdline>{}</cmdline></os><features><acpi/></features><devices>\
                 <emulator>/usr/bin/qemu-system-x86_64</emulator>\
                 <serial type='file'><source path='{}'/><target port='0'/></serial>\
                 <interface type='user'><model type='virtio'/></interface>\
                 <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
                guest.kernel.display(),
                guest.initrd.display(),
                guest.cmdline,
                serial.display()
            ),
        )
        .unwrap();
        Self { dir, daemons: vec![libvirtd, virtlogd], client, input, output, xml, serial }
    }

    /// Sends one command to the driver and waits for the line that says it is done.
    async fn call(&mut self, command: &str, done: &str) {
        self.input.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        loop {
            let line = self.output.next_line().await.unwrap().expect("the libvirt driver exited (see its error above)");
            if line.contains(done) {
                return;
            }
        }
    }

    /// createXML → running, then the ready marker in the serial file, then destroy.
    pub async fn start_vm(&mut self) -> Sample {
        let _ = std::fs::remove_file(&self.serial);
        let xml = self.xml.display().to_string();
        let started = Instant::now();
        self.call(&format!("create {xml}"), "created").await;
        let control = started.elapsed();
        // libvirt writes the serial console to a file; 5 ms polling is noise well below 1% of a boot.
        let found = tokio::time::timeout(super::READY_TIMEOUT, async {
            while !std::fs::read_to_string(&self.serial).is_ok_and(|s| s.contains(READY_MARKER)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(found.is_ok(), "libvirt guest never printed the ready marker");
        let ready = started.elapsed();
        self.call("destroy", "destroyed").await;
        Sample { control, ready }
    }

    /// libvirtd's resident memory.
    pub fn libvirtd_pid(&self) -> i32 {
        self.daemons[0] as i32
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.client.start_kill();
        for pid in &self.daemons {
            kill_pid(*pid as i32);
        }
        // Guests libvirt started and did not destroy (a failed run) are found by their serial file path.
        for pid in qx_test_infra::pids_with_arg(&self.dir.path().display().to_string()) {
            kill_pid(pid);
        }
    }
}
