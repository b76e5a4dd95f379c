//! cloud-init NoCloud seeds: `meta-data`, `user-data` (`#cloud-config`) and `network-config` (version 2) on a FAT
//! filesystem labelled `cidata`, which cloud-init finds by label at first boot.
//!
//! The three files are written as JSON, which YAML parsers read as YAML (cloud-init documents `#cloud-config`
//! followed by JSON); serde_json does all quoting, and the few characters YAML 1.1 forbids raw are escaped on top.
//! User-data holds password hashes: it is never logged, its `Debug` is redacted, and seed files are mode 0600.

use std::fmt;
use std::io::{Cursor, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::atomic::{self, AtomicError};
use crate::validate::{Invalid, Problems};

/// The volume label cloud-init's NoCloud datasource looks for.
pub const SEED_LABEL: &str = "cidata";

/// The FAT sector size of seeds [`write_seed`] makes. Linux mounts a FAT only when its sectors are at least the
/// device's: 2048 fits a CD-ROM drive (2048-byte blocks) and a virtio/SCSI/IDE disk (512) alike, so one image
/// attaches either way.
pub const SEED_SECTOR_SIZE: u16 = 2048;

/// Everything one seed carries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedConfig {
    pub meta_data: MetaData,
    #[serde(default)]
    pub user_data: UserData,
    /// None: no network-config file, and cloud-init configures DHCP on the first NIC.
    #[serde(default)]
    pub network_config: Option<NetworkConfig>,
}

