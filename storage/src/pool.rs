//! Storage pools: where volumes and library images live. [`Pool`] is what the daemon calls; [`DirPool`] keeps
//! everything in a local directory (the default pool, under the data directory). An NFS pool is a `DirPool` on a
//! mounted directory plus a mount check; a Ceph RBD pool implements the same trait with `rbd` and answers
//! [`Pool::volume_source`] with an RBD [`DiskSource`], so callers do not change when either arrives.
//!
//! Layout of a `DirPool` root:
//!
//! ```text
//! pool.json           metadata: volumes and images (written atomically)
//! copy-calibration.json  which copy mechanism is fastest here, and why (measured on first copy, see `Engine::calibrate`)
//! volumes/NAME.raw    volumes (.raw or .qcow2)
//! images/NAME.EXT     the image library (.iso, .raw, .qcow2)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::atomic::{self, AtomicError, TempFile};
use crate::engine::{
    Calibration, CalibrationKey, CopyMethod, CopyOptions, CopyPlan, Engine, EngineError, ImportOptions, OpControl,
    Preallocation, ResizeOptions,
};
use crate::qcow2::{ImageFormat, Qcow2Error, QemuImg};
use crate::validate::{validate_name, Invalid, Problems};
use crate::volume::{
    check_size, CreateVolume, FromImage, Image, ImageKind, ImportImage, InUse, ObjectKind, Volume, VolumeOrigin,
    VolumeSource,
};

/// A boxed future, so that [`Pool`] can be used as `dyn Pool`.
pub use qx_common::BoxFuture;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PoolKind {
    /// A local directory.
    Dir,
}

/// Space in a pool, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Size of the filesystem (or cluster share) holding the pool.
    pub capacity: u64,
    /// In use on it, by anything.
    pub used: u64,
    /// Free for new data.
    pub available: u64,
    /// Allocated by this pool's volumes and images.
    pub allocated: u64,
    pub volumes: usize,
    pub images: usize,
}

/// How QEMU reaches a volume or image: what the VM manager turns into `-blockdev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum DiskSource {
    /// `-blockdev driver=FORMAT,file.driver=file,file.filename=PATH`. Always pass the format: never let QEMU probe.
    File { path: PathBuf, format: ImageFormat },
}

