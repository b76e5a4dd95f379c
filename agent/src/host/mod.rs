//! The host backend: what qx-node does to the host itself for qx-console (and, through the same API, anyone
//! else): the management network, SSH, cluster membership, diagnostics, power, restarts and the emergency shell.
//!
//! Every path and command comes from the `host:` section of the node config ([`HostConfig`]), so tests point it
//! at a temp dir and harmless commands. State qx-node owns here is in the data directory, written atomically:
//! `ssh.json` (SSH and its timer's deadline) and `cluster.json` (the membership, never the join token).

pub mod cluster;
mod command;
pub mod firewall;
pub mod grubenv;
pub mod hardware;
pub mod logring;
pub mod netconfig;
pub mod ssh;
pub mod sysimage;
pub mod update;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qx_vmm::{ValidationErrors, VmManager};
use tokio::sync::watch;
use tracing::{error, info, warn};

use self::cluster::{Cluster, Registration};
pub use self::cluster::{ClusterState, ClusterStatus};
use self::command::CommandError;
use self::logring::LogRing;
pub use self::netconfig::{AddressMode, ManagementNetwork};
use self::ssh::Ssh;
pub use self::ssh::SshStatus;
use self::update::{SystemStatus, UpdateControl, UpdateError, UpdateRequest, Updates};
use crate::config::{HostConfig, NodeConfig};

/// How long the apply command may take (a networking restart waits for DHCP).
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long power and restart commands wait, so that the RPC asking for them is answered first.
const AFTER_REPLY: Duration = Duration::from_millis(500);
/// Log lines GetDiagnostics returns when the request names no number.
const DEFAULT_LOG_LINES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Every problem, `field: "value" problem` joined by "; " (qx-console parses this).
    #[error("{0}")]
    Invalid(ValidationErrors),
    #[error("cannot read {path}")]
    NetworkRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid management network config: {message}")]
    NetworkParse { path: PathBuf, message: String },
    #[error("cannot apply the management network ({restored})")]
    NetworkApply {
        restored: String,
        #[source]
        source: CommandError,
    },
    #[error("cannot write {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot turn SSH {}", if *enabled { "on" } else { "off" })]
    SshCommand {
        enabled: bool,
        #[source]
        source: CommandError,
    },
    #[error("{} running; stop {} first or confirm with confirm_running_vms", vms_text(*running), if *running == 1 { "it" } else { "them" })]
    VmsRunning { running: usize },
    #[error("already a member of cluster {cluster:?} at {url}; leave it first")]
    ClusterMember { cluster: String, url: String },
    #[error("cannot reach the control plane at {url}")]
    ClusterConnect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the control plane at {url} refused the join token: {message}")]
    ClusterTokenRefused { url: String, message: String },
    #[error("the control plane at {url} failed RegisterNode ({code:?}): {message}")]
    ClusterRegister { url: String, code: tonic::Code, message: String },
    #[error("cluster certificates from {url}")]
    ClusterCertificates {
        url: String,
        #[source]
        source: crate::certs::CertError,
    },
}

fn vms_text(n: usize) -> String {
    if n == 1 {
        "1 VM is".to_owned()
    } else {
        format!("{n} VMs are")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Reboot,
    Shutdown,
}

/// Everything the console's main screen shows beyond the node info.
#[derive(Debug, Clone, PartialEq)]
pub struct HostStatus {
    /// The management interface's IPv4 address with prefix; empty when it has none.
    pub management_address: String,
    /// The control plane's URL when a member, else `grpcs://address:port` of qx-node's TCP listener, else empty.
    pub management_url: String,
    /// `None` when `network.yaml` cannot be read (GetNetworkConfig says why).
    pub network: Option<ManagementNetwork>,
    pub ssh: SshStatus,
    pub cluster: ClusterStatus,
}

/// Recent log lines and the hardware summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostics {
    pub log_lines: Vec<String>,
    pub hardware: Vec<String>,
}

/// The host backend. One per node; see the module docs.
#[derive(Debug)]
pub struct Host {
    config: HostConfig,
    node_name: String,
    tcp: Option<SocketAddr>,
    /// `/sys/class/net` under the host root, for the default management interface.
    sys_class_net: PathBuf,
    vms: VmManager,
    /// One network change at a time: each one's restore must see the files it replaced.
    network_change: tokio::sync::Mutex<()>,
    ssh: Ssh,
    cluster: Cluster,
    restart: watch::Sender<bool>,
    logs: Arc<LogRing>,
    updates: Updates,
}

