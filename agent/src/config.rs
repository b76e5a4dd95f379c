//! qx-node's configuration: a YAML file whose every field has a default, so no file at all is a valid setup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use qx_net::vswitch::DatapathType;
use qx_vmm::spec::{AccelChoice, FieldError};
use qx_vmm::{ValidationErrors, WarmShape};
use serde::Deserialize;

/// Read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/quantix/node.yaml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Default: the host name.
    pub node_name: String,
    /// VM specs, state and logs. Default: `/var/lib/quantix`.
    pub data_dir: PathBuf,
    pub listen: ListenConfig,
    /// Default: `qemu-system-x86_64`, looked up in `PATH`.
    pub qemu_binary: PathBuf,
    /// Default: `auto` (KVM when usable, else TCG).
    pub accelerator: AccelChoice,
    /// How long a graceful stop waits for the guest. Default: 60 s.
    pub stop_timeout_seconds: u64,
    /// Stands for `/` when reading `/proc`, `/sys` and `/dev`; only tests change it. Default: `/`.
    pub host_root: PathBuf,
    pub ovs: OvsConfig,
    pub ovn: OvnConfig,
    pub host: HostConfig,
    pub update: UpdateConfig,
    /// Pre-launched, paused QEMUs of these shapes, which new VMs of the same shape start from in milliseconds.
    /// Default: none (the pool costs nothing).
    pub warm_pool: Vec<WarmShape>,
    /// The image engine behind the storage pools: `copy_method` (default `auto`: each pool measures reflink,
    /// `copy_file_range` and io_uring on its filesystem at its first copy; `copy_file_range` or `uring` fix it),
    /// `reflink`, threads and io_uring settings. See `qx_storage::EngineConfig`.
    pub storage: qx_storage::EngineConfig,
    pub tls: TlsConfig,
    /// The Host UI's HTTPS listener, which serves `/metrics` too. Default: off.
    pub ui: crate::ui::UiConfig,
    /// Host paths, besides the pools (`<data_dir>/pools`: volumes and the image library), that VM disks, kernels
    /// and initrds, image imports and UpdateHost images may name: absolute directory (or file) prefixes, matched
    /// after symlinks and `..` are resolved (see `crate::paths`), so list where files really are (`/dev/sdb`, not
    /// a `/dev/disk/by-id` link to it). Default: none. Not the whole data directory: it holds every VM's state
    /// and, without a config file, the node's TLS key.
    pub allowed_paths: Vec<PathBuf>,
    /// The file this config was read from, if any: `certificates/` lives next to it.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

/// The TCP listener's TLS (always on: see `crate::certs`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The node-local CA, the node's key and certificate and the cluster CA. Default: `certificates/` next to the
    /// config file, or `<data_dir>/certificates` when qx-node runs without one.
    pub certificates_dir: Option<PathBuf>,
    /// More DNS names or IP addresses for the node certificate, besides the node name, the host name,
    /// `localhost` and the loopback addresses (read when the certificate is first made). Default: none.
    pub subject_alt_names: Vec<String>,
    /// Roles by client certificate common name, overriding the role a certificate carries. Default: none.
    pub clients: Vec<ClientRole>,
}

/// One entry of `tls.clients`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRole {
    /// The certificate subject's common name.
    pub name: String,
    pub role: crate::certs::Role,
}