/// What a caller should do about an error; the daemon maps it to a gRPC status in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    /// The request is valid but the state forbids it now (in use, busy, would shrink).
    FailedPrecondition,
    Cancelled,
    /// Out of space on the pool.
    ResourceExhausted,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool}: invalid request: {problems}")]
    Invalid { pool: String, problems: Invalid },
    #[error("volume {pool}/{name} not found")]
    VolumeNotFound { pool: String, name: String },
    #[error("volume {pool}/{name} already exists")]
    VolumeExists { pool: String, name: String },
    #[error("image {pool}/{name} not found")]
    ImageNotFound { pool: String, name: String },
    #[error("image {pool}/{name} already exists")]
    ImageExists { pool: String, name: String },
    #[error("volume {pool}/{name} is in use by running VMs {users:?}")]
    VolumeInUse { pool: String, name: String, users: Vec<String> },
    #[error("image {pool}/{name} is in use by running VMs {users:?}")]
    ImageInUse { pool: String, name: String, users: Vec<String> },
    #[error("image {pool}/{name} is the backing image of volumes {volumes:?}")]
    ImageBacksVolumes { pool: String, name: String, volumes: Vec<String> },
    #[error("{kind:?} {pool}/{name} is busy: {operation} in progress")]
    Busy { pool: String, kind: ObjectKind, name: String, operation: &'static str },
    #[error("volume {pool}/{name}: shrinking from {current} to {requested} bytes needs allow_shrink")]
    ShrinkRefused { pool: String, name: String, current: u64, requested: u64 },
    #[error("image {pool}/{name} is an ISO: attach it as a CD-ROM, volumes cannot be made from it")]
    IsoNotABase { pool: String, name: String },
    #[error("image {path}: format {format} is not one Quantix stores (raw, qcow2)")]
    UnsupportedFormat { path: PathBuf, format: String },
    #[error("image {path} has the backing file {backing}; library images must stand alone")]
    ImageHasBacking { path: PathBuf, backing: String },
    #[error("pool {pool}: {operation} {name}")]
    Engine {
        pool: String,
        operation: &'static str,
        name: String,
        #[source]
        source: Box<EngineError>,
    },
    #[error("pool {pool}: {operation} {name}")]
    QemuImg {
        pool: String,
        operation: &'static str,
        name: String,
        #[source]
        source: Box<Qcow2Error>,
    },
    #[error("pool {pool}: {operation} {path}")]
    Io {
        pool: String,
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pool {pool}: write metadata")]
    MetadataWrite {
        pool: String,
        #[source]
        source: AtomicError,
    },
    #[error("pool {pool}: parse metadata {path}")]
    MetadataParse {
        pool: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("pool {pool}: metadata {path} has version {version}, this build reads up to {supported}")]
    MetadataVersion { pool: String, path: PathBuf, version: u32, supported: u32 },
    #[error("pool {pool}: {operation}")]
    Atomic {
        pool: String,
        operation: &'static str,
        #[source]
        source: AtomicError,
    },
    #[error("pool {pool}: blocking task for {operation}")]
    Join {
        pool: String,
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl PoolError {
    pub fn kind(&self) -> ErrorKind {
        use PoolError::*;
        match self {
            Invalid { .. } | UnsupportedFormat { .. } | ImageHasBacking { .. } | IsoNotABase { .. } => {
                ErrorKind::InvalidArgument
            }
            VolumeNotFound { .. } | ImageNotFound { .. } => ErrorKind::NotFound,
            VolumeExists { .. } | ImageExists { .. } => ErrorKind::AlreadyExists,
            VolumeInUse { .. } | ImageInUse { .. } | ImageBacksVolumes { .. } | Busy { .. } | ShrinkRefused { .. } => {
                ErrorKind::FailedPrecondition
            }
            Engine { source, .. } => match &**source {
                EngineError::Cancelled { .. } => ErrorKind::Cancelled,
                EngineError::SizeMismatch { .. } | EngineError::ChecksumMismatch { .. } => ErrorKind::InvalidArgument,
                EngineError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound => ErrorKind::NotFound,
                e if e.io_kind() == Some(io::ErrorKind::StorageFull) => ErrorKind::ResourceExhausted,
                _ => ErrorKind::Internal,
            },
            Io { source, .. } if source.kind() == io::ErrorKind::StorageFull => ErrorKind::ResourceExhausted,
            _ => ErrorKind::Internal,
        }
    }
}

/// A pool of volumes and library images. Long operations take an [`OpControl`] for progress and cancellation;
/// operations that must not touch a disk a running VM uses take an [`InUse`] check. Every method is safe to call
/// concurrently; operations on the same volume or image are refused with `Busy` rather than queued.
pub trait Pool: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn kind(&self) -> PoolKind;
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, PoolError>>;

    fn list_volumes(&self) -> BoxFuture<'_, Result<Vec<Volume>, PoolError>>;
    fn volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Volume, PoolError>>;
    /// Creates a volume: empty, or from a library image as an overlay or a full copy.
    fn create_volume<'a>(&'a self, req: CreateVolume, ctl: &'a OpControl) -> BoxFuture<'a, Result<Volume, PoolError>>;
    /// Sets a volume's size; shrinking needs `allow_shrink`. Refused while a running VM uses the volume: the VM
    /// manager grows a running VM's disk with QMP `block_resize` and then calls [`Pool::refresh_volume`].
    fn resize_volume<'a>(
        &'a self,
        name: &'a str,
        size: u64,
        allow_shrink: bool,
        in_use: &'a dyn InUse,
    ) -> BoxFuture<'a, Result<Volume, PoolError>>;
    /// Re-reads a volume's size from storage and records it (after an online `block_resize`).
    fn refresh_volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Volume, PoolError>>;
    /// Copies a volume to a new one. Refused while a running VM uses the source (the copy would be inconsistent).
    fn clone_volume<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
        in_use: &'a dyn InUse,
        ctl: &'a OpControl,
    ) -> BoxFuture<'a, Result<Volume, PoolError>>;
    /// Deletes a volume. Refused while a running VM uses it.
    fn delete_volume<'a>(&'a self, name: &'a str, in_use: &'a dyn InUse) -> BoxFuture<'a, Result<(), PoolError>>;
    /// How QEMU opens the volume.
    fn volume_source<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DiskSource, PoolError>>;

    fn list_images(&self) -> BoxFuture<'_, Result<Vec<Image>, PoolError>>;
    fn image<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Image, PoolError>>;
    /// Copies a local file into the library, verifying its size and checksum when given.
    fn import_image<'a>(&'a self, req: ImportImage, ctl: &'a OpControl) -> BoxFuture<'a, Result<Image, PoolError>>;
    /// Deletes a library image. Refused while a volume is backed by it or a running VM uses it (an attached ISO).
    fn delete_image<'a>(&'a self, name: &'a str, in_use: &'a dyn InUse) -> BoxFuture<'a, Result<(), PoolError>>;
    /// How QEMU opens the image (an ISO as a CD-ROM, say).
    fn image_source<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DiskSource, PoolError>>;
    /// How copies into this pool move data, and why; None until the first copy has measured it.
    fn copy_plan(&self) -> Option<CopyPlan>;
}

const META_FILE: &str = "pool.json";
const CALIBRATION_FILE: &str = "copy-calibration.json";
const META_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    version: u32,
    #[serde(default)]
    volumes: BTreeMap<String, Volume>,
    #[serde(default)]
    images: BTreeMap<String, Image>,
}

/// Names with an operation in progress: exclusive holds (create, resize, clone, delete) and shared reads of images
/// (volumes being made from them).
#[derive(Debug, Default)]
struct Holds {
    exclusive: HashMap<(ObjectKind, String), &'static str>,
    image_readers: HashMap<String, usize>,
}

/// Releases what an operation holds when it ends, however it ends.
struct Hold {
    holds: Arc<Mutex<Holds>>,
    exclusive: Vec<(ObjectKind, String)>,
    image_read: Option<String>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut h = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        for key in self.exclusive.drain(..) {
            h.exclusive.remove(&key);
        }
        if let Some(image) = self.image_read.take() {
            if let Some(n) = h.image_readers.get_mut(&image) {
                *n -= 1;
                if *n == 0 {
                    h.image_readers.remove(&image);
                }
            }
        }
    }
}

/// A pool in a local directory. See the module doc for the layout.
pub struct DirPool {
    name: String,
    root: PathBuf,
    engine: Engine,
    qemu_img: QemuImg,
    meta: tokio::sync::Mutex<Meta>,
    holds: Arc<Mutex<Holds>>,
    /// Set at open from the config or the cached calibration, else by the first copy's calibration.
    copy_plan: tokio::sync::OnceCell<CopyPlan>,
}

