//! `Node`: the one domain type the front ends (gRPC, and through it qxctl and qx-console) call.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qx_common::{blocking, ValidationErrors};
use qx_net::ovn::{Rule, SecurityGroup};
use qx_storage::{CreateVolume, Image, ImportImage, InUse, OpControl, Volume};
use qx_vmm::spec::AccelChoice;
use qx_vmm::spec::{DiskSpec, VmSpec};
use qx_vmm::{accel, Accel, AccelProbe, HostRoot, ManagerConfig, VmError, VmInfo, VmManager, VmState};
use tracing::{info, warn};

use crate::certs::CertPaths;
use crate::config::NodeConfig;
use crate::host::Host;
use crate::network::{NetworkError, NetworkSpec, Networks, NicStatus};
use crate::paths::AllowedPaths;
use crate::security_groups::{SecurityGroupError, SecurityGroups};
use crate::volumes::{users_of, Pools, VolumeError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("QEMU binary {binary} does not run: {detail}")]
    QemuMissing { binary: String, detail: String },
    /// `listeners` names the configured TLS listeners (`listen.tcp`, `ui.listen`).
    #[error(
        "{listeners} {} TLS only and cannot create {} certificates in {dir}: set tls.certificates_dir to a \
         writable directory, or remove {}",
        if listeners.contains(" and ") { "serve" } else { "serves" },
        if listeners.contains(" and ") { "their" } else { "its" },
        if listeners.contains(" and ") { "those listeners" } else { "that listener" }
    )]
    Certificates {
        listeners: String,
        dir: String,
        #[source]
        source: crate::certs::CertError,
    },
    #[error("cannot open the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Host facts for GetNodeInfo.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_name: String,
    pub hostname: String,
    pub cpu_model: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub qemu_binary: String,
    pub qemu_version: String,
    pub accel: AccelProbe,
    pub vms_total: u32,
    pub vms_running: u32,
    pub data_dir: String,
    /// Warm-pool QEMUs ready for new VMs, and those kept for created VMs' first start.
    pub warm_ready: u32,
    pub warm_reserved: u32,
    /// The A/B systems and the last update.
    pub system: crate::host::update::SystemStatus,
}

/// The host's PCI functions for ListHostDevices.
#[derive(Debug, Clone)]
pub struct HostDevices {
    /// Each function with, when the host needs it, why (a VM may not have it then).
    pub devices: Vec<(qx_devices::PciDevice, Option<String>)>,
    pub iommu_enabled: bool,
}

/// A Quantix host: its configuration, what it found out about itself at start, and its VMs.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    qemu_version: String,
    networks: Arc<Networks>,
    pools: Arc<Pools>,
    vms: VmManager,
    host: Host,
    certs: CertPaths,
    migrations: crate::migration::Migrations,
    allowed: AllowedPaths,
}

impl Node {
    /// Checks QEMU, picks the accelerator, loads the VMs and reattaches to the ones still running.
    pub async fn open(config: NodeConfig) -> Result<Self, NodeError> {
        let qemu_version = qemu_version(&config.qemu_binary).await?;
        let certs = ensure_certificates(&config).await?;
        let host = HostRoot::new(&config.host_root);
        let accel = choose_accel(config.accelerator, accel::detect(&host));
        info!(accelerator = %accel.accel, reason = %accel.reason, qemu = %qemu_version, "host checked");
        let networks = Networks::open(&config.data_dir, config.ovs.clone(), config.ovn.clone())
            .map(Arc::new)
            .map_err(|source| NodeError::DataDir { path: config.data_dir.display().to_string(), source })?;
        let pools = Arc::new(Pools::new(&config.data_dir, config.storage.clone()));
        let backends = qx_vmm::Backends {
            network: Some(Arc::clone(&networks) as Arc<dyn qx_vmm::NetworkBackend>),
            volumes: Some(Arc::clone(&pools) as Arc<dyn qx_vmm::VolumeBackend>),
        };
        let vms = VmManager::open(
            ManagerConfig {
                data_dir: config.data_dir.clone(),
                qemu_binary: config.qemu_binary.clone(),
                host,
                accel,
                stop_timeout: Duration::from_secs(config.stop_timeout_seconds),
                warm_pool: config.warm_pool.clone(),
            },
            backends,
        )
        .await
        .map_err(|source| NodeError::DataDir { path: config.data_dir.display().to_string(), source })?;
        let host = Host::open(&config, vms.clone()).await;
        tokio::spawn({
            let networks = Arc::clone(&networks);
            async move { networks.probe_ovn().await }
        });
        let allowed = AllowedPaths::of(&config);
        info!(allowed_paths = ?allowed.prefixes(), "host paths the API may name");
        Ok(Self { config, qemu_version, networks, pools, vms, host, certs, migrations: Default::default(), allowed })
    }