/// How qx-node changes the host it runs on, for qx-console's host actions: the management network, SSH, power,
/// restarts. Paths and commands are configurable so tests can point them at a temp dir and harmless commands.
/// Commands are argv lists run without a shell; the defaults suit an OpenRC host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The management network's settings, which qx-node owns. Default: `/etc/quantix/network.yaml`.
    pub network_config: PathBuf,
    /// An ifupdown `interfaces` file qx-node renders from `network_config` on every change, overwriting it; `null`
    /// renders none. Default: `/etc/network/interfaces`.
    pub interfaces_file: Option<PathBuf>,
    /// Applies a changed management network; when it fails, the previous files are restored and it runs again.
    /// Default: `["rc-service", "networking", "restart"]`.
    pub apply_network_command: Vec<String>,
    /// Default: `["rc-service", "sshd", "start"]`.
    pub ssh_enable_command: Vec<String>,
    /// Default: `["rc-service", "sshd", "stop"]`.
    pub ssh_disable_command: Vec<String>,
    /// Default: `["reboot"]`.
    pub reboot_command: Vec<String>,
    /// Default: `["poweroff"]`.
    pub shutdown_command: Vec<String>,
    /// What qx-console runs on its terminal for the emergency shell. Default: `["/bin/login", "-f", "root"]`.
    pub shell_command: Vec<String>,
    /// Restarts qx-node's services. Default: empty, meaning qx-node re-executes itself (same PID, same argv);
    /// VMs keep running either way, since qx-node reattaches to them at start.
    pub restart_command: Vec<String>,
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            network_config: PathBuf::from("/etc/quantix/network.yaml"),
            interfaces_file: Some(PathBuf::from("/etc/network/interfaces")),
            apply_network_command: argv(&["rc-service", "networking", "restart"]),
            ssh_enable_command: argv(&["rc-service", "sshd", "start"]),
            ssh_disable_command: argv(&["rc-service", "sshd", "stop"]),
            reboot_command: argv(&["reboot"]),
            shutdown_command: argv(&["poweroff"]),
            shell_command: argv(&["/bin/login", "-f", "root"]),
            restart_command: Vec::new(),
        }
    }
}

/// A/B system updates (UpdateHost) of a host booted from the Quantix image. Elsewhere (no `quantix.slot=` on the
/// kernel command line, no GRUB environment block) UpdateHost is refused, saying which.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// The GRUB environment block with the A/B boot state. Default: `/boot/efi/EFI/quantix/grubenv` (the image's
    /// EFI partition).
    pub grubenv: PathBuf,
    /// Seconds a newly installed system has to report healthy before the watchdog reboots into the previous one,
    /// unless the update names its own (10..=86400). Default: 300.
    pub health_timeout_seconds: u32,
    /// A file holding an ed25519 public key as 64 hex digits; when set, UpdateHost requires a signature of the
    /// image's SHA-256 digest by its private key. Default: none.
    pub public_key: Option<PathBuf>,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self { grubenv: PathBuf::from("/boot/efi/EFI/quantix/grubenv"), health_timeout_seconds: 300, public_key: None }
    }
}

/// Where Open vSwitch is. qx-node connects on first use, so it starts (and runs VMs without networks) when OVS
/// is down; network operations then say so.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OvsConfig {
    /// ovsdb-server's unix socket. Default: `/run/openvswitch/db.sock`.
    pub socket: PathBuf,
    /// `system` (the kernel datapath, on hosts) or `netdev` (userspace). Default: `system`.
    pub datapath_type: DatapathType,
}

impl Default for OvsConfig {
    fn default() -> Self {
        Self { socket: PathBuf::from("/run/openvswitch/db.sock"), datapath_type: DatapathType::System }
    }
}

/// Where OVN's northbound database is, for networks of kind `ovn`. qx-node connects at start and on first use; when
/// the database is not reachable it says so and runs on (OVN networks are refused until it is; plain OVS networks
/// are unaffected).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OvnConfig {
    /// The NB ovsdb-server: `unix:PATH` or `tcp:HOST:PORT`. Default: none (OVN networks are refused).
    pub northbound: Option<String>,
    /// The bridge ovn-controller manages on this node, where VM NICs of OVN networks are plugged. Default:
    /// `br-int`.
    pub integration_bridge: String,
    /// This node's chassis name (ovn-controller's `system-id`), written as `requested-chassis` on its VMs' logical
    /// ports. Default: none (whichever chassis has the port binds it).
    pub chassis: Option<String>,
}