impl fmt::Debug for DirPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirPool").field("name", &self.name).field("root", &self.root).finish()
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl DirPool {
    /// Opens the pool at `root`, creating the directory layout and empty metadata on first use. Removes temporary
    /// files left by operations that were killed, and warns about files the metadata does not know.
    pub async fn open(
        name: impl Into<String>,
        root: impl Into<PathBuf>,
        engine: Engine,
        qemu_img: QemuImg,
    ) -> Result<Self, PoolError> {
        let name = name.into();
        let root = root.into();
        validate_name("pool", &name).map_err(|problems| PoolError::Invalid { pool: name.clone(), problems })?;
        if !root.is_absolute() {
            let mut p = Problems::default();
            p.add("root", root.display(), "is not an absolute path");
            return Err(PoolError::Invalid { pool: name, problems: p.into_result().unwrap_err() });
        }
        let pool = name.clone();
        let r = root.clone();
        let meta = blocking(&name, "open", move || open_dir(&pool, &r)).await??;
        let copy_plan = tokio::sync::OnceCell::new();
        if engine.config().copy_method == CopyMethod::Auto {
            let (pool, r) = (name.clone(), root.clone());
            if let Some(cached) = blocking(&name, "read calibration", move || cached_calibration(&pool, &r)).await? {
                let _ = copy_plan.set(cached.plan);
            }
        } else {
            let _ = copy_plan.set(engine.config().configured_plan());
        }
        tracing::info!(pool = %name, root = %root.display(), volumes = meta.volumes.len(), images = meta.images.len(), copy = %copy_plan.get().map_or("not measured yet".to_owned(), CopyPlan::summary), "pool opened");
        Ok(Self {
            name,
            root,
            engine,
            qemu_img,
            meta: tokio::sync::Mutex::new(meta),
            holds: Arc::new(Mutex::new(Holds::default())),
            copy_plan,
        })
    }

    /// The copy plan, measured now (about a second) if this is the pool's first copy and the config says `auto`.
    /// A measurement that fails is logged and the engine's defaults are used, unmeasured (the next copy tries
    /// again); a cancelled one cancels the copy.
    async fn plan_for_copy(&self) -> Result<CopyPlan, PoolError> {
        let measured = self
            .copy_plan
            .get_or_try_init(|| async {
                let calibration = self.engine.calibrate(self.root.join("volumes"), &OpControl::new()).await?;
                let data = serde_json::to_vec_pretty(&calibration).expect("calibration serializes");
                // Not caching it only costs a measurement at the next open.
                if let Err(e) = atomic::write_atomic_async(self.root.join(CALIBRATION_FILE), data).await {
                    tracing::warn!(pool = %self.name, error = %e, "cannot cache the copy calibration");
                }
                Ok::<_, EngineError>(calibration.plan)
            })
            .await;
        match measured {
            Ok(plan) => Ok(plan.clone()),
            Err(e) if e.is_cancelled() => Err(self.engine_err("calibrate copies", "")(e)),
            Err(e) => {
                tracing::warn!(pool = %self.name, error = %e, "copy calibration failed, copying with the engine defaults");
                let mut plan = self.engine.config().configured_plan();
                plan.reason = format!("calibration failed ({e}); engine defaults");
                Ok(plan)
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn volume_path(&self, name: &str, format: ImageFormat) -> PathBuf {
        self.root.join("volumes").join(format!("{name}.{}", format.extension()))
    }

    fn image_file_name(name: &str, kind: ImageKind, format: ImageFormat) -> String {
        let ext = if kind == ImageKind::Iso { "iso" } else { format.extension() };
        format!("{name}.{ext}")
    }

    fn image_path(&self, image: &Image) -> PathBuf {
        self.root.join("images").join(Self::image_file_name(&image.name, image.kind, image.format))
    }

    fn invalid(&self, source: Invalid) -> PoolError {
        PoolError::Invalid { pool: self.name.clone(), problems: source }
    }

    fn engine_err(&self, operation: &'static str, name: &str) -> impl FnOnce(EngineError) -> PoolError + '_ {
        let name = name.to_owned();
        move |source| PoolError::Engine { pool: self.name.clone(), operation, name, source: Box::new(source) }
    }

    fn qemu_err(&self, operation: &'static str, name: &str) -> impl FnOnce(Qcow2Error) -> PoolError + '_ {
        let name = name.to_owned();
        move |source| PoolError::QemuImg { pool: self.name.clone(), operation, name, source: Box::new(source) }
    }

    /// Takes exclusive holds on `exclusive` and a shared read of `image_read`, or says who holds them.
    fn hold(
        &self,
        operation: &'static str,
        exclusive: &[(ObjectKind, &str)],
        image_read: Option<&str>,
    ) -> Result<Hold, PoolError> {
        let mut h = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<(ObjectKind, String)> = exclusive.iter().map(|(k, n)| (*k, (*n).to_owned())).collect();
        let reads = image_read.map(|i| (ObjectKind::Image, i.to_owned()));
        for key in keys.iter().chain(reads.iter()) {
            if let Some(op) = h.exclusive.get(key) {
                return Err(PoolError::Busy {
                    pool: self.name.clone(),
                    kind: key.0,
                    name: key.1.clone(),
                    operation: op,
                });
            }
        }
        for key in &keys {
            if key.0 == ObjectKind::Image && h.image_readers.contains_key(&key.1) {
                return Err(PoolError::Busy {
                    pool: self.name.clone(),
                    kind: ObjectKind::Image,
                    name: key.1.clone(),
                    operation: "volume creation from it",
                });
            }
        }
        for key in &keys {
            h.exclusive.insert(key.clone(), operation);
        }
        if let Some(i) = image_read {
            *h.image_readers.entry(i.to_owned()).or_default() += 1;
        }
        Ok(Hold { holds: Arc::clone(&self.holds), exclusive: keys, image_read: image_read.map(str::to_owned) })
    }

    /// Applies `change` to a copy of the metadata, writes it atomically, and only then makes it current.
    async fn commit(&self, meta: &mut Meta, change: impl FnOnce(&mut Meta)) -> Result<(), PoolError> {
        let mut next = meta.clone();
        change(&mut next);
        let data = serde_json::to_vec_pretty(&next).expect("metadata serializes");
        atomic::write_atomic_async(self.root.join(META_FILE), data)
            .await
            .map_err(|source| PoolError::MetadataWrite { pool: self.name.clone(), source })?;
        *meta = next;
        Ok(())
    }

    fn check_users(&self, in_use: &dyn InUse, kind: ObjectKind, name: &str) -> Result<(), PoolError> {
        let users = in_use.users(&self.name, kind, name);
        if users.is_empty() {
            return Ok(());
        }
        let (pool, name) = (self.name.clone(), name.to_owned());
        Err(match kind {
            ObjectKind::Volume => PoolError::VolumeInUse { pool, name, users },
            ObjectKind::Image => PoolError::ImageInUse { pool, name, users },
        })
    }

    fn volume_not_found(&self, name: &str) -> PoolError {
        PoolError::VolumeNotFound { pool: self.name.clone(), name: name.to_owned() }
    }

    fn image_not_found(&self, name: &str) -> PoolError {
        PoolError::ImageNotFound { pool: self.name.clone(), name: name.to_owned() }
    }

    pub async fn do_stats(&self) -> Result<PoolStats, PoolError> {
        let (volumes, images): (Vec<PathBuf>, Vec<PathBuf>) = {
            let meta = self.meta.lock().await;
            (
                meta.volumes.values().map(|v| self.volume_path(&v.name, v.format)).collect(),
                meta.images.values().map(|i| self.image_path(i)).collect(),
            )
        };
        let root = self.root.clone();
        let pool = self.name.clone();
        blocking(&self.name, "stats", move || {
            let st = rustix::fs::statvfs(&root).map_err(|e| PoolError::Io {
                pool: pool.clone(),
                operation: "statvfs",
                path: root.clone(),
                source: e.into(),
            })?;
            let frsize = st.f_frsize;
            let allocated = volumes.iter().chain(images.iter()).map(|p| allocated_bytes(p)).sum();
            Ok(PoolStats {
                capacity: st.f_blocks * frsize,
                used: (st.f_blocks - st.f_bfree) * frsize,
                available: st.f_bavail * frsize,
                allocated,
                volumes: volumes.len(),
                images: images.len(),
            })
        })
        .await?
    }

    pub async fn do_list_volumes(&self) -> Result<Vec<Volume>, PoolError> {
        let mut volumes: Vec<Volume> = self.meta.lock().await.volumes.values().cloned().collect();
        let paths: Vec<PathBuf> = volumes.iter().map(|v| self.volume_path(&v.name, v.format)).collect();
        let sizes =
            blocking(&self.name, "list volumes", move || paths.iter().map(|p| allocated_bytes(p)).collect::<Vec<_>>())
                .await?;
        for (v, a) in volumes.iter_mut().zip(sizes) {
            v.allocated = a;
        }
        Ok(volumes)
    }

    pub async fn do_volume(&self, name: &str) -> Result<Volume, PoolError> {
        let mut v = self.meta.lock().await.volumes.get(name).cloned().ok_or_else(|| self.volume_not_found(name))?;
        let path = self.volume_path(&v.name, v.format);
        v.allocated = blocking(&self.name, "stat volume", move || allocated_bytes(&path)).await?;
        Ok(v)
    }

    pub async fn do_create_volume(&self, req: CreateVolume, ctl: &OpControl) -> Result<Volume, PoolError> {
        req.validate().map_err(|e| self.invalid(e))?;
        let name = req.name.clone();
        // Check names and take holds under the metadata lock, then work without it.
        let (image, _hold) = {
            let meta = self.meta.lock().await;
            if meta.volumes.contains_key(&name) {
                return Err(PoolError::VolumeExists { pool: self.name.clone(), name });
            }
            match &req.source {
                VolumeSource::Empty { .. } => (None, self.hold("create", &[(ObjectKind::Volume, &name)], None)?),
                VolumeSource::Image { image, .. } => {
                    let img = meta.images.get(image).cloned().ok_or_else(|| self.image_not_found(image))?;
                    if img.kind == ImageKind::Iso {
                        return Err(PoolError::IsoNotABase { pool: self.name.clone(), name: image.clone() });
                    }
                    (Some(img), self.hold("create", &[(ObjectKind::Volume, &name)], Some(image))?)
                }
            }
        };
        let started = std::time::Instant::now();
        let volume = match (&req.source, image) {
            (VolumeSource::Empty { size, format, preallocation }, _) => {
                let path = self.volume_path(&name, *format);
                match format {
                    ImageFormat::Raw => self
                        .engine
                        .create_raw(&path, *size, *preallocation, ctl)
                        .await
                        .map_err(self.engine_err("create volume", &name))?,
                    ImageFormat::Qcow2 => {
                        self.qcow2_into_place(
                            &name,
                            &path,
                            |tmp| async move { self.qemu_img.create(&tmp, *size).await },
                        )
                        .await?
                    }
                }
                Volume {
                    name: name.clone(),
                    format: *format,
                    capacity: *size,
                    origin: VolumeOrigin::Empty,
                    backing_image: None,
                    created_unix: now_unix(),
                    allocated: 0,
                }
            }
            (VolumeSource::Image { mode, size, .. }, Some(img)) => {
                let size = size.unwrap_or(img.virtual_size);
                if size < img.virtual_size {
                    let mut p = Problems::default();
                    p.add("source.size", size, format!("is below the image's virtual size {}", img.virtual_size));
                    return Err(self.invalid(p.into_result().unwrap_err()));
                }
                self.volume_from_image(&name, &img, *mode, size, ctl).await?
            }
            (VolumeSource::Image { .. }, None) => unreachable!("image looked up above"),
        };
        let path = self.volume_path(&name, volume.format);
        let mut meta = self.meta.lock().await;
        let v = volume.clone();
        if let Err(e) = self.commit(&mut meta, |m| drop(m.volumes.insert(v.name.clone(), v))).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        tracing::info!(pool = %self.name, volume = %name, origin = ?volume.origin, capacity = volume.capacity, elapsed_ms = started.elapsed().as_millis() as u64, "volume created");
        Ok(volume)
    }

    /// Runs `make` on a temporary path beside `path`, then renames the result into place; the temporary file is
    /// removed if anything fails or the future is dropped.
    async fn qcow2_into_place<F, Fut>(&self, name: &str, path: &Path, make: F) -> Result<(), PoolError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), Qcow2Error>>,
    {
        let tmp = atomic::temp_path_for(path).map_err(|source| PoolError::Atomic {
            pool: self.name.clone(),
            operation: "name a temporary file",
            source,
        })?;
        let mut guard = TempFile::new(tmp.clone());
        make(tmp.clone()).await.map_err(self.qemu_err("create volume", name))?;
        let (pool, target) = (self.name.clone(), path.to_owned());
        blocking(&self.name, "rename", move || {
            atomic::rename_noreplace(&tmp, &target).map_err(|source| PoolError::Io {
                pool: pool.clone(),
                operation: "rename into place",
                path: target.clone(),
                source,
            })?;
            atomic::sync_parent(&target).map_err(|source| PoolError::Atomic {
                pool,
                operation: "sync volumes directory",
                source,
            })
        })
        .await??;
        guard.disarm();
        Ok(())
    }

    async fn volume_from_image(
        &self,
        name: &str,
        img: &Image,
        mode: FromImage,
        size: u64,
        ctl: &OpControl,
    ) -> Result<Volume, PoolError> {
        let image_path = self.image_path(img);
        let (format, origin, backing_image) = match mode {
            FromImage::Overlay => {
                let path = self.volume_path(name, ImageFormat::Qcow2);
                // Relative to the overlay's directory, so the pool's root can move.
                let backing = Path::new("..").join("images").join(image_path.file_name().expect("image file name"));
                let fmt = img.format;
                self.qcow2_into_place(name, &path, |tmp| async move {
                    self.qemu_img.create_overlay(&tmp, &backing, fmt, Some(size)).await
                })
                .await?;
                (ImageFormat::Qcow2, VolumeOrigin::Overlay { image: img.name.clone() }, Some(img.name.clone()))
            }
            FromImage::Copy => {
                let path = self.volume_path(name, img.format);
                let grow_to = (img.format == ImageFormat::Raw).then_some(size);
                let plan = Some(self.plan_for_copy().await?);
                self.engine
                    .copy(&image_path, &path, CopyOptions { grow_to, plan, ..CopyOptions::default() }, ctl)
                    .await
                    .map_err(self.engine_err("copy image into volume", name))?;
                if img.format == ImageFormat::Qcow2 && size > img.virtual_size {
                    if let Err(e) = self.qemu_img.resize(&path, ImageFormat::Qcow2, size, false).await {
                        let _ = tokio::fs::remove_file(&path).await;
                        return Err(self.qemu_err("grow volume", name)(e));
                    }
                }
                (img.format, VolumeOrigin::Copy { image: img.name.clone() }, None)
            }
        };
        Ok(Volume {
            name: name.to_owned(),
            format,
            capacity: size,
            origin,
            backing_image,
            created_unix: now_unix(),
            allocated: 0,
        })
    }

    pub async fn do_resize_volume(
        &self,
        name: &str,
        size: u64,
        allow_shrink: bool,
        in_use: &dyn InUse,
    ) -> Result<Volume, PoolError> {
        let mut p = Problems::default();
        check_size(&mut p, "size", size);
        p.into_result().map_err(|e| self.invalid(e))?;
        let volume = self.meta.lock().await.volumes.get(name).cloned().ok_or_else(|| self.volume_not_found(name))?;
        self.check_users(in_use, ObjectKind::Volume, name)?;
        let _hold = self.hold("resize", &[(ObjectKind::Volume, name)], None)?;
        if size < volume.capacity && !allow_shrink {
            return Err(PoolError::ShrinkRefused {
                pool: self.name.clone(),
                name: name.to_owned(),
                current: volume.capacity,
                requested: size,
            });
        }
        let path = self.volume_path(name, volume.format);
        match volume.format {
            ImageFormat::Raw => {
                let opts = ResizeOptions { allow_shrink, preallocation: Preallocation::Off };
                self.engine.resize(&path, size, opts).await.map_err(self.engine_err("resize volume", name))?;
            }
            ImageFormat::Qcow2 => self
                .qemu_img
                .resize(&path, ImageFormat::Qcow2, size, allow_shrink)
                .await
                .map_err(self.qemu_err("resize volume", name))?,
        }
        let mut meta = self.meta.lock().await;
        self.commit(&mut meta, |m| {
            if let Some(v) = m.volumes.get_mut(name) {
                v.capacity = size;
            }
        })
        .await?;
        tracing::info!(pool = %self.name, volume = %name, from = volume.capacity, to = size, "volume resized");
        drop(meta);
        self.do_volume(name).await
    }

    pub async fn do_refresh_volume(&self, name: &str) -> Result<Volume, PoolError> {
        let volume = self.meta.lock().await.volumes.get(name).cloned().ok_or_else(|| self.volume_not_found(name))?;
        let path = self.volume_path(name, volume.format);
        let size = match volume.format {
            ImageFormat::Raw => {
                let p = path.clone();
                let pool = self.name.clone();
                blocking(&self.name, "stat volume", move || {
                    std::fs::metadata(&p).map(|m| m.len()).map_err(|source| PoolError::Io {
                        pool,
                        operation: "stat",
                        path: p.clone(),
                        source,
                    })
                })
                .await??
            }
            ImageFormat::Qcow2 => {
                self.qemu_img
                    .info(&path, Some(ImageFormat::Qcow2))
                    .await
                    .map_err(self.qemu_err("inspect volume", name))?
                    .virtual_size
            }
        };
        if size != volume.capacity {
            let mut meta = self.meta.lock().await;
            self.commit(&mut meta, |m| {
                if let Some(v) = m.volumes.get_mut(name) {
                    v.capacity = size;
                }
            })
            .await?;
            tracing::info!(pool = %self.name, volume = %name, from = volume.capacity, to = size, "volume size refreshed");
        }
        self.do_volume(name).await
    }

    pub async fn do_clone_volume(
        &self,
        source: &str,
        target: &str,
        in_use: &dyn InUse,
        ctl: &OpControl,
    ) -> Result<Volume, PoolError> {
        validate_name("target", target).map_err(|e| self.invalid(e))?;
        let (src, _hold) = {
            let meta = self.meta.lock().await;
            let src = meta.volumes.get(source).cloned().ok_or_else(|| self.volume_not_found(source))?;
            if meta.volumes.contains_key(target) {
                return Err(PoolError::VolumeExists { pool: self.name.clone(), name: target.to_owned() });
            }
            self.check_users(in_use, ObjectKind::Volume, source)?;
            let hold = self.hold("clone", &[(ObjectKind::Volume, source), (ObjectKind::Volume, target)], None)?;
            (src, hold)
        };
        let from = self.volume_path(source, src.format);
        let to = self.volume_path(target, src.format);
        let plan = Some(self.plan_for_copy().await?);
        self.engine
            .copy(&from, &to, CopyOptions { plan, ..CopyOptions::default() }, ctl)
            .await
            .map_err(self.engine_err("clone volume", source))?;
        let volume = Volume {
            name: target.to_owned(),
            origin: VolumeOrigin::Clone { volume: source.to_owned() },
            created_unix: now_unix(),
            allocated: 0,
            ..src
        };
        let mut meta = self.meta.lock().await;
        let v = volume.clone();
        if let Err(e) = self.commit(&mut meta, |m| drop(m.volumes.insert(v.name.clone(), v))).await {
            let _ = tokio::fs::remove_file(&to).await;
            return Err(e);
        }
        tracing::info!(pool = %self.name, volume = %target, source, "volume cloned");
        Ok(volume)
    }

    pub async fn do_delete_volume(&self, name: &str, in_use: &dyn InUse) -> Result<(), PoolError> {
        let mut meta = self.meta.lock().await;
        let volume = meta.volumes.get(name).cloned().ok_or_else(|| self.volume_not_found(name))?;
        self.check_users(in_use, ObjectKind::Volume, name)?;
        let _hold = self.hold("delete", &[(ObjectKind::Volume, name)], None)?;
        // Metadata first: a crash between the two leaves an orphan file (reported at open), never a volume whose
        // file is gone.
        self.commit(&mut meta, |m| drop(m.volumes.remove(name))).await?;
        drop(meta);
        let path = self.volume_path(name, volume.format);
        let pool = self.name.clone();
        blocking(&self.name, "delete volume", move || remove_and_sync(&pool, &path)).await??;
        tracing::info!(pool = %self.name, volume = %name, "volume deleted");
        Ok(())
    }

    pub async fn do_volume_source(&self, name: &str) -> Result<DiskSource, PoolError> {
        let meta = self.meta.lock().await;
        let v = meta.volumes.get(name).ok_or_else(|| self.volume_not_found(name))?;
        Ok(DiskSource::File { path: self.volume_path(name, v.format), format: v.format })
    }

    pub async fn do_list_images(&self) -> Result<Vec<Image>, PoolError> {
        Ok(self.meta.lock().await.images.values().cloned().collect())
    }

    pub async fn do_image(&self, name: &str) -> Result<Image, PoolError> {
        self.meta.lock().await.images.get(name).cloned().ok_or_else(|| self.image_not_found(name))
    }

    pub async fn do_import_image(&self, req: ImportImage, ctl: &OpControl) -> Result<Image, PoolError> {
        req.validate().map_err(|e| self.invalid(e))?;
        let source = req.source.clone();
        if let Err(problem) = blocking(&self.name, "inspect image source", move || check_import_source(&source)).await?
        {
            return Err(self.invalid(Invalid::one("source", req.source.display(), problem)));
        }
        let name = req.name.clone();
        let _hold = {
            let meta = self.meta.lock().await;
            if meta.images.contains_key(&name) {
                return Err(PoolError::ImageExists { pool: self.name.clone(), name });
            }
            self.hold("import", &[(ObjectKind::Image, &name)], None)?
        };
        let (format, virtual_size) = if req.kind == ImageKind::Iso {
            (ImageFormat::Raw, None)
        } else {
            let info =
                self.qemu_img.info(&req.source, req.format).await.map_err(self.qemu_err("inspect image", &name))?;
            let format = info.image_format().ok_or_else(|| PoolError::UnsupportedFormat {
                path: req.source.clone(),
                format: info.format.clone(),
            })?;
            if let Some(backing) = info.backing_filename {
                return Err(PoolError::ImageHasBacking { path: req.source.clone(), backing });
            }
            (format, Some(info.virtual_size))
        };
        let path = self.root.join("images").join(Self::image_file_name(&name, req.kind, format));
        let plan = Some(self.plan_for_copy().await?);
        let report = self
            .engine
            .import(&req.source, &path, ImportOptions { size: req.size, sha256: req.sha256, plan }, ctl)
            .await
            .map_err(self.engine_err("import image", &name))?;
        let image = Image {
            name: name.clone(),
            kind: req.kind,
            format,
            virtual_size: virtual_size.unwrap_or(report.size),
            file_size: report.size,
            sha256: report.sha256,
            created_unix: now_unix(),
        };
        let mut meta = self.meta.lock().await;
        let i = image.clone();
        if let Err(e) = self.commit(&mut meta, |m| drop(m.images.insert(i.name.clone(), i))).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        tracing::info!(pool = %self.name, image = %name, kind = ?image.kind, format = %format, size = image.file_size, "image imported");
        Ok(image)
    }

    pub async fn do_delete_image(&self, name: &str, in_use: &dyn InUse) -> Result<(), PoolError> {
        let mut meta = self.meta.lock().await;
        let image = meta.images.get(name).cloned().ok_or_else(|| self.image_not_found(name))?;
        let backed: Vec<String> = meta
            .volumes
            .values()
            .filter(|v| v.backing_image.as_deref() == Some(name))
            .map(|v| v.name.clone())
            .collect();
        if !backed.is_empty() {
            return Err(PoolError::ImageBacksVolumes {
                pool: self.name.clone(),
                name: name.to_owned(),
                volumes: backed,
            });
        }
        self.check_users(in_use, ObjectKind::Image, name)?;
        let _hold = self.hold("delete", &[(ObjectKind::Image, name)], None)?;
        self.commit(&mut meta, |m| drop(m.images.remove(name))).await?;
        drop(meta);
        let path = self.image_path(&image);
        let pool = self.name.clone();
        blocking(&self.name, "delete image", move || remove_and_sync(&pool, &path)).await??;
        tracing::info!(pool = %self.name, image = %name, "image deleted");
        Ok(())
    }

    pub async fn do_image_source(&self, name: &str) -> Result<DiskSource, PoolError> {
        let meta = self.meta.lock().await;
        let i = meta.images.get(name).ok_or_else(|| self.image_not_found(name))?;
        Ok(DiskSource::File { path: self.image_path(i), format: i.format })
    }
}

impl Pool for DirPool {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> PoolKind {
        PoolKind::Dir
    }
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, PoolError>> {
        Box::pin(self.do_stats())
    }
    fn list_volumes(&self) -> BoxFuture<'_, Result<Vec<Volume>, PoolError>> {
        Box::pin(self.do_list_volumes())
    }
    fn volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Volume, PoolError>> {
        Box::pin(self.do_volume(name))
    }
    fn create_volume<'a>(&'a self, req: CreateVolume, ctl: &'a OpControl) -> BoxFuture<'a, Result<Volume, PoolError>> {
        Box::pin(self.do_create_volume(req, ctl))
    }
    fn resize_volume<'a>(
        &'a self,
        name: &'a str,
        size: u64,
        allow_shrink: bool,
        in_use: &'a dyn InUse,
    ) -> BoxFuture<'a, Result<Volume, PoolError>> {
        Box::pin(self.do_resize_volume(name, size, allow_shrink, in_use))
    }
    fn refresh_volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Volume, PoolError>> {
        Box::pin(self.do_refresh_volume(name))
    }
    fn clone_volume<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
        in_use: &'a dyn InUse,
        ctl: &'a OpControl,
    ) -> BoxFuture<'a, Result<Volume, PoolError>> {
        Box::pin(self.do_clone_volume(source, target, in_use, ctl))
    }
    fn delete_volume<'a>(&'a self, name: &'a str, in_use: &'a dyn InUse) -> BoxFuture<'a, Result<(), PoolError>> {
        Box::pin(self.do_delete_volume(name, in_use))
    }
    fn volume_source<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DiskSource, PoolError>> {
        Box::pin(self.do_volume_source(name))
    }
    fn list_images(&self) -> BoxFuture<'_, Result<Vec<Image>, PoolError>> {
        Box::pin(self.do_list_images())
    }
    fn image<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Image, PoolError>> {
        Box::pin(self.do_image(name))
    }
    fn import_image<'a>(&'a self, req: ImportImage, ctl: &'a OpControl) -> BoxFuture<'a, Result<Image, PoolError>> {
        Box::pin(self.do_import_image(req, ctl))
    }
    fn delete_image<'a>(&'a self, name: &'a str, in_use: &'a dyn InUse) -> BoxFuture<'a, Result<(), PoolError>> {
        Box::pin(self.do_delete_image(name, in_use))
    }
    fn image_source<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DiskSource, PoolError>> {
        Box::pin(self.do_image_source(name))
    }
    fn copy_plan(&self) -> Option<CopyPlan> {
        self.copy_plan.get().cloned()
    }
}