    /// The host paths the API may name (see `crate::paths`).
    pub fn allowed_paths(&self) -> &AllowedPaths {
        &self.allowed
    }

    /// `Ok` when `path` (the request's `field`) lies under the allowed host paths.
    pub async fn confine(&self, field: &str, path: &Path) -> Result<(), ValidationErrors> {
        let (allowed, field, path) = (self.allowed.clone(), field.to_owned(), path.to_owned());
        blocking(move || allowed.check(&path).map_err(|problem| ValidationErrors::one(field, path.display(), problem)))
            .await
    }

    /// Validates `spec` with its host paths confined: every problem, a path outside the allowed ones among them.
    pub(crate) async fn confine_spec(&self, spec: &VmSpec) -> Result<(), VmError> {
        let (allowed, spec) = (self.allowed.clone(), spec.clone());
        blocking(move || spec.validate(&allowed)).await.map_err(VmError::Invalid)
    }

    /// Defines a VM (stopped) whose host paths lie under the allowed ones.
    pub async fn create_vm(&self, spec: VmSpec) -> Result<VmInfo, VmError> {
        self.confine_spec(&spec).await?;
        self.vms.create(spec).await
    }

    /// Replaces a VM's spec (see `VmManager::update`); its host paths must lie under the allowed ones.
    pub async fn update_vm(&self, spec: VmSpec) -> Result<VmInfo, VmError> {
        self.confine_spec(&spec).await?;
        self.vms.update(spec).await
    }

    /// The node's certificates (node-local CA, node key and certificate, cluster CA).
    pub fn certs(&self) -> &CertPaths {
        &self.certs
    }

    /// Signs an operator certificate for the key of `csr_pem` with the node-local CA; also returns the node
    /// certificate's names, which the operator's client verifies.
    pub async fn issue_client_certificate(
        &self,
        name: String,
        role: crate::certs::Role,
        days: u32,
        csr_pem: String,
    ) -> Result<(crate::certs::Issued, Vec<String>), crate::certs::CertError> {
        let certs = self.certs.clone();
        tokio::task::spawn_blocking(move || {
            let issued = certs.issue_client(&csr_pem, &name, role, days)?;
            Ok((issued, certs.node_names()?))
        })
        .await
        .expect("signing does not panic")
    }