impl Host {
    /// Loads the SSH and cluster state from the data directory, re-arming the SSH timer and resuming heartbeats.
    /// Unreadable state files are logged and ignored: the host backend never keeps the node from starting.
    pub async fn open(config: &NodeConfig, vms: VmManager) -> Self {
        let (ssh_file, cluster_file) = (config.data_dir.join("ssh.json"), config.data_dir.join("cluster.json"));
        let (ssh_saved, cluster_saved) = {
            let (ssh_file, cluster_file) = (ssh_file.clone(), cluster_file.clone());
            blocking(move || (ssh::load(&ssh_file), cluster::load(&cluster_file))).await
        };
        let host = &config.host;
        Self {
            config: host.clone(),
            node_name: config.node_name.clone(),
            tcp: config.listen.tcp,
            sys_class_net: config.host_root.join("sys/class/net"),
            network_change: tokio::sync::Mutex::new(()),
            ssh: Ssh::open(ssh_file, ssh_saved, host.ssh_enable_command.clone(), host.ssh_disable_command.clone()),
            cluster: Cluster::open(
                cluster_file,
                cluster_saved,
                vms.clone(),
                crate::certs::CertPaths::new(config.certificates_dir()),
            ),
            vms,
            restart: watch::Sender::new(false),
            logs: logring::global(),
            updates: Updates::open(config.update.clone(), config.host_root.clone(), &config.data_dir).await,
        }
    }

    pub async fn status(&self) -> HostStatus {
        let network = match self.network().await {
            Ok(network) => Some(network),
            Err(e) => {
                warn!(error = %crate::grpc::error_chain(&e), "cannot read the management network config");
                None
            }
        };
        let interface =
            network.clone().unwrap_or_else(|| ManagementNetwork::default_for(&self.sys_class_net)).address_interface();
        let management_address = blocking(move || hardware::ipv4_of(&interface)).await.unwrap_or_default();
        let cluster = self.cluster.status();
        let management_url = if cluster.state != ClusterState::Standalone {
            cluster.control_plane_url.clone()
        } else {
            self.tcp.and_then(|tcp| listener_url(tcp, &management_address)).unwrap_or_default()
        };
        HostStatus { management_address, management_url, network, ssh: self.ssh.status().await, cluster }
    }

    /// The management network as `network.yaml` holds it, or the defaults when there is none.
    pub async fn network(&self) -> Result<ManagementNetwork, HostError> {
        let path = self.config.network_config.clone();
        let sys_class_net = self.sys_class_net.clone();
        blocking(move || match std::fs::read_to_string(&path) {
            Ok(text) => {
                ManagementNetwork::from_yaml(&text).map_err(|message| HostError::NetworkParse { path, message })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ManagementNetwork::default_for(&sys_class_net)),
            Err(source) => Err(HostError::NetworkRead { path, source }),
        })
        .await
    }

    /// Validates `requested` (every problem at once; nothing is written when there is one), writes
    /// `network.yaml` and the interfaces file atomically, and runs the apply command. When that fails the
    /// previous files are restored and applied again.
    pub async fn set_network(&self, requested: ManagementNetwork) -> Result<ManagementNetwork, HostError> {
        let network = requested.validated().map_err(HostError::Invalid)?;
        let _one_change = self.network_change.lock().await;
        let mut files = vec![(self.config.network_config.clone(), network.to_yaml().into_bytes())];
        if let Some(interfaces) = &self.config.interfaces_file {
            files.push((interfaces.clone(), network.render_interfaces(&self.config.network_config).into_bytes()));
        }
        let previous = {
            let paths: Vec<PathBuf> = files.iter().map(|(path, _)| path.clone()).collect();
            blocking(move || read_previous(&paths)).await?
        };
        let written = blocking(move || write_all(&files)).await;
        if let Err(e) = written {
            let previous = previous.clone();
            if let Err(restore) = blocking(move || restore(&previous)).await {
                error!(error = %crate::grpc::error_chain(&restore), "cannot restore the previous network files");
            }
            return Err(e);
        }
        let apply = &self.config.apply_network_command;
        match command::run(apply, APPLY_TIMEOUT).await {
            Ok(()) => {
                info!(interface = %network.address_interface(), mode = ?network.mode, "management network applied");
                Ok(network)
            }
            Err(source) => {
                error!(error = %crate::grpc::error_chain(&source), "cannot apply the management network; restoring");
                let restored = match blocking(move || restore(&previous)).await {
                    Err(e) => format!("restoring the previous files failed: {}", crate::grpc::error_chain(&e)),
                    Ok(()) => match command::run(apply, APPLY_TIMEOUT).await {
                        Ok(()) => "the previous configuration was restored".to_owned(),
                        Err(e) => {
                            warn!(error = %crate::grpc::error_chain(&e), "re-applying the previous network failed");
                            "the previous files were restored; applying them failed too".to_owned()
                        }
                    },
                };
                Err(HostError::NetworkApply { restored, source })
            }
        }
    }