/// The cached calibration of the pool at `root`, if there is one and it was measured on this filesystem and
/// kernel; anything else (missing, unreadable, stale) means measuring again.
fn cached_calibration(pool: &str, root: &Path) -> Option<Calibration> {
    let path = root.join(CALIBRATION_FILE);
    let bytes = std::fs::read(&path).ok()?;
    let cached: Calibration = match serde_json::from_slice(&bytes) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(pool, path = %path.display(), error = %e, "unreadable copy calibration, measuring again");
            return None;
        }
    };
    let current = CalibrationKey::of(&root.join("volumes")).ok()?;
    if cached.key != current {
        tracing::info!(pool, cached = ?cached.key, ?current, "copy calibration is for another setup, measuring again");
        return None;
    }
    Some(cached)
}

/// Runs blocking filesystem work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    pool: &str,
    operation: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PoolError> {
    tokio::task::spawn_blocking(f).await.map_err(|source| PoolError::Join { pool: pool.to_owned(), operation, source })
}

/// An import reads a regular file (through a symlink or not); a directory, a device (`/dev/zero` never ends), a
/// FIFO or a socket is the caller's mistake, refused before anything is written.
fn check_import_source(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => "does not exist".to_owned(),
        _ => format!("cannot be read: {e}"),
    })?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        // Opening it is the only true test of whether this process may read it.
        return std::fs::File::open(path).map(drop).map_err(|e| format!("cannot be read: {e}"));
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something other than a regular file"
    };
    Err(format!("is {what}, not an image file"))
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn remove_and_sync(pool: &str, path: &Path) -> Result<(), PoolError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!(pool, path = %path.display(), "file was already gone");
        }
        Err(source) => {
            return Err(PoolError::Io { pool: pool.to_owned(), operation: "remove", path: path.to_owned(), source })
        }
    }
    atomic::sync_parent(path).map_err(|source| PoolError::Atomic {
        pool: pool.to_owned(),
        operation: "sync directory",
        source,
    })
}

