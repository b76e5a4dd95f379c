//! A real distribution guest end to end: the Debian guest (test_infra/guest/build-debian.sh) imported into the
//! image library, a VM on a thin qcow2 overlay of it with a cloud-init seed from qx-node, and everything the seed
//! asks for checked from inside the guest over SSH (through the user NIC's loopback port forward): the hostname, the
//! user with the key this test made, the static address on the NIC matched by its MAC, `runcmd`. The library image
//! stays byte-identical. The guest agent API (GetVm's agent status, GetGuestInfo, ExecGuest, guest files and
//! passwords) agrees with what the guest shows over SSH.
//!
//! One guest boots for all the checks (about a minute to cloud-init's "finished" under TCG).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::guest_agent_service_client::GuestAgentServiceClient;
use qx_test_infra::debian_guest;
use sha2::{Digest, Sha256};

/// Boot to cloud-init's "finished" takes ~1 min alone under TCG; other tests share the two cores.
const CLOUD_INIT_TIMEOUT: Duration = Duration::from_secs(420);
const GUEST_ADDRESS: &str = "10.0.2.15";

/// The SSH client side: a key pair made for this test, and the loopback port forwarded to the guest's port 22.
struct Ssh {
    key: PathBuf,
    port: u16,
}

impl Ssh {
    fn new(dir: &Path) -> Self {
        let key = dir.join("id_ed25519");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "qx-test@host", "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen (openssh-client, scripts/install-deps.sh)");
        assert!(status.success(), "ssh-keygen: {status}");
        Self { key, port: free_port() }
    }

    fn public_key(&self) -> String {
        std::fs::read_to_string(self.key.with_extension("pub")).unwrap().trim().to_owned()
    }

    /// Runs `command` as `user` in the guest; Err holds ssh's exit status and stderr.
    async fn run(&self, user: &str, command: &str) -> Result<String, String> {
        let output = tokio::process::Command::new("ssh")
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"])
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .map_err(|_| format!("ssh {command:?} did not finish in 60 s"))?
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(format!("ssh {command:?}: {}; stderr:\n{}", output.status, String::from_utf8_lossy(&output.stderr)))
        }
    }
}

/// A loopback port nothing listens on right now (QEMU binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sha256_of(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap();
    format!("{:x}", hasher.finalize())
}

async fn import(client: &mut Client, name: &str, source: &Path) -> pb::Image {
    let request = pb::ImportImageRequest {
        name: name.into(),
        kind: pb::ImageKind::CloudImage as i32,
        source_path: source.display().to_string(),
        ..Default::default()
    };
    let mut stream = client.import_image(request).await.expect("ImportImage").into_inner();
    loop {
        match stream.message().await.expect("import").and_then(|op| op.event) {
            Some(pb::image_operation::Event::Image(image)) => return image,
            Some(pb::image_operation::Event::Progress(_)) => {}
            None => panic!("the import ended without an image"),
        }
    }
}

async fn overlay(client: &mut Client, name: &str, image: &pb::Image) -> pb::Volume {
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        image: image.name.clone(),
        from_image: pb::FromImage::Overlay as i32,
        size_bytes: image.virtual_size_bytes,
        ..Default::default()
    };
    let mut stream = client.create_volume(request).await.expect("CreateVolume").into_inner();
    while let Some(op) = stream.message().await.expect("CreateVolume") {
        if let Some(pb::volume_operation::Event::Volume(volume)) = op.event {
            return volume;
        }
    }
    panic!("the stream ended without a volume");
}

type Guests = GuestAgentServiceClient<tonic::transport::Channel>;

