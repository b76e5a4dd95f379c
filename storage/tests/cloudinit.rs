//! cloud-init seeds read back with the standard tools (fsck.fat, blkid, mtools, PyYAML) and by a booted Linux
//! guest, attached the two ways QEMU 7.2 q35 offers: a read-only virtio-blk disk and an IDE CD-ROM on the built-in
//! AHCI controller.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use qx_storage::cloudinit::{
    write_seed, Addressing, Ethernet, MetaData, NetworkConfig, RunCmd, SeedConfig, User, UserData,
};

fn config() -> SeedConfig {
    SeedConfig {
        meta_data: MetaData {
            instance_id: "0b8e1c1e-4a7e-4b43-9d1c-3f3a2f1d9e01".into(),
            local_hostname: "web-1".into(),
        },
        user_data: UserData {
            hostname: Some("web-1".into()),
            default_user: true,
            users: vec![User {
                name: "ops".into(),
                ssh_authorized_keys: vec![
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@example"
                        .into(),
                ],
                password_hash: Some("$6$rounds=4096$saltsalt$8w4v0q1NQk0iIYdK3a7s5jv0Qmr3vj0b4j8d2j7Wj1".into()),
                sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
                groups: vec!["sudo".into(), "adm".into()],
                shell: Some("/bin/bash".into()),
            }],
            ssh_pwauth: Some(false),
            packages: vec!["qemu-guest-agent".into(), "nginx=1.22*".into()],
            runcmd: vec![
                RunCmd::Shell("echo \"it's: #not a comment\" > /etc/motd\u{2028}".into()),
                RunCmd::Argv(vec!["systemctl".into(), "enable".into(), "--now".into(), "qemu-guest-agent".into()]),
            ],
        },
        network_config: Some(NetworkConfig {
            ethernets: vec![
                Ethernet {
                    id: "lan".into(),
                    mac: Some("52:54:00:12:34:56".into()),
                    nic: None,
                    addressing: Addressing::Static {
                        addresses: vec!["192.0.2.10/24".into(), "2001:db8::10/64".into()],
                        gateway4: Some("192.0.2.1".parse().unwrap()),
                        gateway6: Some("2001:db8::1".parse().unwrap()),
                        nameservers: vec!["192.0.2.53".parse().unwrap()],
                        search: vec!["example.com".into()],
                    },
                    mtu: Some(1450),
                },
                Ethernet {
                    id: "eth1".into(),
                    mac: None,
                    nic: None,
                    addressing: Addressing::Dhcp { dhcp4: true, dhcp6: false },
                    mtu: None,
                },
            ],
        }),
    }
}

fn seed(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("seed.img");
    rt().block_on(write_seed(&config(), &path)).unwrap();
    path
}

#[test]
fn seed_reads_back_with_standard_tools() {
    let fsck = require_tool("fsck.fat");
    let blkid = require_tool("blkid");
    require_tool("mdir");
    let dir = tempfile::tempdir().unwrap();
    let path = seed(dir.path());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "seeds hold password hashes");

    // Exit status 0 with -n: no errors found. fsck.fat counts the volume label entry as a file.
    let out = run(Command::new(&fsck).arg("-n").arg(&path));
    assert!(out.contains(": 4 files,"), "{out}");

    let out = run(Command::new(&blkid).args(["-p", "-o", "export"]).arg(&path));
    assert!(out.lines().any(|l| l == "LABEL=cidata"), "{out}");
    assert!(out.lines().any(|l| l == "TYPE=vfat"), "{out}");

    let out = run(Command::new("mdir").args(["-b", "-i"]).arg(&path).arg("::"));
    let mut names: Vec<&str> = out.lines().map(|l| l.trim_start_matches("::/")).collect();
    names.sort();
    assert_eq!(names, ["meta-data", "network-config", "user-data"], "{out}");

    let files = config().render().unwrap();
    let read = |name: &str| run(Command::new("mtype").args(["-i"]).arg(&path).arg(format!("::{name}")));
    assert_eq!(read("user-data"), files.user_data);
    assert_eq!(read("meta-data"), files.meta_data);
    assert_eq!(read("network-config"), files.network_config.clone().unwrap());
    assert!(files.user_data.starts_with("#cloud-config\n"));
}

/// cloud-init parses the files with PyYAML: each must load to exactly the JSON document we meant.
#[test]
fn seed_files_parse_as_yaml() {
    let Some(python) = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import yaml"]).output().is_ok_and(|o| o.status.success()))
    else {
        return qx_test_infra::skip("no python3 with PyYAML (storage/tests/install-tools.sh installs python3-yaml)");
    };
    let files = config().render().unwrap();
    let body = files.user_data.strip_prefix("#cloud-config\n").unwrap();
    for (name, text) in [
        ("user-data", body),
        ("meta-data", &files.meta_data),
        ("network-config", &files.network_config.clone().unwrap()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let script = "import json, sys, yaml\n\
                      y = yaml.safe_load(open(sys.argv[1], encoding='utf-8'))\n\
                      j = json.load(open(sys.argv[1], encoding='utf-8'))\n\
                      assert y == j, (y, j)\n\
                      print('ok')";
        let out = run(Command::new(python).args(["-c", script]).arg(&file));
        assert_eq!(out.trim(), "ok", "{name}");
    }
    // The user-data file as a whole, header line included, is one YAML document (the header is a comment).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("user-data");
    std::fs::write(&file, &files.user_data).unwrap();
    let out = run(Command::new(python)
        .args([
            "-c",
            "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); print(d['users'][1]['name'], d['runcmd'][0])",
        ])
        .arg(&file));
    assert_eq!(out, "ops echo \"it's: #not a comment\" > /etc/motd\u{2028}\n");
}

/// Kills QEMU when the test ends, however it ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the test guest with the seed attached by `device` and returns the guest's `QX-GUEST-MOUNT` line for it.
fn boot_with_seed(seed: &Path, device: &str) -> String {
    let guest = qx_test_infra::test_guest();
    let file = serde_json::json!({"driver": "file", "node-name": "seed-file", "filename": seed, "read-only": true});
    let fmt = serde_json::json!({"driver": "raw", "node-name": "seed", "file": "seed-file", "read-only": true});
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-m", "256", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &guest.cmdline])
        .args(["-blockdev", &file.to_string(), "-blockdev", &fmt.to_string(), "-device", device])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let mut qemu = Qemu(child);
    let stdout = qemu.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx.send(String::from_utf8_lossy(&line).trim_end().to_owned()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut mount = None;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Some(pos) = line.find("QX-GUEST-MOUNT") {
            mount = Some(line[pos..].to_owned());
        }
        if line.contains(qx_test_infra::READY_MARKER) {
            return mount
                .unwrap_or_else(|| panic!("{device}: the guest mounted no seed; console:\n{}", seen.join("\n")));
        }
        seen.push(line);
    }
    panic!("{device}: the guest did not become ready; console:\n{}", seen.join("\n"));
}

#[test]
fn guest_mounts_seed_from_read_only_virtio_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = seed(dir.path());
    let line = boot_with_seed(&path, "virtio-blk-pci,drive=seed");
    assert_eq!(line, "QX-GUEST-MOUNT /dev/vda vfat meta-data network-config user-data");
}

#[test]
fn guest_mounts_seed_from_ide_cdrom_on_q35_ahci() {
    let dir = tempfile::tempdir().unwrap();
    let path = seed(dir.path());
    let line = boot_with_seed(&path, "ide-cd,bus=ide.0,drive=seed");
    assert_eq!(line, "QX-GUEST-MOUNT /dev/sr0 vfat meta-data network-config user-data");
}