impl fmt::Debug for SeedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedConfig")
            .field("meta_data", &self.meta_data)
            .field("user_data", &self.user_data)
            .field("network_config", &self.network_config)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaData {
    /// cloud-init runs its once-per-instance modules again when this changes: keep it stable for a VM (its UUID).
    pub instance_id: String,
    pub local_hostname: String,
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserData {
    pub hostname: Option<String>,
    /// Keep the image's default user (e.g. `debian`) besides `users`. Default false: only `users` exist.
    pub default_user: bool,
    pub users: Vec<User>,
    /// Allow SSH password logins. None leaves the image's setting.
    pub ssh_pwauth: Option<bool>,
    /// Debian/Ubuntu package names (optionally `name=version`), installed at first boot.
    pub packages: Vec<String>,
    /// Commands run once at the end of first boot, in order.
    pub runcmd: Vec<RunCmd>,
}

impl fmt::Debug for UserData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets live here (password hashes, commands with tokens): show only the shape.
        f.debug_struct("UserData")
            .field("users", &self.users.len())
            .field("packages", &self.packages.len())
            .field("runcmd", &self.runcmd.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct User {
    pub name: String,
    pub ssh_authorized_keys: Vec<String>,
    /// A crypt(3) hash (`$6$...`, `$y$...`, as from `mkpasswd`), never a plain password. Enables password login.
    pub password_hash: Option<String>,
    /// A sudoers rule, e.g. `ALL=(ALL) NOPASSWD:ALL`.
    pub sudo: Option<String>,
    pub groups: Vec<String>,
    /// Login shell, e.g. `/bin/bash`.
    pub shell: Option<String>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("ssh_authorized_keys", &self.ssh_authorized_keys.len())
            .field("password_hash", &self.password_hash.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// One `runcmd` entry: a shell command line, or an argv run without a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunCmd {
    Shell(String),
    Argv(Vec<String>),
}

/// Network configuration version 2 (netplan's schema, which cloud-init renders for any distribution).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub ethernets: Vec<Ethernet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ethernet {
    /// The configuration's id; also the interface name when `mac` is absent.
    pub id: String,
    /// Match the NIC by MAC address (and name it `id`): robust against PCI order and the guest's naming scheme
    /// (`enp1s0` on Debian, where `eth0` matches nothing).
    #[serde(default)]
    pub mac: Option<String>,
    /// The VM NIC this configuration is for, by id (`"nic0"`) or index (`"0"`); the VM layer resolves it into `mac` before
    /// rendering (see `qx_vmm::spec::VmSpec::seed_config`). Exclusive with `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<String>,
    pub addressing: Addressing,
    #[serde(default)]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Addressing {
    Dhcp {
        #[serde(default = "yes")]
        dhcp4: bool,
        #[serde(default)]
        dhcp6: bool,
    },
    Static {
        /// Addresses with prefix length, `192.0.2.10/24` or `2001:db8::10/64`.
        addresses: Vec<String>,
        #[serde(default)]
        gateway4: Option<Ipv4Addr>,
        #[serde(default)]
        gateway6: Option<Ipv6Addr>,
        #[serde(default)]
        nameservers: Vec<IpAddr>,
        #[serde(default)]
        search: Vec<String>,
    },
}

fn yes() -> bool {
    true
}

/// The rendered files.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: Option<String>,
}

impl fmt::Debug for SeedFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedFiles")
            .field("meta_data", &self.meta_data)
            .field("user_data", &format_args!("<{} bytes redacted>", self.user_data.len()))
            .field("network_config", &self.network_config)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid cloud-init seed: {0}")]
    Invalid(Invalid),
    #[error("build the FAT image for seed {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write seed {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: AtomicError,
    },
    #[error("build seed {path} on a blocking thread")]
    Join {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl SeedConfig {
    /// Checks every field; reports all problems, never echoing password hashes.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut p = Problems::default();
        let id = &self.meta_data.instance_id;
        if id.is_empty() || id.len() > 255 || id.chars().any(|c| c.is_control()) {
            p.add("meta_data.instance_id", id, "must be 1 to 255 printable characters");
        }
        check_hostname(&mut p, "meta_data.local_hostname", &self.meta_data.local_hostname);
        let u = &self.user_data;
        if let Some(h) = &u.hostname {
            check_hostname(&mut p, "user_data.hostname", h);
        }
        for (i, user) in u.users.iter().enumerate() {
            let f = |s: &str| format!("user_data.users[{i}].{s}");
            if !is_unix_name(&user.name) {
                p.add(f("name"), &user.name, "is not a user name ([a-z_][a-z0-9_-]*, at most 32)");
            }
            for (k, key) in user.ssh_authorized_keys.iter().enumerate() {
                if !is_ssh_public_key(key) {
                    p.add(f(&format!("ssh_authorized_keys[{k}]")), key, "is not one OpenSSH public key line");
                }
            }
            if let Some(hash) = &user.password_hash {
                if !is_crypt_hash(hash) {
                    p.secret(
                        f("password_hash"),
                        "is not a crypt(3) hash like $6$salt$hash (plain passwords are refused)",
                    );
                }
            }
            if let Some(sudo) = &user.sudo {
                if sudo.is_empty() || sudo.chars().any(|c| c.is_control()) {
                    p.add(f("sudo"), sudo, "must be one non-empty line");
                }
            }
            for (g, group) in user.groups.iter().enumerate() {
                if !is_unix_name(group) {
                    p.add(f(&format!("groups[{g}]")), group, "is not a group name");
                }
            }
            if let Some(shell) = &user.shell {
                if !shell.starts_with('/') || shell.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    p.add(f("shell"), shell, "is not an absolute path");
                }
            }
        }
        for (i, pkg) in u.packages.iter().enumerate() {
            if pkg.is_empty() || pkg.chars().any(|c| c.is_control() || c.is_whitespace()) {
                p.add(format!("user_data.packages[{i}]"), pkg, "is not a package name");
            }
        }
        for (i, cmd) in u.runcmd.iter().enumerate() {
            let field = format!("user_data.runcmd[{i}]");
            match cmd {
                RunCmd::Shell(s) if s.is_empty() || s.contains('\0') => p.secret(field, "is empty or contains NUL"),
                RunCmd::Argv(v) if v.is_empty() || v.iter().any(|a| a.contains('\0')) => {
                    p.secret(field, "is empty or contains NUL")
                }
                _ => {}
            }
        }
        if let Some(net) = &self.network_config {
            check_network(&mut p, net);
        }
        p.into_result()
    }

    /// The three files' text. Validates first.
    pub fn render(&self) -> Result<SeedFiles, SeedError> {
        self.validate().map_err(SeedError::Invalid)?;
        let meta = json!({
            "instance-id": self.meta_data.instance_id,
            "local-hostname": self.meta_data.local_hostname,
        });
        Ok(SeedFiles {
            meta_data: to_yaml(&meta),
            user_data: format!("#cloud-config\n{}", to_yaml(&self.user_data_value())),
            network_config: self.network_config.as_ref().map(|n| to_yaml(&network_value(n))),
        })
    }

    fn user_data_value(&self) -> Value {
        let u = &self.user_data;
        let mut doc = Map::new();
        if let Some(h) = &u.hostname {
            doc.insert("hostname".into(), json!(h));
        }
        let mut users: Vec<Value> = Vec::new();
        if u.default_user {
            users.push(json!("default"));
        }
        for user in &u.users {
            let mut m = Map::new();
            m.insert("name".into(), json!(user.name));
            if !user.ssh_authorized_keys.is_empty() {
                m.insert("ssh_authorized_keys".into(), json!(user.ssh_authorized_keys));
            }
            if let Some(hash) = &user.password_hash {
                m.insert("passwd".into(), json!(hash));
                m.insert("lock_passwd".into(), json!(false));
            }
            if let Some(sudo) = &user.sudo {
                m.insert("sudo".into(), json!(sudo));
            }
            if !user.groups.is_empty() {
                m.insert("groups".into(), json!(user.groups.join(", ")));
            }
            if let Some(shell) = &user.shell {
                m.insert("shell".into(), json!(shell));
            }
            users.push(Value::Object(m));
        }
        if !users.is_empty() {
            doc.insert("users".into(), Value::Array(users));
        }
        if let Some(pw) = u.ssh_pwauth {
            doc.insert("ssh_pwauth".into(), json!(pw));
        }
        if !u.packages.is_empty() {
            doc.insert("packages".into(), json!(u.packages));
        }
        if !u.runcmd.is_empty() {
            doc.insert("runcmd".into(), json!(u.runcmd));
        }
        Value::Object(doc)
    }
}