    pub async fn ssh(&self) -> SshStatus {
        self.ssh.status().await
    }

    /// Turns SSH on (off again after `timeout_minutes`, 0 meaning never) or off.
    pub async fn set_ssh(&self, enabled: bool, timeout_minutes: u32) -> Result<SshStatus, HostError> {
        self.ssh.set(enabled, timeout_minutes).await
    }

    pub fn cluster(&self) -> ClusterStatus {
        self.cluster.status()
    }

    /// Registers with the control plane at `url` and starts heartbeats. Valid when standalone.
    pub async fn join_cluster(&self, url: &str, token: &str) -> Result<ClusterStatus, HostError> {
        let interface = self.network().await.unwrap_or_else(|_| ManagementNetwork::default_for(&self.sys_class_net));
        let interface = interface.address_interface();
        let (address, facts) = blocking(move || (hardware::ipv4_of(&interface), hardware::facts())).await;
        let registration = Registration {
            node_name: self.node_name.clone(),
            hostname: rustix::system::uname().nodename().to_string_lossy().into_owned(),
            management_address: address.unwrap_or_default(),
            cpu_count: facts.cpu_count,
            memory_total_bytes: facts.memory_total_bytes,
        };
        self.cluster.join(url, token, registration).await
    }

    /// Stops heartbeats and forgets the membership. Valid in any state.
    pub async fn leave_cluster(&self) -> Result<ClusterStatus, HostError> {
        self.cluster.leave().await
    }

    /// Restarts qx-node's services shortly after the caller is answered: the configured restart command, or,
    /// without one, a re-execution of qx-node itself (which the daemon's main loop performs when
    /// [`Host::restart_requested`] fires). VMs keep running.
    pub fn restart_services(&self) {
        if self.config.restart_command.is_empty() {
            info!("restart requested: qx-node re-executes itself; VMs keep running");
            self.restart.send_replace(true);
        } else {
            info!(command = %command::display(&self.config.restart_command), "restart requested");
            command::spawn_detached(self.config.restart_command.clone(), AFTER_REPLY);
        }
    }

    /// Changes to `true` when qx-node should re-execute itself.
    pub fn restart_requested(&self) -> watch::Receiver<bool> {
        self.restart.subscribe()
    }

    /// The last `log_lines` daemon log lines (0: 100) and the hardware summary.
    pub async fn diagnostics(&self, log_lines: usize) -> Diagnostics {
        let n = if log_lines == 0 { DEFAULT_LOG_LINES } else { log_lines.min(logring::CAPACITY) };
        Diagnostics { log_lines: self.logs.recent(n), hardware: blocking(hardware::summary).await }
    }

    /// A/B system updates: the systems' status, the health report.
    pub fn updates(&self) -> &Updates {
        &self.updates
    }

    /// Installs a system image on the inactive system partition and points the next boot at it once (see
    /// [`Updates::install`]); then reboots shortly after the caller is answered when the request asks to.
    pub async fn update_system(
        &self,
        request: UpdateRequest,
        ctl: &UpdateControl,
    ) -> Result<SystemStatus, UpdateError> {
        let reboot = request.reboot;
        let status = self.updates.install(request, self.running_vms(), ctl).await?;
        if reboot {
            info!("update installed; rebooting into it");
            command::spawn_detached(self.config.reboot_command.clone(), AFTER_REPLY);
        }
        Ok(status)
    }

    fn running_vms(&self) -> usize {
        self.vms.list().iter().filter(|vm| vm.state.is_active()).count()
    }