    /// The live migrations this node runs as the source.
    pub fn migrations(&self) -> &crate::migration::Migrations {
        &self.migrations
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// VM lifecycle operations; see `VmManager` for the states in which each is valid.
    pub fn vms(&self) -> &VmManager {
        &self.vms
    }

    /// The host backend: management network, SSH, cluster membership, diagnostics, power, restarts.
    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn networks(&self) -> &Networks {
        &self.networks
    }

    /// Creates a network (and its bridge, when missing).
    pub async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkSpec, NetworkError> {
        self.networks.create(spec).await
    }

    /// Deletes a network no VM names.
    pub async fn delete_network(&self, name: &str) -> Result<(), NetworkError> {
        let users = self
            .vms
            .list()
            .into_iter()
            .filter(|vm| vm.spec.nics.iter().any(|nic| nic.network.as_deref() == Some(name)))
            .map(|vm| vm.spec.name)
            .collect();
        self.networks.delete(name, users).await
    }

    /// The node's security groups.
    pub fn security_groups(&self) -> &SecurityGroups {
        self.networks.security_groups()
    }

    /// Creates a security group and its OVN port group with the rules' ACLs.
    pub async fn create_security_group(&self, group: SecurityGroup) -> Result<SecurityGroup, SecurityGroupError> {
        self.networks.security_groups().create(&self.networks, group).await
    }

    /// Deletes a security group no VM NIC and no other group's rule names.
    pub async fn delete_security_group(&self, name: &str) -> Result<(), SecurityGroupError> {
        let users = self
            .vms
            .list()
            .into_iter()
            .filter(|vm| vm.spec.nics.iter().any(|nic| nic.security_groups.iter().any(|g| g == name)))
            .map(|vm| vm.spec.name)
            .collect();
        self.networks.security_groups().delete(&self.networks, name, users).await
    }

    /// Adds a rule to a security group; it applies at once, also to running VMs.
    pub async fn add_security_group_rule(&self, group: &str, rule: Rule) -> Result<SecurityGroup, SecurityGroupError> {
        self.networks.security_groups().add_rule(&self.networks, group, rule).await
    }

    /// Deletes rule `id` of a security group, at once, also for running VMs.
    pub async fn delete_security_group_rule(&self, group: &str, id: u32) -> Result<SecurityGroup, SecurityGroupError> {
        self.networks.security_groups().delete_rule(&self.networks, group, id).await
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Which running VMs use a pool's volumes, as the VMs stand now.
    fn in_use(&self) -> impl InUse {
        let vms = self.vms.list();
        move |pool: &str, kind, name: &str| users_of(&vms, pool, kind, name)
    }

    /// Creates a volume (empty, or from a library image); `ctl` reports a full copy's progress and cancels it.
    pub async fn create_volume(&self, pool: &str, req: CreateVolume, ctl: &OpControl) -> Result<Volume, VolumeError> {
        let pool = self.pools.pool(pool).await?;
        let volume = pool.create_volume(req, ctl).await?;
        Ok(with_allocation(pool, volume).await)
    }

    /// Grows a volume. One that a running or paused VM writes grows online (QMP `block_resize` on the VM's disk,
    /// then the pool re-reads its size; the guest sees it at once); one no running VM uses is resized by the pool,
    /// and one in use otherwise (read-only, a VM starting or stopping) is refused. Shrinking is refused either
    /// way: it loses the guest's data.
    pub async fn resize_volume(&self, pool: &str, name: &str, size: u64) -> Result<Volume, VolumeError> {
        let wanted = format!("{pool}/{name}");
        let pool = self.pools.pool(pool).await?;
        let online = self.vms.list().into_iter().find_map(|vm| {
            if !matches!(vm.state, VmState::Running | VmState::Paused) {
                return None;
            }
            let disk = vm.spec.disks.iter().find(|d| d.volume.as_deref() == Some(wanted.as_str()) && !d.read_only)?;
            Some((vm.spec.name.clone(), disk.id.clone()?))
        });
        let volume = match online {
            Some((vm, disk)) => {
                pool.volume(name).await?;
                self.vms.grow_disk(&vm, &disk, size).await?;
                pool.refresh_volume(name).await?
            }
            None => pool.resize_volume(name, size, false, &self.in_use()).await?,
        };
        Ok(with_allocation(pool, volume).await)
    }

    /// Copies a volume no running VM uses into a new one.
    pub async fn clone_volume(
        &self,
        pool: &str,
        source: &str,
        target: &str,
        ctl: &OpControl,
    ) -> Result<Volume, VolumeError> {
        let pool = self.pools.pool(pool).await?;
        let volume = pool.clone_volume(source, target, &self.in_use(), ctl).await?;
        Ok(with_allocation(pool, volume).await)
    }

    /// Deletes a volume no running VM uses.
    pub async fn delete_volume(&self, pool: &str, name: &str) -> Result<(), VolumeError> {
        Ok(self.pools.pool(pool).await?.delete_volume(name, &self.in_use()).await?)
    }

    /// Copies a file on this host, under the allowed host paths, into a pool's image library.
    pub async fn import_image(&self, pool: &str, req: ImportImage, ctl: &OpControl) -> Result<Image, VolumeError> {
        self.confine("source", &req.source).await.map_err(VolumeError::Invalid)?;
        Ok(self.pools.pool(pool).await?.import_image(req, ctl).await?)
    }

    /// Deletes a library image no volume is an overlay on.
    pub async fn delete_image(&self, pool: &str, name: &str) -> Result<(), VolumeError> {
        Ok(self.pools.pool(pool).await?.delete_image(name, &self.in_use()).await?)
    }

    /// Hotplugs a disk (running or paused VM), or adds it to a stopped VM's spec. A path disk's file must lie
    /// under the allowed host paths.
    pub async fn attach_disk(&self, vm: &str, disk: DiskSpec) -> Result<VmInfo, VmError> {
        if let Some(path) = &disk.path {
            self.confine("disk.path", path).await?;
        }
        self.vms.attach_disk(vm, disk).await
    }

    /// Unplugs disk `id`, waiting `timeout` (default 10 s) for the guest to release it.
    pub async fn detach_disk(
        &self,
        vm: &str,
        id: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<qx_vmm::VmInfo, qx_vmm::VmError> {
        self.vms.detach_disk(vm, id, timeout).await
    }

    /// Hotplugs a NIC (with its tap and switch port on a node network), or adds it to a stopped VM's spec.
    pub async fn attach_nic(&self, vm: &str, nic: qx_vmm::spec::NicSpec) -> Result<qx_vmm::VmInfo, qx_vmm::VmError> {
        self.vms.attach_nic(vm, nic).await
    }

    /// Unplugs NIC `id` and removes its tap and switch port.
    pub async fn detach_nic(
        &self,
        vm: &str,
        id: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<qx_vmm::VmInfo, qx_vmm::VmError> {
        self.vms.detach_nic(vm, id, timeout).await
    }

    pub async fn set_vcpus(&self, vm: &str, vcpus: u32) -> Result<qx_vmm::VmInfo, qx_vmm::VmError> {
        self.vms.set_vcpus(vm, vcpus).await
    }

    pub async fn set_memory(&self, vm: &str, memory_mib: u64) -> Result<qx_vmm::VmInfo, qx_vmm::VmError> {
        self.vms.set_memory(vm, memory_mib).await
    }

    /// A VM with its network NICs' switch ports.
    pub async fn vm(&self, name: &str) -> Result<(qx_vmm::VmInfo, Vec<NicStatus>), qx_vmm::VmError> {
        let vm = self.vms.get(name)?;
        let nics = self.networks.nic_status(&vm.spec, &vm.devices).await;
        Ok((vm, nics))
    }

    /// The host's PCI functions read from sysfs (under the configured host root), names from `pci.ids` when the
    /// host has it, and which ones the host itself uses.
    pub async fn host_devices(&self) -> Result<HostDevices, qx_devices::pci::InventoryError> {
        let root = HostRoot::new(&self.config.host_root);
        qx_common::blocking(move || {
            let ids = qx_devices::pci::PciIds::load(&root);
            let used = qx_devices::host_use::HostUse::scan(&root);
            let devices = qx_devices::pci::scan(&root, &ids)?.into_iter().map(|d| {
                let host_use = used.use_of(&d);
                (d, host_use)
            });
            Ok(HostDevices { devices: devices.collect(), iommu_enabled: qx_devices::pci::iommu_enabled(&root) })
        })
        .await
    }

    pub async fn info(&self) -> NodeInfo {
        let (cpu_model, cpu_count, memory_total_bytes, memory_available_bytes) =
            tokio::task::spawn_blocking(host_resources).await.unwrap_or_default();
        let vms = self.vms.list();
        let running =
            vms.iter().filter(|vm| matches!(vm.state, VmState::Running | VmState::Paused | VmState::Migrating)).count();
        let (warm_ready, warm_reserved) = self.vms.warm_pool_counts();
        let system = self.host.updates().status().await;
        NodeInfo {
            node_name: self.config.node_name.clone(),
            hostname: rustix::system::uname().nodename().to_string_lossy().into_owned(),
            cpu_model,
            cpu_count,
            memory_total_bytes,
            memory_available_bytes,
            qemu_binary: self.config.qemu_binary.display().to_string(),
            qemu_version: self.qemu_version.clone(),
            accel: self.vms.config().accel.clone(),
            vms_total: vms.len() as u32,
            vms_running: running as u32,
            warm_ready: warm_ready as u32,
            warm_reserved: warm_reserved as u32,
            data_dir: self.config.data_dir.display().to_string(),
            system,
        }
    }
}

/// The node's accelerator for VMs that ask for `auto`, given what the operator configured.
fn choose_accel(configured: AccelChoice, probe: AccelProbe) -> AccelProbe {
    match (configured, probe.accel) {
        (AccelChoice::Auto, _) | (AccelChoice::Kvm, Accel::Kvm) => probe,
        (AccelChoice::Tcg, _) => {
            AccelProbe { accel: Accel::Tcg, reason: "TCG is configured (accelerator: tcg)".into() }
        }
        (AccelChoice::Kvm, Accel::Tcg) => {
            warn!(reason = %probe.reason, "accelerator: kvm is configured but KVM is not usable; falling back to TCG");
            probe
        }
    }
}

async fn qemu_version(binary: &std::path::Path) -> Result<String, NodeError> {
    let missing = |detail: String| NodeError::QemuMissing { binary: binary.display().to_string(), detail };
    let output =
        tokio::process::Command::new(binary).arg("--version").output().await.map_err(|e| missing(e.to_string()))?;
    if !output.status.success() {
        return Err(missing(format!("--version {}", output.status)));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    let version = text.lines().next().unwrap_or_default().trim_start_matches("QEMU emulator version ").trim();
    Ok(version.to_owned())
}

/// CPU model, CPU count, total and available memory (bytes).
pub(crate) fn host_resources() -> (String, u32, u64, u64) {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    let Ok(system) = System::new_with_specifics(
        RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()).with_memory(MemoryRefreshKind::nothing().with_ram()),
    ) else {
        return Default::default();
    };
    let model = system.cpus().first().map(|cpu| cpu.brand().trim().to_owned()).unwrap_or_default();
    (model, system.cpus().len() as u32, system.total_memory(), system.available_memory())
}

/// `volume` as listing shows it, with the bytes it holds on the host (pools fill that in when they read a volume).
async fn with_allocation(pool: &dyn qx_storage::Pool, volume: Volume) -> Volume {
    pool.volume(&volume.name).await.unwrap_or(volume)
}

/// Creates the node-local CA and the node certificate at first start. Without them only the TCP listener cannot
/// work, so a failure stops the daemon only when that listener is configured.
async fn ensure_certificates(config: &NodeConfig) -> Result<CertPaths, NodeError> {
    let certs = CertPaths::new(config.certificates_dir());
    let (paths, node_name, names) = (certs.clone(), config.node_name.clone(), config.tls.subject_alt_names.clone());
    let made = tokio::task::spawn_blocking(move || paths.ensure(&node_name, &names))
        .await
        .expect("making certificates does not panic");
    match made {
        Ok(()) => Ok(certs),
        Err(source) if config.listen.tcp.is_some() || config.ui.listen.is_some() => {
            let listeners = [("listen.tcp", config.listen.tcp.is_some()), ("ui.listen", config.ui.listen.is_some())]
                .iter()
                .filter(|(_, on)| *on)
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(" and ");
            Err(NodeError::Certificates { listeners, dir: certs.dir().display().to_string(), source })
        }
        Err(error) => {
            warn!(error = %crate::grpc::error_chain(&error), "no certificates; a TCP listener could not serve");
            Ok(certs)
        }
    }
}