fn network_value(net: &NetworkConfig) -> Value {
    let mut ethernets = Map::new();
    for e in &net.ethernets {
        let mut m = Map::new();
        if let Some(mac) = &e.mac {
            m.insert("match".into(), json!({ "macaddress": mac.to_ascii_lowercase() }));
            m.insert("set-name".into(), json!(e.id));
        }
        match &e.addressing {
            Addressing::Dhcp { dhcp4, dhcp6 } => {
                m.insert("dhcp4".into(), json!(dhcp4));
                m.insert("dhcp6".into(), json!(dhcp6));
            }
            Addressing::Static { addresses, gateway4, gateway6, nameservers, search } => {
                m.insert("dhcp4".into(), json!(false));
                m.insert("dhcp6".into(), json!(false));
                m.insert("addresses".into(), json!(addresses));
                // gateway4/6 are deprecated in netplan; routes with an explicit default prefix work everywhere.
                let mut routes = Vec::new();
                if let Some(gw) = gateway4 {
                    routes.push(json!({ "to": "0.0.0.0/0", "via": gw.to_string() }));
                }
                if let Some(gw) = gateway6 {
                    routes.push(json!({ "to": "::/0", "via": gw.to_string() }));
                }
                if !routes.is_empty() {
                    m.insert("routes".into(), Value::Array(routes));
                }
                if !nameservers.is_empty() || !search.is_empty() {
                    let addrs: Vec<String> = nameservers.iter().map(|a| a.to_string()).collect();
                    m.insert("nameservers".into(), json!({ "addresses": addrs, "search": search }));
                }
            }
        }
        if let Some(mtu) = e.mtu {
            m.insert("mtu".into(), json!(mtu));
        }
        ethernets.insert(e.id.clone(), Value::Object(m));
    }
    json!({ "version": 2, "ethernets": ethernets })
}