/// Runs `argv` through ExecGuest; returns the exit code, stdout and stderr.
async fn exec(
    guests: &mut Guests,
    argv: &[&str],
    stdin: &[u8],
    timeout: u32,
) -> Result<(i64, String, String), tonic::Status> {
    let request = pb::ExecGuestRequest {
        vm: "deb".into(),
        path: argv[0].into(),
        args: argv[1..].iter().map(|a| a.to_string()).collect(),
        stdin: stdin.to_vec(),
        timeout_seconds: timeout,
        ..Default::default()
    };
    let mut stream = guests.exec_guest(request).await?.into_inner();
    let mut started = false;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::exec_guest_event::Event::Started(pid)) => {
                assert!(pid > 0, "guest pid {pid}");
                started = true;
            }
            Some(pb::exec_guest_event::Event::Exited(exited)) => {
                assert!(started, "exited came before started");
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                return Ok((exited.exit_code.unwrap_or(-1), text(&exited.stdout), text(&exited.stderr)));
            }
            None => {}
        }
    }
    panic!("the exec stream ended without an exit");
}

/// Everything the guest agent API promises, checked against what the guest shows over SSH. Err says what differs.
async fn guest_agent_checks(client: &mut Client, guests: &mut Guests, ssh: &Ssh, mac: &str) -> Result<(), String> {
    let shell = |command: &'static str| async move { ssh.run("ops", command).await };
    // qemu-ga opened its port during boot; GetVm shows it connected with its version once qx-node heard it.
    let mut agent = None;
    for _ in 0..30 {
        let vm = get(client, "deb").await;
        agent = vm.runtime.and_then(|r| r.guest_agent);
        if agent.as_ref().is_some_and(|a| a.state == pb::GuestAgentState::Connected as i32 && !a.version.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let agent = agent.ok_or("GetVm has no guest agent status")?;
    if agent.state != pb::GuestAgentState::Connected as i32 || !agent.version.starts_with("7.2") {
        return Err(format!("GetVm's guest agent: {agent:?}"));
    }

    let info = guests
        .get_guest_info(pb::GetGuestInfoRequest { vm: "deb".into() })
        .await
        .map_err(|e| format!("GetGuestInfo: {e:?}"))?
        .into_inner();
    let os = info.os.clone().unwrap_or_default();
    let kernel = shell("uname -r").await?;
    // The agent reports the zone's abbreviation (tzname), as `date` prints it.
    let zone = shell("date +%Z").await?;
    let mut wrong = Vec::new();
    let mut want = |what: &str, ok: bool, got: String| {
        if !ok {
            wrong.push(format!("{what}: {got}"));
        }
    };
    want("os id", os.id == "debian" && os.version_id == "12", format!("{os:?}"));
    want("kernel", os.kernel_release == kernel, format!("agent {:?}, uname {kernel:?}", os.kernel_release));
    want("host name", info.host_name == "deb-e2e", info.host_name.clone());
    want("time zone", info.timezone == zone, format!("agent {:?}, guest {zone:?}", info.timezone));
    let nic = info.interfaces.iter().find(|n| n.mac.eq_ignore_ascii_case(mac));
    let address = nic.and_then(|n| n.addresses.iter().find(|a| a.family == "ipv4"));
    want(
        "NIC address",
        address.is_some_and(|a| format!("{}/{}", a.address, a.prefix) == format!("{GUEST_ADDRESS}/24")),
        format!("{:?}", info.interfaces),
    );
    let root = info.filesystems.iter().find(|f| f.mountpoint == "/");
    want("root fs", root.is_some_and(|f| f.fs_type == "ext4" && f.total_bytes > 0), format!("{:?}", info.filesystems));
    want("unavailable", info.unavailable.is_empty(), format!("{:?}", info.unavailable));
    if !wrong.is_empty() {
        return Err(format!("GetGuestInfo differs from the guest:\n{}", wrong.join("\n")));
    }

    // Exec: exit code, both outputs, stdin.
    let ran =
        exec(guests, &["/bin/sh", "-c", "read line; echo \"got $line\"; echo oops >&2; exit 7"], b"hello\n", 30).await;
    let ran = ran.map_err(|e| format!("ExecGuest: {e:?}"))?;
    if ran != (7, "got hello\n".to_owned(), "oops\n".to_owned()) {
        return Err(format!("ExecGuest answered {ran:?}"));
    }
    // A program past its timeout is killed, and the call says so.
    let err = exec(guests, &["/bin/sleep", "300"], b"", 2).await.expect_err("sleep 300 with a 2 s timeout");
    if err.code() != tonic::Code::DeadlineExceeded || !err.message().contains("killed") {
        return Err(format!("ExecGuest past its timeout: {err:?}"));
    }
    let left = shell("pgrep -x sleep || true").await?;
    if !left.is_empty() {
        return Err(format!("the timed-out program still runs: pids {left}"));
    }

    // Files: written through the agent, read over SSH, and back.
    let content = b"written by the guest agent\n\x00\x01\xff".to_vec();
    let write =
        pb::WriteGuestFileRequest { vm: "deb".into(), path: "/var/tmp/qx-agent-file".into(), content: content.clone() };
    guests.write_guest_file(write).await.map_err(|e| format!("WriteGuestFile: {e:?}"))?;
    let over_ssh = shell("sudo od -An -tx1 /var/tmp/qx-agent-file | tr -s ' \n' ' '").await?;
    let hex: Vec<String> = content.iter().map(|b| format!("{b:02x}")).collect();
    if over_ssh.trim() != hex.join(" ") {
        return Err(format!("the file over SSH holds {over_ssh:?}, want {:?}", hex.join(" ")));
    }
    shell("echo made over ssh > /var/tmp/qx-ssh-file").await?;
    let read = pb::ReadGuestFileRequest { vm: "deb".into(), path: "/var/tmp/qx-ssh-file".into(), max_bytes: 0 };
    let read = guests.read_guest_file(read).await.map_err(|e| format!("ReadGuestFile: {e:?}"))?.into_inner();
    if read.content != b"made over ssh\n" {
        return Err(format!("ReadGuestFile: {:?}", String::from_utf8_lossy(&read.content)));
    }
    let missing = pb::ReadGuestFileRequest { vm: "deb".into(), path: "/nonexistent".into(), max_bytes: 0 };
    let err = guests.read_guest_file(missing).await.expect_err("a missing file");
    if err.code() != tonic::Code::FailedPrecondition || !err.message().contains("No such file") {
        return Err(format!("ReadGuestFile of a missing file: {err:?}"));
    }

    // Password: the shadow entry changes from locked to a hash.
    let before = shell("sudo getent shadow ops | cut -d: -f2").await?;
    let set = pb::SetGuestPasswordRequest {
        vm: "deb".into(),
        user: "ops".into(),
        password: "s3cret-Pass".into(),
        crypted: false,
    };
    guests.set_guest_password(set).await.map_err(|e| format!("SetGuestPassword: {e:?}"))?;
    let after = shell("sudo getent shadow ops | cut -d: -f2").await?;
    if after == before || !after.starts_with('$') {
        return Err(format!("the shadow entry went from {before:?} to {after:?}"));
    }
    Ok(())
}

fn spec_yaml(name: &str, ssh: &Ssh) -> String {
    let guest = debian_guest();
    let key = ssh.public_key();
    format!(
        "name: {name}
accelerator: tcg
memory_mib: 1024
kernel:
  kernel: {kernel}
  initrd: {initrd}
  cmdline: \"{cmdline}\"
disks:
  - volume: default/{name}-root
nics:
  - kind: user
    host_forwards: [{{host_port: {port}, guest_port: 22}}]
cloud_init:
  user_data:
    hostname: deb-e2e
    users:
      - name: ops
        ssh_authorized_keys: [\"{key}\"]
        sudo: \"ALL=(ALL) NOPASSWD:ALL\"
        shell: /bin/bash
    runcmd:
      - \"echo qx-runcmd-ran > /var/tmp/qx-runcmd\"
  network_config:
    ethernets:
      - id: eth0
        addressing: {{kind: static, addresses: [{GUEST_ADDRESS}/24], gateway4: 10.0.2.2, nameservers: [10.0.2.3]}}
",
        kernel = guest.kernel.display(),
        initrd = guest.initrd.display(),
        cmdline = guest.cmdline,
        port = ssh.port,
    )
}

/// What a failed check prints: the guest's console (boot, cloud-init's own lines) and what cloud-init says of itself
/// when SSH works at all.
async fn post_mortem(ssh: &Ssh, console: &Console) -> String {
    let status = ssh.run("ops", "cloud-init status --long; sudo tail -n 40 /var/log/cloud-init.log").await;
    format!(
        "--- cloud-init (over SSH) ---\n{}\n--- console ---\n{}",
        status.unwrap_or_else(|e| format!("unavailable: {e}")),
        console.seen
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_guest_applies_its_cloud_init_seed_on_an_overlay() {
    let guest = debian_guest();
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let scratch = tempfile::tempdir().unwrap();
    let ssh = Ssh::new(scratch.path());

    let image = import(&mut client, "debian12", &guest.disk).await;
    assert_eq!(image.format, pb::DiskFormat::Qcow2 as i32, "{image:?}");
    let library_file = daemon.data_dir().join("pools/default/images").join("debian12.qcow2");
    let library_hash = sha256_of(&library_file);
    let root = overlay(&mut client, "deb-root", &image).await;
    assert_eq!((root.origin.as_str(), root.backing_image.as_str()), ("overlay", "debian12"));

    let spec_text = spec_yaml("deb", &ssh);
    let vm = client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm").into_inner();
    let mac = vm.spec.as_ref().unwrap().nics[0].mac.clone();
    let started = Instant::now();
    start(&mut client, "deb").await;
    let mut console = Console::open(&mut client, "deb").await;
    console.expect(" finished at ", CLOUD_INIT_TIMEOUT).await;
    eprintln!("debian guest: StartVm to cloud-init finished in {:.1} s", started.elapsed().as_secs_f64());

    // sshd may start a moment after cloud-init's final stage prints.
    let mut login = ssh.run("ops", "id -un").await;
    for _ in 0..10 {
        if login.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        login = ssh.run("ops", "id -un").await;
    }
    let user = match login {
        Ok(user) => user,
        Err(e) => panic!("SSH login as ops failed: {e}\n{}", post_mortem(&ssh, &console).await),
    };
    assert_eq!(user, "ops");

    let check = |command: &'static str| {
        let ssh = &ssh;
        async move { ssh.run("ops", command).await }
    };
    let facts = [
        ("hostname", check("hostname").await),
        ("runcmd", check("cat /var/tmp/qx-runcmd").await),
        ("sudo", check("sudo -n id -un").await),
        ("cloud-init", check("cloud-init status").await),
        ("eth0 address", check("ip -4 -o addr show dev eth0 | awk '{print $4}'").await),
        ("eth0 mac", check("cat /sys/class/net/eth0/address").await),
        ("default route", check("ip -4 route show default").await),
    ];
    let got: Vec<(&str, String)> = facts.into_iter().map(|(what, r)| (what, r.unwrap_or_else(|e| e))).collect();
    let expected = [
        ("hostname", "deb-e2e".to_owned()),
        ("runcmd", "qx-runcmd-ran".to_owned()),
        ("sudo", "root".to_owned()),
        ("cloud-init", "status: done".to_owned()),
        ("eth0 address", format!("{GUEST_ADDRESS}/24")),
        ("eth0 mac", mac.to_ascii_lowercase()),
    ];
    let mut wrong: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|((_, want), (_, have))| want != have)
        .map(|((what, want), (_, have))| format!("{what}: want {want:?}, got {have:?}"))
        .collect();
    if !got[6].1.starts_with("default via 10.0.2.2 dev eth0") {
        wrong.push(format!("default route: got {:?}", got[6].1));
    }
    if !wrong.is_empty() {
        panic!("the guest does not show its seed:\n{}\n{}", wrong.join("\n"), post_mortem(&ssh, &console).await);
    }

    // The guest agent, through qx-node's API: what it reports matches what the guest shows over SSH.
    let channel = qx_agent::client::channel(daemon.socket()).await.expect("connect to qx-node");
    let mut guests = GuestAgentServiceClient::new(channel);
    if let Err(e) = guest_agent_checks(&mut client, &mut guests, &ssh, &mac).await {
        panic!("guest agent: {e}\n{}", post_mortem(&ssh, &console).await);
    }

    client.stop_vm(pb::StopVmRequest { name: "deb".into(), force: true, timeout_seconds: 0 }).await.expect("StopVm");
    assert_eq!(sha256_of(&library_file), library_hash, "the library image changed");
}