    /// Reboots or shuts the host down shortly after the caller is answered. Refused while VMs run unless
    /// `confirm_running_vms`.
    pub fn power(&self, action: PowerAction, confirm_running_vms: bool) -> Result<(), HostError> {
        let running = self.running_vms();
        if running > 0 && !confirm_running_vms {
            return Err(HostError::VmsRunning { running });
        }
        let argv = match action {
            PowerAction::Reboot => &self.config.reboot_command,
            PowerAction::Shutdown => &self.config.shutdown_command,
        };
        info!(?action, running_vms = running, command = %command::display(argv), "host power action");
        command::spawn_detached(argv.clone(), AFTER_REPLY);
        Ok(())
    }

    /// The emergency shell's command, for the console to run on its terminal. The opening is recorded.
    pub fn open_shell(&self) -> Vec<String> {
        info!(command = %command::display(&self.config.shell_command), "audit: the emergency shell was opened on the console");
        self.config.shell_command.clone()
    }
}

/// `grpcs://address:port` of the TCP listener; a wildcard listener is named by the management address.
fn listener_url(tcp: SocketAddr, management_address: &str) -> Option<String> {
    let ip = if tcp.ip().is_unspecified() {
        management_address.split('/').next()?.parse::<IpAddr>().ok()?
    } else {
        tcp.ip()
    };
    Some(format!("grpcs://{}", SocketAddr::new(ip, tcp.port())))
}

use qx_common::blocking;

pub(crate) fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Writes `value` as JSON to `path` atomically (creating its directory).
pub(crate) async fn persist_json(path: PathBuf, value: &impl serde::Serialize) -> Result<(), HostError> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    blocking(move || write_all(&[(path, bytes)])).await
}

/// Removes `path` (gone already is fine) and syncs its directory, so the removal survives a crash.
pub(crate) async fn remove_durably(path: PathBuf) -> Result<(), HostError> {
    blocking(move || {
        let persist = |source| HostError::Persist { path: path.clone(), source };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(persist(e)),
        }
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(persist)
    })
    .await
}

fn write_all(files: &[(PathBuf, Vec<u8>)]) -> Result<(), HostError> {
    for (path, bytes) in files {
        let persist = |source| HostError::Persist { path: path.clone(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(persist)?;
        }
        qx_vmm::persist::write_atomic(path, bytes).map_err(persist)?;
    }
    Ok(())
}

/// Each file's content, `None` when it does not exist.
type Previous = Vec<(PathBuf, Option<Vec<u8>>)>;

fn read_previous(paths: &[PathBuf]) -> Result<Previous, HostError> {
    paths
        .iter()
        .map(|path| match std::fs::read(path) {
            Ok(bytes) => Ok((path.clone(), Some(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path.clone(), None)),
            Err(source) => Err(HostError::NetworkRead { path: path.clone(), source }),
        })
        .collect()
}

/// Puts files back as `read_previous` found them; a file that did not exist is removed again.
fn restore(previous: &Previous) -> Result<(), HostError> {
    for (path, bytes) in previous {
        let persist = |source| HostError::Persist { path: path.clone(), source };
        match bytes {
            Some(bytes) => qx_vmm::persist::write_atomic(path, bytes).map_err(persist)?,
            None => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(persist(e)),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_urls() {
        let any: SocketAddr = "0.0.0.0:7443".parse().unwrap();
        assert_eq!(listener_url(any, "192.0.2.10/24").as_deref(), Some("grpcs://192.0.2.10:7443"));
        assert_eq!(listener_url(any, ""), None, "a wildcard listener without an address names nothing useful");
        let v6: SocketAddr = "[2001:db8::1]:7443".parse().unwrap();
        assert_eq!(listener_url(v6, "").as_deref(), Some("grpcs://[2001:db8::1]:7443"));
    }

    #[test]
    fn running_vm_counts_read_well() {
        assert_eq!(
            HostError::VmsRunning { running: 1 }.to_string(),
            "1 VM is running; stop it first or confirm with confirm_running_vms"
        );
        assert_eq!(
            HostError::VmsRunning { running: 3 }.to_string(),
            "3 VMs are running; stop them first or confirm with confirm_running_vms"
        );
    }

    #[test]
    fn restore_puts_back_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("sub/b"));
        std::fs::write(&a, "old").unwrap();
        let previous = read_previous(&[a.clone(), b.clone()]).unwrap();
        write_all(&[(a.clone(), b"new".to_vec()), (b.clone(), b"new".to_vec())]).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new");
        restore(&previous).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old");
        assert!(!b.exists());
    }
}
