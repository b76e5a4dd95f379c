//! qx-node's configuration: a YAML file whose every field has a default, so no file at all is a valid setup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use qx_net::vswitch::DatapathType;
use qx_vmm::spec::{AccelChoice, FieldError};
use qx_vmm::ValidationErrors;
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
        Self::from_yaml(&text).map_err(|message| ConfigError::Parse { path, message })
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
        ];
        for (field, path) in paths {
            if !path.is_absolute() {
                problem(field, path.display().to_string(), "is not an absolute path");
            }
        }
        if self.stop_timeout_seconds == 0 || self.stop_timeout_seconds > 3600 {
            problem("stop_timeout_seconds", self.stop_timeout_seconds.to_string(), "is outside 1..=3600");
        }
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
}
