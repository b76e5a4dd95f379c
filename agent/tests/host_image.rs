//! The whole host, booted under QEMU: the disk image from `image/build.sh` on OVMF (TCG), two NICs (management
//! with a port forward to qx-node's API, one for VMs), a disk larger than the image. Through the API it creates and
//! starts a VM inside the host (the test guest, nested TCG) and reads its ready marker; it reads TTY1's text
//! (through the serial console's qx-console, F12, `/dev/vcs1`) and sees the console banner, takes a screendump;
//! it updates to a second good image (the host comes back on the other system, healthy, the VM still defined), is
//! refused bad update inputs without any change, and updates to a broken image (qx-node does not start), which the
//! watchdog rolls back, the failed attempt reported. Every phase's time is printed.
//!
//! Needs the three images: `QX_HOST_IMAGE`, `QX_HOST_IMAGE_UPDATE`, `QX_HOST_IMAGE_BROKEN` (output directories of
//! image/build.sh; scripts/test.sh builds them, cached). Without them the test says so and does nothing, unless
//! `CI` is set, where that is a failure.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_proto::node::v1::update_service_client::UpdateServiceClient;
use qx_test_infra::{test_guest, READY_LINE};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// One boot of the host under TCG: firmware, GRUB, kernel, OpenRC, qx-node. About a minute on a quiet machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// The nested guest runs on an emulated CPU emulating a CPU.
const NESTED_TIMEOUT: Duration = Duration::from_secs(600);
/// The broken update's trial: the watchdog's wait, then a reboot.
const HEALTH_TIMEOUT_SECONDS: u32 = 30;
const GUEST_DIR: &str = "/data/datastore/test-guest";

struct Images {
    first: PathBuf,
    update: PathBuf,
    broken: PathBuf,
}

fn images() -> Option<Images> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    match (var("QX_HOST_IMAGE"), var("QX_HOST_IMAGE_UPDATE"), var("QX_HOST_IMAGE_BROKEN")) {
        (Some(first), Some(update), Some(broken)) => Some(Images { first, update, broken }),
        _ => {
            let why = "QX_HOST_IMAGE, QX_HOST_IMAGE_UPDATE and QX_HOST_IMAGE_BROKEN are not all set (scripts/test.sh sets them)";
            qx_test_infra::skip(why);
            None
        }
    }
}

/// What the host's QEMU boots the disk with: OVMF (UEFI) or, without pflash drives, SeaBIOS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Firmware {
    Uefi,
    Bios,
}

/// The host's QEMU, killed (by PID) when dropped.
struct Host {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    started: Instant,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("host serial console:\n{}", self.serial());
        }
    }
}

