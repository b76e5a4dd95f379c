//! Storage for Quantix VMs: an io_uring image engine, pools of volumes with an image library, qcow2 overlays, and
//! cloud-init NoCloud seeds.
//!
//! - [`Engine`]: sparse-aware copy (reflink, `copy_file_range` or io_uring, as measured per pool: [`CopyPlan`]),
//!   import with size and SHA-256 checks, SHA-256, zero, create and resize of raw images, on threads of its own
//!   (never on tokio's runtime threads), with progress and cancellation through [`OpControl`]. A failed or
//!   cancelled operation leaves nothing behind.
//! - [`Pool`] and [`DirPool`]: volumes (empty, overlay on an image, full copy, clone; resize, delete) and library
//!   images (ISOs, cloud images, templates), with metadata written atomically. Deleting or resizing a volume asks
//!   the caller's [`InUse`] check first.
//! - [`qcow2::QemuImg`]: overlays, resize, virtual size and backing chain through `qemu-img --output=json`.
//! - [`cloudinit`]: `meta-data`, `user-data` and `network-config` on a vfat image labelled `cidata`.
//!
//! Not here: QEMU command lines and QMP (the `vmm` crate turns a [`DiskSource`] into `-blockdev`), gRPC, and
//! downloading images (import takes a local file).
//!
//! ```no_run
//! use qx_storage::{
//!     CreateVolume, DirPool, Engine, EngineConfig, FromImage, ImageKind, ImportImage, OpControl, Pool, QemuImg,
//!     VolumeSource,
//! };
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::new(EngineConfig::default())?;
//! let pool = DirPool::open("default", "/var/lib/quantix/pools/default", engine, QemuImg::new()).await?;
//! let ctl = OpControl::new();
//! pool.import_image(
//!     ImportImage {
//!         name: "debian-12".into(),
//!         kind: ImageKind::CloudImage,
//!         source: "/tmp/debian-12-genericcloud-amd64.qcow2".into(),
//!         format: None,
//!         size: None,
//!         sha256: None,
//!     },
//!     &ctl,
//! )
//! .await?;
//! let source = VolumeSource::Image { image: "debian-12".into(), mode: FromImage::Overlay, size: Some(20 << 30) };
//! pool.create_volume(CreateVolume { name: "web-1".into(), source }, &ctl).await?;
//! println!("{:?}", pool.volume_source("web-1").await?);
//! # Ok(()) }
//! ```
//!
//! A seed is attached read-only; with the vfat image this crate writes, QEMU 7.2 takes
//! `-drive if=none,id=seed,file=SEED,format=raw,readonly=on -device virtio-blk-pci,drive=seed`.

pub use qx_common::atomic;
pub mod cloudinit;
pub mod engine;
pub mod pool;
pub mod qcow2;
pub mod validate;
pub mod volume;

pub use engine::{
    Calibration, CalibrationKey, Cancel, CopyMethod, CopyOptions, CopyPlan, CopyReport, DataMethod, Digest, Engine,
    EngineConfig, EngineError, ImportOptions, Mechanism, OpControl, Preallocation, Progress, ResizeOptions, Sample,
    UringTuning, ZeroReport,
};
pub use pool::{BoxFuture, DirPool, DiskSource, ErrorKind, Pool, PoolError, PoolKind, PoolStats};
pub use qcow2::{ImageFormat, ImageInfo, Qcow2Error, QemuImg};
pub use validate::{FieldError, Invalid};
pub use volume::{
    CreateVolume, FromImage, Image, ImageKind, ImportImage, InUse, NotInUse, ObjectKind, Volume, VolumeOrigin,
    VolumeSource,
};
