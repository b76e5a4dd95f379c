//! Storage pools as the node offers them: one local-directory pool, `default`, under the data directory, whose
//! volumes VM disks can name (`default/NAME`). Also the [`VolumeBackend`] that resolves those names at VM start.

use std::path::{Path, PathBuf};

use qx_storage::{
    DirPool, DiskSource, Engine, EngineConfig, EngineError, ImageFormat, ObjectKind, Pool, PoolError, QemuImg,
};
use qx_vmm::network::BoxFuture;
use qx_vmm::spec::DiskFormat;
use qx_vmm::VolumeBackend;

/// The pool every node has.
pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("pool {0:?} not found (this node has the pool \"default\")")]
    PoolNotFound(String),
    #[error("cannot start the image engine")]
    Engine(#[source] EngineError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A request the node refuses before a pool sees it (a source outside the allowed host paths).
    #[error("{0}")]
    Invalid(qx_common::ValidationErrors),
    /// An operation on a volume in use went through its VM (a running VM's disk grown online).
    #[error(transparent)]
    Vm(#[from] qx_vmm::VmError),
}

/// The node's pools (one for now; the `Pool` trait leaves room for NFS and Ceph RBD). The default pool and its
/// io_uring engine threads come up on first use, so a node that never touches a volume pays nothing at start.
pub struct Pools {
    root: PathBuf,
    engine: EngineConfig,
    default: tokio::sync::OnceCell<DirPool>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pools")
    }
}

impl Pools {
    /// The pools under `<data_dir>/pools/`, copying with an engine of `engine`'s settings; `default` is created on
    /// first use.
    pub fn new(data_dir: &Path, engine: EngineConfig) -> Self {
        Self { root: data_dir.join("pools").join(DEFAULT_POOL), engine, default: tokio::sync::OnceCell::new() }
    }

    /// The pool called `name`, opened on first use.
    pub async fn pool(&self, name: &str) -> Result<&dyn Pool, VolumeError> {
        if name != DEFAULT_POOL {
            return Err(VolumeError::PoolNotFound(name.to_owned()));
        }
        let pool = self
            .default
            .get_or_try_init(|| async {
                let config = self.engine.clone();
                let engine = tokio::task::spawn_blocking(move || Engine::new(config))
                    .await
                    .expect("engine start-up task panicked")
                    .map_err(VolumeError::Engine)?;
                Ok::<_, VolumeError>(DirPool::open(DEFAULT_POOL, self.root.clone(), engine, QemuImg::new()).await?)
            })
            .await?;
        Ok(pool)
    }

    /// Every pool of the node.
    pub async fn all(&self) -> Result<Vec<&dyn Pool>, VolumeError> {
        Ok(vec![self.pool(DEFAULT_POOL).await?])
    }
}

impl VolumeBackend for Pools {
    fn resolve<'a>(&'a self, volume: &'a str) -> BoxFuture<'a, Result<(PathBuf, DiskFormat), String>> {
        Box::pin(async move {
            let (pool, name) = volume.split_once('/').ok_or("is not pool/volume")?;
            let pool = match self.pool(pool).await {
                Ok(pool) => pool,
                Err(VolumeError::PoolNotFound(_)) => return Err(format!("names pool {pool:?}, which does not exist")),
                Err(e) => return Err(e.to_string()),
            };
            match pool.volume_source(name).await {
                Ok(DiskSource::File { path, format }) => Ok((
                    path,
                    match format {
                        ImageFormat::Raw => DiskFormat::Raw,
                        ImageFormat::Qcow2 => DiskFormat::Qcow2,
                    },
                )),
                Ok(_) => Err("is of a kind this node cannot attach".to_owned()),
                Err(e) if e.kind() == qx_storage::ErrorKind::NotFound => Err("does not exist".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// Which running VMs use a volume, for the pool's delete and resize checks.
pub fn users_of(vms: &[qx_vmm::VmInfo], pool: &str, kind: ObjectKind, name: &str) -> Vec<String> {
    if kind != ObjectKind::Volume {
        return Vec::new();
    }
    let wanted = format!("{pool}/{name}");
    vms.iter()
        .filter(|vm| vm.state.is_active())
        .filter(|vm| vm.spec.disks.iter().any(|d| d.volume.as_deref() == Some(wanted.as_str())))
        .map(|vm| vm.spec.name.clone())
        .collect()
}