/// JSON text that YAML 1.1 (PyYAML, which cloud-init uses) reads back identically: serde_json leaves DEL, C1
/// controls, U+2028/2029 and BOM raw inside strings, which YAML either refuses or treats as line breaks, so they are
/// escaped. They can only occur inside strings, where `\uXXXX` is valid JSON and YAML alike.
fn to_yaml(v: &Value) -> String {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        match c {
            '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\n');
    out
}

fn check_hostname(p: &mut Problems, field: &str, h: &str) {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        p.add(field, h, "is not a hostname (dot-separated labels of letters, digits and '-')");
    }
}

fn is_unix_name(n: &str) -> bool {
    let mut bytes = n.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && n.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn is_ssh_public_key(k: &str) -> bool {
    if k.chars().any(|c| c.is_control()) {
        return false;
    }
    let mut parts = k.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else { return false };
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    known && blob.len() >= 16 && blob.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

fn is_crypt_hash(h: &str) -> bool {
    h.starts_with('$')
        && h.split('$').filter(|s| !s.is_empty()).count() >= 2
        && h.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

fn check_network(p: &mut Problems, net: &NetworkConfig) {
    if net.ethernets.is_empty() {
        p.add("network_config.ethernets", "[]", "is empty (omit network_config for DHCP on the first NIC)");
    }
    let mut seen = std::collections::HashSet::new();
    for (i, e) in net.ethernets.iter().enumerate() {
        let f = |s: &str| format!("network_config.ethernets[{i}].{s}");
        let id_ok = !e.id.is_empty()
            && e.id.len() <= 15
            && e.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            p.add(f("id"), &e.id, "is not an interface name (1 to 15 of letters, digits, '-', '_', '.')");
        } else if !seen.insert(e.id.as_str()) {
            p.add(f("id"), &e.id, "is used twice");
        }
        if let (Some(_), Some(nic)) = (&e.mac, &e.nic) {
            p.add(f("nic"), nic, "is given with mac: name the NIC one way");
        }
        if let Some(mac) = &e.mac {
            let parts: Vec<&str> = mac.split(':').collect();
            if parts.len() != 6 || !parts.iter().all(|x| x.len() == 2 && x.bytes().all(|b| b.is_ascii_hexdigit())) {
                p.add(f("mac"), mac, "is not a MAC address like 52:54:00:12:34:56");
            }
        }
        if let Some(mtu) = e.mtu {
            if !(576..=9216).contains(&mtu) {
                p.add(f("mtu"), mtu, "is outside 576..=9216");
            }
        }
        match &e.addressing {
            Addressing::Dhcp { dhcp4: false, dhcp6: false } => {
                p.add(f("addressing"), "dhcp", "enables neither dhcp4 nor dhcp6");
            }
            Addressing::Dhcp { .. } => {}
            Addressing::Static { addresses, search, gateway4, .. } => {
                if addresses.is_empty() {
                    p.add(f("addressing.addresses"), "[]", "is empty");
                }
                let mut has_v4 = false;
                for (k, a) in addresses.iter().enumerate() {
                    match parse_cidr(a) {
                        Some(ip) => has_v4 |= ip.is_ipv4(),
                        None => p.add(f(&format!("addressing.addresses[{k}]")), a, "is not an address/prefix"),
                    }
                }
                if let Some(gateway4) = gateway4.filter(|_| !has_v4 && !addresses.is_empty()) {
                    p.add(f("addressing.gateway4"), gateway4, "is set without an IPv4 address");
                }
                for (k, s) in search.iter().enumerate() {
                    check_hostname(p, &f(&format!("addressing.search[{k}]")), s);
                }
            }
        }
    }
}

fn parse_cidr(s: &str) -> Option<IpAddr> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(ip)
}

/// Builds a FAT12 image labelled `cidata` holding `files`, in memory. The size grows with the content (1 MiB at
/// least); `sector_size` is 512 (disks only) or [`SEED_SECTOR_SIZE`] (disks and CD-ROM drives).
pub fn build_vfat(files: &SeedFiles, sector_size: u16) -> std::io::Result<Vec<u8>> {
    let mut entries: Vec<(&str, &[u8])> =
        vec![("meta-data", files.meta_data.as_bytes()), ("user-data", files.user_data.as_bytes())];
    if let Some(n) = &files.network_config {
        entries.push(("network-config", n.as_bytes()));
    }
    let content: usize = entries.iter().map(|(_, d)| d.len()).sum();
    // Room for the FATs, directory and cluster slack; FAT12 up to 16 MiB keeps the layout simple.
    let size = (content * 2 + (512 << 10)).next_multiple_of(64 << 10).max(1 << 20);
    if size > 16 << 20 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "seed content is larger than 8 MiB"));
    }
    let mut disk = Cursor::new(vec![0u8; size]);
    let mut label = [b' '; 11];
    label[..SEED_LABEL.len()].copy_from_slice(SEED_LABEL.as_bytes());
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .bytes_per_sector(sector_size)
            .fat_type(fatfs::FatType::Fat12),
    )?;
    write_root_label(&mut disk, &label)?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        for (name, data) in &entries {
            let mut f = root.create_file(name)?;
            f.truncate()?;
            f.write_all(data)?;
            f.flush()?;
        }
        drop(root);
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// Puts the label in the root directory as well as the boot sector, as mkfs.fat does: blkid and Windows read it
/// from there. fatfs only writes the boot sector copy.
fn write_root_label(disk: &mut Cursor<Vec<u8>>, label: &[u8; 11]) -> std::io::Result<()> {
    let b = disk.get_ref();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let bytes_per_sector = u16_at(11);
    let reserved = u16_at(14);
    let fats = b[16] as u64;
    let root_entries = u16_at(17);
    let sectors_per_fat = u16_at(22);
    if root_entries == 0 || sectors_per_fat == 0 {
        // FAT32 keeps its root directory in clusters; not a layout build_vfat makes.
        return Err(std::io::Error::other("unexpected FAT32 layout"));
    }
    let root = (reserved + fats * sectors_per_fat) * bytes_per_sector;
    let mut entry = [0u8; 32];
    entry[..11].copy_from_slice(label);
    entry[11] = 0x08; // ATTR_VOLUME_ID
    disk.seek(SeekFrom::Start(root))?;
    disk.write_all(&entry)?;
    Ok(())
}