/// Creates the layout, reads (or creates) the metadata, sweeps temporary files and reports orphans.
fn open_dir(pool: &str, root: &Path) -> Result<Meta, PoolError> {
    let io_err = |operation, path: &Path| {
        let (pool, path) = (pool.to_owned(), path.to_owned());
        move |source| PoolError::Io { pool, operation, path, source }
    };
    for dir in [root.to_owned(), root.join("volumes"), root.join("images")] {
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    }
    let meta_path = root.join(META_FILE);
    let meta = match std::fs::read(&meta_path) {
        Ok(bytes) => {
            let meta: Meta = serde_json::from_slice(&bytes).map_err(|source| PoolError::MetadataParse {
                pool: pool.to_owned(),
                path: meta_path.clone(),
                source,
            })?;
            if meta.version > META_VERSION {
                return Err(PoolError::MetadataVersion {
                    pool: pool.to_owned(),
                    path: meta_path,
                    version: meta.version,
                    supported: META_VERSION,
                });
            }
            meta
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let meta = Meta { version: META_VERSION, ..Meta::default() };
            let data = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
            atomic::write_atomic(&meta_path, &data)
                .map_err(|source| PoolError::MetadataWrite { pool: pool.to_owned(), source })?;
            meta
        }
        Err(e) => return Err(io_err("read metadata", &meta_path)(e)),
    };
    for sub in ["volumes", "images"] {
        let dir = root.join(sub);
        let removed = atomic::sweep_temp_files(&dir).map_err(io_err("sweep temporary files in", &dir))?;
        if !removed.is_empty() {
            tracing::warn!(pool, dir = %dir.display(), count = removed.len(), "removed temporary files of interrupted operations");
        }
    }
    let known: std::collections::HashSet<String> = meta
        .volumes
        .values()
        .map(|v| format!("volumes/{}.{}", v.name, v.format.extension()))
        .chain(meta.images.values().map(|i| format!("images/{}", DirPool::image_file_name(&i.name, i.kind, i.format))))
        .collect();
    for sub in ["volumes", "images"] {
        let dir = root.join(sub);
        for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
            let rel = format!("{sub}/{}", entry.file_name().to_string_lossy());
            if !known.contains(&rel) {
                tracing::warn!(pool, file = %rel, "file not in the pool's metadata (left by an interrupted delete?)");
            }
        }
    }
    Ok(meta)
}