impl Default for OvnConfig {
    fn default() -> Self {
        Self { northbound: None, integration_bridge: "br-int".into(), chassis: None }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// The API socket, mode 0600. Default: `/run/quantix/node.sock`.
    pub unix: PathBuf,
    /// A TCP listener for a remote control plane; none by default.
    pub tcp: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { unix: PathBuf::from("/run/quantix/node.sock"), tcp: None }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_name: hostname(),
            data_dir: PathBuf::from("/var/lib/quantix"),
            listen: ListenConfig::default(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accelerator: AccelChoice::Auto,
            stop_timeout_seconds: 60,
            host_root: PathBuf::from("/"),
            ovs: OvsConfig::default(),
            ovn: OvnConfig::default(),
            host: HostConfig::default(),
            update: UpdateConfig::default(),
            warm_pool: Vec::new(),
            storage: qx_storage::EngineConfig::default(),
            tls: TlsConfig::default(),
            ui: crate::ui::UiConfig::default(),
            allowed_paths: Vec::new(),
            config_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(#[from] ValidationErrors),
}

impl NodeConfig {
    /// Reads `path`, or the default path when it exists, or nothing: defaults throughout.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(path) => path.to_owned(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let mut config =
            Self::from_yaml(&text).map_err(|message| ConfigError::Parse { path: path.clone(), message })?;
        config.config_file = Some(std::path::absolute(&path).unwrap_or(path));
        Ok(config)
    }

    /// Where the certificates live (see [`TlsConfig::certificates_dir`]).
    pub fn certificates_dir(&self) -> PathBuf {
        if let Some(dir) = &self.tls.certificates_dir {
            return dir.clone();
        }
        match self.config_file.as_ref().and_then(|f| f.parent()) {
            Some(dir) => dir.join(crate::certs::DIR_NAME),
            None => self.data_dir.join(crate::certs::DIR_NAME),
        }
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let mut problem = |field: &str, value: String, problem: &str| {
            errors.push(FieldError { field: field.into(), value, problem: problem.into() });
        };
        if self.node_name.is_empty() || self.node_name.len() > 253 || self.node_name.chars().any(char::is_control) {
            problem("node_name", self.node_name.clone(), "must be 1-253 characters without control characters");
        }
        let paths = [
            ("data_dir", &self.data_dir),
            ("listen.unix", &self.listen.unix),
            ("host_root", &self.host_root),
            ("ovs.socket", &self.ovs.socket),
            ("host.network_config", &self.host.network_config),
            ("update.grubenv", &self.update.grubenv),
        ];
        let optional = [
            ("host.interfaces_file", &self.host.interfaces_file),
            ("update.public_key", &self.update.public_key),
            ("tls.certificates_dir", &self.tls.certificates_dir),
        ];
        for (field, path) in paths.into_iter().chain(optional.into_iter().filter_map(|(f, p)| Some((f, p.as_ref()?)))) {
            if !path.is_absolute() {
                problem(field, path.display().to_string(), "is not an absolute path");
            }
        }
        for (i, path) in self.allowed_paths.iter().enumerate() {
            if !path.is_absolute() {
                problem(&format!("allowed_paths[{i}]"), path.display().to_string(), "is not an absolute path");
            } else if path.as_os_str().as_encoded_bytes().iter().any(u8::is_ascii_control) {
                problem(&format!("allowed_paths[{i}]"), path.display().to_string(), "contains control characters");
            }
        }
        if self.host.interfaces_file.as_ref() == Some(&self.host.network_config) {
            problem(
                "host.interfaces_file",
                self.host.network_config.display().to_string(),
                "is host.network_config too",
            );
        }
        let host = &self.host;
        let commands = [
            ("host.apply_network_command", &host.apply_network_command),
            ("host.ssh_enable_command", &host.ssh_enable_command),
            ("host.ssh_disable_command", &host.ssh_disable_command),
            ("host.reboot_command", &host.reboot_command),
            ("host.shutdown_command", &host.shutdown_command),
            ("host.shell_command", &host.shell_command),
            ("host.restart_command", &host.restart_command),
        ];
        for (field, command) in commands {
            // Only restart_command may be empty: it means "re-execute qx-node".
            if command.is_empty() && field != "host.restart_command" {
                problem(field, "[]".into(), "is empty");
            } else if command.first().is_some_and(String::is_empty) || command.iter().any(|arg| arg.contains('\0')) {
                problem(field, format!("{command:?}"), "has an empty program or a NUL byte");
            }
        }
        if let Some(endpoint) = &self.ovn.northbound {
            if endpoint.parse::<qx_net::ovsdb::Endpoint>().is_err() {
                problem("ovn.northbound", endpoint.clone(), "is not unix:PATH or tcp:HOST:PORT");
            }
        }
        if let Err(p) = qx_net::names::check_ifname(&self.ovn.integration_bridge) {
            problem("ovn.integration_bridge", self.ovn.integration_bridge.clone(), &p);
        }
        if let Some(chassis) = &self.ovn.chassis {
            if let Err(p) = qx_net::ovn::spec::check_ovn_name(chassis) {
                problem("ovn.chassis", chassis.clone(), &p);
            }
        }
        if self.stop_timeout_seconds == 0 || self.stop_timeout_seconds > 3600 {
            problem("stop_timeout_seconds", self.stop_timeout_seconds.to_string(), "is outside 1..=3600");
        }
        if !(10..=86_400).contains(&self.update.health_timeout_seconds) {
            problem(
                "update.health_timeout_seconds",
                self.update.health_timeout_seconds.to_string(),
                "is outside 10..=86400",
            );
        }
        for (i, client) in self.tls.clients.iter().enumerate() {
            if client.name.is_empty() || client.name.len() > 64 {
                problem(
                    &format!("tls.clients[{i}].name"),
                    client.name.chars().take(64).collect(),
                    "must be 1-64 bytes",
                );
            }
        }
        for (i, shape) in self.warm_pool.iter().enumerate() {
            if let Err(ValidationErrors(shape_errors)) = shape.validate(&format!("warm_pool[{i}]")) {
                errors.extend(shape_errors);
            }
        }
        if let Err(invalid) = self.storage.validate() {
            errors.extend(invalid.0.into_iter().map(|e| FieldError {
                field: format!("storage.{}", e.field),
                value: e.value,
                problem: e.problem,
            }));
        }
        errors.extend(self.ui.validate());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_means_defaults() {
        let config = NodeConfig::from_yaml("").unwrap();
        assert_eq!(config, NodeConfig::default());
        config.validate().unwrap();
        assert_eq!(config.listen.unix, Path::new("/run/quantix/node.sock"));
        assert!(config.listen.tcp.is_none());
    }

    #[test]
    fn partial_config_keeps_other_defaults() {
        let config = NodeConfig::from_yaml("data_dir: /srv/qx\nlisten:\n  tcp: 127.0.0.1:7443\n").unwrap();
        assert_eq!(config.data_dir, Path::new("/srv/qx"));
        assert_eq!(config.listen.unix, Path::new("/run/quantix/node.sock"));
        assert_eq!(config.listen.tcp, Some("127.0.0.1:7443".parse().unwrap()));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = NodeConfig::from_yaml("data_dri: /x\n").unwrap_err();
        assert!(err.contains("data_dri"), "{err}");
        let err = NodeConfig::from_yaml("accelerator: hvf\n").unwrap_err();
        assert!(err.contains("hvf"), "{err}");
        let config = NodeConfig::from_yaml("data_dir: relative\nstop_timeout_seconds: 0\n").unwrap();
        let fields: Vec<String> = config.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["data_dir", "stop_timeout_seconds"]);
    }

    #[test]
    fn allowed_paths_must_be_absolute() {
        let config = NodeConfig::from_yaml("allowed_paths: [/srv/iso, srv/images]\n").unwrap();
        assert_eq!(config.allowed_paths, [Path::new("/srv/iso"), Path::new("srv/images")]);
        let err = config.validate().unwrap_err();
        assert_eq!(err.to_string(), r#"allowed_paths[1]: "srv/images" is not an absolute path"#);
        assert!(NodeConfig::default().allowed_paths.is_empty());
    }

    #[test]
    fn host_section_defaults_and_checks() {
        let config = NodeConfig::from_yaml("host:\n  reboot_command: [/bin/true]\n").unwrap();
        assert_eq!(config.host.reboot_command, ["/bin/true"]);
        assert_eq!(config.host.network_config, Path::new("/etc/quantix/network.yaml"));
        assert_eq!(config.host.apply_network_command, ["rc-service", "networking", "restart"]);
        assert!(config.host.restart_command.is_empty(), "empty means re-execute");
        config.validate().unwrap();
        let config = NodeConfig::from_yaml("host:\n  interfaces_file: null\n").unwrap();
        assert_eq!(config.host.interfaces_file, None);

        let err = NodeConfig::from_yaml("host:\n  reboot: [x]\n").unwrap_err();
        assert!(err.contains("reboot"), "{err}");
        let yaml = "host:\n  network_config: net.yaml\n  interfaces_file: /etc/i\n  shell_command: []\n  \
                    ssh_enable_command: ['']\n";
        let config = NodeConfig::from_yaml(yaml).unwrap();
        let err = config.validate().unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["host.network_config", "host.ssh_enable_command", "host.shell_command"]);
        assert!(err.to_string().starts_with("host.network_config: \"net.yaml\" is not an absolute path"), "{err}");
    }
}