/// Validates and renders `config` and writes it as a vfat seed image at `path` (atomically, mode 0600), on tokio's
/// blocking pool. Attach it read-only, as a virtio-blk disk or an IDE CD-ROM; see the crate doc for the QEMU
/// options.
pub async fn write_seed(config: &SeedConfig, path: &Path) -> Result<(), SeedError> {
    let files = config.render()?;
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || write_seed_files(&files, &p))
        .await
        .map_err(|source| SeedError::Join { path: path.to_owned(), source })??;
    tracing::info!(path = %path.display(), instance_id = %config.meta_data.instance_id, "cloud-init seed written");
    Ok(())
}

/// The blocking half of [`write_seed`], for already rendered files.
pub fn write_seed_files(files: &SeedFiles, path: &Path) -> Result<(), SeedError> {
    let image =
        build_vfat(files, SEED_SECTOR_SIZE).map_err(|source| SeedError::Format { path: path.to_owned(), source })?;
    atomic::write_atomic(path, &image).map_err(|source| SeedError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> SeedConfig {
        SeedConfig {
            meta_data: MetaData { instance_id: "b0c3-1".into(), local_hostname: "web-1".into() },
            user_data: UserData {
                hostname: Some("web-1".into()),
                default_user: false,
                users: vec![User {
                    name: "ops".into(),
                    ssh_authorized_keys: vec![
                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5dGVzdGtleXRlc3Q ops@x".into()
                    ],
                    password_hash: Some("$6$salt$abcdefghijklmnop".into()),
                    sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
                    groups: vec!["sudo".into()],
                    shell: Some("/bin/bash".into()),
                }],
                ssh_pwauth: Some(false),
                packages: vec!["qemu-guest-agent".into()],
                runcmd: vec![
                    RunCmd::Shell("echo 'quoted \"both\" ways' > /root/x: y".into()),
                    RunCmd::Argv(vec!["systemctl".into(), "enable".into(), "--now".into(), "qemu-guest-agent".into()]),
                ],
            },
            network_config: Some(NetworkConfig {
                ethernets: vec![Ethernet {
                    id: "eth0".into(),
                    mac: Some("52:54:00:AB:cd:01".into()),
                    nic: None,
                    addressing: Addressing::Static {
                        addresses: vec!["192.0.2.10/24".into()],
                        gateway4: Some("192.0.2.1".parse().unwrap()),
                        gateway6: None,
                        nameservers: vec!["192.0.2.53".parse().unwrap()],
                        search: vec!["example.com".into()],
                    },
                    mtu: None,
                }],
            }),
        }
    }

    #[test]
    fn renders_cloud_config_as_json() {
        let files = sample().render().unwrap();
        let body = files.user_data.strip_prefix("#cloud-config\n").expect("header line");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["hostname"], "web-1");
        assert_eq!(v["users"][0]["passwd"], "$6$salt$abcdefghijklmnop");
        assert_eq!(v["users"][0]["lock_passwd"], false);
        assert_eq!(v["users"][0]["groups"], "sudo");
        assert_eq!(v["runcmd"][1][0], "systemctl");
        let meta: Value = serde_json::from_str(&files.meta_data).unwrap();
        assert_eq!(meta, json!({"instance-id": "b0c3-1", "local-hostname": "web-1"}));
        let net: Value = serde_json::from_str(files.network_config.as_deref().unwrap()).unwrap();
        assert_eq!(net["version"], 2);
        assert_eq!(net["ethernets"]["eth0"]["match"]["macaddress"], "52:54:00:ab:cd:01");
        assert_eq!(net["ethernets"]["eth0"]["routes"][0]["via"], "192.0.2.1");
    }

    #[test]
    fn escapes_what_yaml_forbids() {
        let text = to_yaml(&json!({"a": "x\u{2028}y\u{85}z\u{7f}"}));
        assert!(text.contains(r"x\u2028y\u0085z\u007f"), "{text}");
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["a"], "x\u{2028}y\u{85}z\u{7f}");
    }

    #[test]
    fn validation_lists_every_problem_and_hides_secrets() {
        let mut c = sample();
        c.meta_data.local_hostname = "bad_host".into();
        c.user_data.users[0].name = "Root".into();
        c.user_data.users[0].password_hash = Some("hunter2".into());
        c.user_data.users[0].ssh_authorized_keys.push("not a key\n".into());
        c.network_config.as_mut().unwrap().ethernets[0].mac = Some("52:54:00".into());
        let err = c.validate().unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 5, "{text}");
        assert!(text.contains(r#"meta_data.local_hostname: "bad_host" is not a hostname"#), "{text}");
        assert!(text.contains(r#"user_data.users[0].name: "Root""#), "{text}");
        assert!(text.contains("user_data.users[0].password_hash: <redacted>"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("network_config.ethernets[0].mac"), "{text}");
    }

    #[test]
    fn debug_output_hides_user_data() {
        let c = sample();
        let dbg = format!("{c:?} {:?}", c.render().unwrap());
        assert!(!dbg.contains("$6$"), "{dbg}");
        assert!(!dbg.contains("quoted"), "{dbg}");
        assert!(dbg.contains("web-1"), "{dbg}");
    }

    #[test]
    fn vfat_image_reads_back_with_fatfs() {
        let files = sample().render().unwrap();
        for sector in [512, SEED_SECTOR_SIZE] {
            let image = build_vfat(&files, sector).unwrap();
            check_image(image, &files);
        }
    }

    fn check_image(image: Vec<u8>, files: &SeedFiles) {
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "cidata");
        assert_eq!(fs.read_volume_label_from_root_dir().unwrap().as_deref(), Some("cidata"));
        let mut names: Vec<String> = fs.root_dir().iter().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["meta-data", "network-config", "user-data"]);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut fs.root_dir().open_file("user-data").unwrap(), &mut s).unwrap();
        assert_eq!(s, files.user_data);
    }
}