impl Host {
    /// Boots `disk` (a qcow2 over the image) on OVMF or SeaBIOS, with the API forwarded to a free local port.
    fn boot(disk_image: &Path, firmware: Firmware) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path();
        let disk = d.join("disk.img");
        std::fs::copy(disk_image, &disk).unwrap();
        seed_test_guest(&disk, d);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&disk)
            .arg(d.join("host.qcow2"))
            .arg("8G"));
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "tcg", "-machine", "q35", "-cpu", "max", "-m", "3072", "-smp", "2", "-nodefaults"])
            .args(["-display", "none", "-vga", "std"]);
        if firmware == Firmware::Uefi {
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", d.join("vars.fd")).unwrap();
            qemu.arg("-drive")
                .arg("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,file={}", d.join("vars.fd").display()));
        }
        let child = qemu
            .arg("-drive")
            .arg(format!("if=virtio,format=qcow2,file={}", d.join("host.qcow2").display()))
            .args([
                "-netdev",
                &format!("user,id=mgmt,hostfwd=tcp:127.0.0.1:{port}-:9443"),
                "-device",
                "virtio-net-pci,netdev=mgmt",
            ])
            .args(["-netdev", "user,id=vms", "-device", "virtio-net-pci,netdev=vms"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser,path={},server=on,wait=off,logfile={}",
                d.join("serial.sock").display(),
                d.join("serial.log").display()
            ))
            .args(["-serial", "chardev:ser"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", d.join("qmp.sock").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64");
        Host { child, dir, port, started: Instant::now() }
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join("serial.log")).unwrap_or_default()).into_owned()
    }

    /// Waits for the `nth` (1-based) appearance of `needle` on the serial console; returns when it saw it.
    fn wait_serial(&self, needle: &str, nth: usize, timeout: Duration) -> Instant {
        qx_test_infra::wait_until(timeout, || (self.serial().matches(needle).count() >= nth).then(Instant::now))
            .unwrap_or_else(|| panic!("the host's serial console never showed {needle:?} {nth} times"))
    }

    fn type_serial(&self, text: &str) {
        let mut sock = UnixStream::connect(self.dir.path().join("serial.sock")).unwrap();
        for chunk in text.as_bytes().chunks(8) {
            sock.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `screendump` of the host's display as a PNG.
    fn screendump(&self, to: &Path) {
        let mut qmp = UnixStream::connect(self.dir.path().join("qmp.sock")).unwrap();
        let command = format!(
            "{{\"execute\":\"qmp_capabilities\"}}\n{{\"execute\":\"screendump\",\"arguments\":{{\"filename\":\"{}\",\"format\":\"png\"}}}}\n",
            to.display()
        );
        qmp.write_all(command.as_bytes()).unwrap();
        qmp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while seen.matches("\"return\"").count() < 2 {
            let n = qmp.read(&mut buf).unwrap();
            assert!(n > 0, "QMP closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(std::fs::metadata(to).unwrap().len() > 0, "screendump wrote nothing");
    }

    /// The API over mutual TLS, with the admin certificate `seed_test_guest` made from the seeded CA.
    async fn channel(&self) -> Option<Channel> {
        let read = |name: &str| std::fs::read(self.dir.path().join("client").join(name)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
            .identity(tonic::transport::Identity::from_pem(read("cert.pem"), read("key.pem")))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600))
            .connect()
            .await
            .ok()
    }

    /// Waits until qx-node answers GetNodeInfo through the port forward.
    async fn wait_api(&self, timeout: Duration) -> (Channel, pb::NodeInfo) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(channel) = self.channel().await {
                let mut node = NodeServiceClient::new(channel.clone());
                if let Ok(info) = node.get_node_info(pb::GetNodeInfoRequest {}).await {
                    return (channel, info.into_inner());
                }
            }
            assert!(Instant::now() < deadline, "qx-node never answered on port {}:\n{}", self.port, self.serial());
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Waits until the API stops answering (the host went down for a reboot).
    async fn wait_api_gone(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Some(channel) = self.channel().await {
            if NodeServiceClient::new(channel).get_node_info(pb::GetNodeInfoRequest {}).await.is_err() {
                return;
            }
            assert!(Instant::now() < deadline, "the host never went down for its reboot");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn run(command: &mut Command) {
    let status = command.status().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(status.success(), "{command:?}: {status}");
}

fn output(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Puts the test guest's kernel and initrd into the data partition of `disk` (which the host mounts at /data), the
/// way an operator copies an ISO to a datastore: a new ext4 of the same size and label, written over partition 5.
/// Also seeds the node's certificates there (the image's `tls.certificates_dir`), from a CA the test holds, and
/// signs an admin client certificate for the test under `work/client`.
fn seed_test_guest(disk: &Path, work: &Path) {
    let guest = test_guest();
    let stage = work.join("data-stage");
    let dir = stage.join(GUEST_DIR.trim_start_matches("/data/"));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = qx_agent::certs::CertPaths::new(stage.join("quantix/certificates"));
    certs.ensure("localhost", &[]).unwrap();
    let (key, csr) = qx_agent::certs::new_key_and_csr("host-image-test").unwrap();
    let issued = certs.issue_client(&csr, "host-image-test", qx_agent::certs::Role::Admin, 2).unwrap();
    let client = work.join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::write(client.join("key.pem"), key).unwrap();
    std::fs::write(client.join("cert.pem"), issued.certificate_pem).unwrap();
    std::fs::write(client.join("ca.pem"), issued.ca_pem).unwrap();
    std::fs::copy(&guest.kernel, dir.join("vmlinux")).unwrap();
    std::fs::copy(&guest.initrd, dir.join("initrd.img")).unwrap();
    let info = output(Command::new("sgdisk").arg("-i").arg("5").arg(disk));
    let field = |name: &str| -> u64 {
        let line = info.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("sgdisk -i 5: no {name}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let (start, sectors) = (field("First sector:"), field("Partition size:"));
    let data = work.join("data.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "quantix-data", "-E", "root_owner=0:0", "-d"])
        .arg(&stage)
        .arg(&data)
        .arg(format!("{}K", sectors / 2)));
    run(Command::new("dd")
        .arg(format!("if={}", data.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "oflag=seek_bytes", "status=none"])
        .arg(format!("seek={}", start * 512)));
    std::fs::remove_file(data).unwrap();
}

/// Polls GetNodeInfo until the last update has `outcome` (qx-node reports health a moment after it serves).
async fn wait_outcome(node: &mut NodeServiceClient<Channel>, outcome: pb::UpdateOutcome) -> pb::SystemStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = node.get_node_info(pb::GetNodeInfoRequest {}).await.expect("GetNodeInfo").into_inner();
        let system = system_of(&info);
        if system.last_update.as_ref().is_some_and(|u| u.outcome == outcome as i32) {
            return system;
        }
        assert!(Instant::now() < deadline, "the last update never became {outcome:?}: {system:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn system_of(info: &pb::NodeInfo) -> pb::SystemStatus {
    info.system.clone().expect("NodeInfo.system")
}

fn slot(s: &Option<pb::SystemSlot>) -> (String, String) {
    s.as_ref().map_or_else(Default::default, |s| (s.slot.clone(), s.version.clone()))
}

fn version_of(image: &Path) -> String {
    std::fs::read_to_string(image.join("version")).unwrap().trim().to_owned()
}

/// Streams `image`'s system.qxi through UpdateHost; returns the last progress message's status or the error.
async fn update(
    channel: &Channel,
    bytes: Vec<u8>,
    size: u64,
    sha256: String,
    reboot: bool,
    health_timeout_seconds: u32,
) -> Result<pb::SystemStatus, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let start = pb::UpdateHostStart {
        size,
        sha256,
        reboot,
        confirm_running_vms: true,
        health_timeout_seconds,
        ..Default::default()
    };
    tx.send(pb::UpdateHostRequest { message: Some(pb::update_host_request::Message::Start(start)) }).await.unwrap();
    tokio::spawn(async move {
        for chunk in bytes.chunks(1 << 20) {
            let chunk =
                pb::UpdateHostRequest { message: Some(pb::update_host_request::Message::Chunk(chunk.to_vec())) };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let mut client = UpdateServiceClient::new(channel.clone());
    let mut progress = client.update_host(ReceiverStream::new(rx)).await?.into_inner();
    let mut phases = Vec::new();
    let mut last = None;
    while let Some(message) = progress.message().await? {
        if phases.last() != Some(&message.phase) {
            phases.push(message.phase);
        }
        last = message.status.or(last);
    }
    let done = pb::UpdatePhase::Done as i32;
    assert_eq!(phases.last(), Some(&done), "phases {phases:?}");
    Ok(last.expect("the last progress message carries the status"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn phase(name: &str, took: Duration) {
    eprintln!("host image phase: {name:<40} {:>7.1} s", took.as_secs_f64());
}

/// The same disk boots under SeaBIOS: GRUB's BIOS core (boot.img in the protective MBR, core.img in the BIOS boot
/// partition) reads the same grub.cfg and environment block, starts system A, and its initramfs hands over to
/// OpenRC on the system's root.
#[test]
fn the_disk_boots_under_bios_too() {
    let Some(images) = images() else { return };
    let host = Host::boot(&images.first.join("disk.img"), Firmware::Bios);
    let kernel_at = host.wait_serial("Quantix: starting system a", 1, BOOT_TIMEOUT);
    phase("firmware -> kernel (SeaBIOS, GRUB)", kernel_at - host.started);
    let init_at = host.wait_serial("OpenRC", 1, BOOT_TIMEOUT);
    phase("kernel -> OpenRC on system A (BIOS)", init_at - kernel_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_host_boots_runs_a_vm_updates_and_rolls_back() {
    let Some(images) = images() else { return };
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("host-image");
    std::fs::create_dir_all(&artifacts).unwrap();
    let (v1, v2, broken) = (version_of(&images.first), version_of(&images.update), version_of(&images.broken));

    // First boot: firmware to GRUB starting the kernel, kernel to qx-node serving through the forward.
    let host = Host::boot(&images.first.join("disk.img"), Firmware::Uefi);
    let kernel_at = host.wait_serial("Quantix: starting system a", 1, BOOT_TIMEOUT);
    phase("firmware -> kernel (OVMF, GRUB)", kernel_at - host.started);
    let (channel, info) = host.wait_api(BOOT_TIMEOUT).await;
    phase("kernel -> qx-node serving (first boot)", kernel_at.elapsed());
    let system = system_of(&info);
    assert_eq!(system.unavailable, "");
    assert_eq!(slot(&system.active), ("a".into(), v1.clone()));
    assert_eq!(system.fallback, None, "system B is empty on a new disk");
    let mut node = NodeServiceClient::new(channel.clone());
    let pool = node.get_pool(pb::PoolRef { name: "default".into() }).await.expect("GetPool default").into_inner();
    assert!(pool.capacity_bytes > 4 << 30, "the data partition grew to the 8 GiB disk: {pool:?}");

    // A VM inside the host: the test guest under nested TCG, its ready marker through the API's console.
    let guest = test_guest();
    let spec_text = format!(
        "name: nested\nmemory_mib: 256\naccelerator: tcg\nkernel:\n  kernel: {GUEST_DIR}/vmlinux\n  initrd: {GUEST_DIR}/initrd.img\n  cmdline: \"{}\"\n",
        guest.cmdline
    );
    node.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm inside the host");
    let started = Instant::now();
    node.start_vm(pb::StartVmRequest { name: "nested".into(), paused: false }).await.expect("StartVm inside the host");
    let mut console = common::Console::open(&mut node, "nested").await;
    console.expect(READY_LINE, NESTED_TIMEOUT).await;
    phase("nested VM start -> ready marker", started.elapsed());

    // TTY1 through the serial console's qx-console: F12, Enter, a shell, /dev/vcs1.
    host.wait_serial("F12", 1, Duration::from_secs(120));
    host.type_serial("\x1b[24~");
    std::thread::sleep(Duration::from_secs(2));
    host.type_serial("\r");
    std::thread::sleep(Duration::from_secs(3));
    host.type_serial("tr -s ' ' </dev/vcs1; echo; echo VCS1-DONE''MARK\n");
    host.wait_serial("VCS1-DONEMARK", 1, Duration::from_secs(60));
    let serial = host.serial();
    let tty1 = serial.rsplit("/dev/vcs1").next().unwrap_or_default();
    assert!(tty1.contains("Quantix") && tty1.contains("F2"), "TTY1 shows no console banner:\n{tty1}");
    host.type_serial("exit\n");
    host.screendump(&artifacts.join("tty1.png"));
    eprintln!("host image: TTY1 screendump at {}", artifacts.join("tty1.png").display());

    // Bad update inputs: refused, nothing changed.
    let good = std::fs::read(images.update.join("system.qxi")).unwrap();
    let (size, sha) = (good.len() as u64, sha256_hex(&good));
    let wrong_sha = update(&channel, good.clone(), size, "0".repeat(64), false, 0).await.unwrap_err();
    assert_eq!(wrong_sha.code(), Code::InvalidArgument, "{wrong_sha:?}");
    assert!(wrong_sha.message().starts_with("sha256:"), "{}", wrong_sha.message());
    let truncated = update(&channel, good[..good.len() / 2].to_vec(), size, sha.clone(), false, 0).await.unwrap_err();
    assert!(truncated.message().contains("the stream ended after"), "{}", truncated.message());
    let junk = vec![0x42u8; 8 << 20];
    let not_an_image =
        update(&channel, junk.clone(), junk.len() as u64, sha256_hex(&junk), false, 0).await.unwrap_err();
    assert!(not_an_image.message().starts_with("image: not a Quantix system image"), "{}", not_an_image.message());
    let unchanged = system_of(&node.get_node_info(pb::GetNodeInfoRequest {}).await.unwrap().into_inner());
    assert_eq!(
        (slot(&unchanged.active), unchanged.fallback.clone(), unchanged.pending.clone()),
        (("a".into(), v1.clone()), None, String::new())
    );

    // A good update: written to B, booted once, healthy, the default; A is the fallback; the VM is still defined.
    let started = Instant::now();
    let status = update(&channel, good, size, sha, true, 0).await.expect("UpdateHost");
    phase("update streamed, verified, written", started.elapsed());
    assert_eq!(status.pending, "b");
    assert_eq!(slot(&status.fallback), ("b".into(), v2.clone()));
    drop(console);
    host.wait_api_gone(Duration::from_secs(120)).await;
    let rebooting = Instant::now();
    let kernel_at = host.wait_serial("Quantix: starting system b", 1, BOOT_TIMEOUT);
    let (channel, _) = host.wait_api(BOOT_TIMEOUT).await;
    phase("reboot -> qx-node serving on system B", rebooting.elapsed());
    phase("kernel -> qx-node serving (system B)", kernel_at.elapsed());
    let mut node = NodeServiceClient::new(channel.clone());
    let system = wait_outcome(&mut node, pb::UpdateOutcome::Succeeded).await;
    assert_eq!(slot(&system.active), ("b".into(), v2.clone()));
    assert_eq!(slot(&system.fallback), ("a".into(), v1.clone()));
    assert!(!system.trial);
    let vms = node.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms;
    assert!(
        vms.iter().any(|vm| vm.spec.as_ref().is_some_and(|s| s.name == "nested")),
        "the VM is still defined: {vms:?}"
    );

    // A broken update (qx-node exits at once): the watchdog reboots into B, which records the failed attempt.
    let bad = std::fs::read(images.broken.join("system.qxi")).unwrap();
    let (size, sha) = (bad.len() as u64, sha256_hex(&bad));
    update(&channel, bad, size, sha, true, HEALTH_TIMEOUT_SECONDS).await.expect("UpdateHost (broken image)");
    host.wait_api_gone(Duration::from_secs(120)).await;
    let rebooting = Instant::now();
    host.wait_serial("Quantix: starting system a", 2, BOOT_TIMEOUT);
    host.wait_serial("no healthy report within", 1, BOOT_TIMEOUT);
    host.wait_serial("Quantix: starting system b", 2, BOOT_TIMEOUT);
    let (channel, _) = host.wait_api(BOOT_TIMEOUT).await;
    phase("broken update -> rolled back, serving on B", rebooting.elapsed());
    let system = wait_outcome(&mut NodeServiceClient::new(channel.clone()), pb::UpdateOutcome::RolledBack).await;
    assert_eq!(slot(&system.active), ("b".into(), v2));
    assert_eq!(system.fallback, None, "the failed system is no fallback");
    let last = system.last_update.expect("the failed attempt is recorded");
    assert_eq!((last.slot.as_str(), last.version.as_str()), ("a", broken.as_str()));
    assert!(last.message.contains("did not report healthy"), "{}", last.message);
    drop(channel);
}
