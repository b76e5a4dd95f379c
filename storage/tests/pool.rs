//! A directory pool on the real filesystem, with the real engine and qemu-img.

mod common;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use common::*;
use qx_storage::{
    CreateVolume, DirPool, DiskSource, Engine, EngineConfig, ErrorKind, FromImage, ImageFormat, ImageKind, ImportImage,
    NotInUse, ObjectKind, OpControl, Pool, PoolError, Preallocation, QemuImg, VolumeOrigin, VolumeSource,
};

const MIB: u64 = 1 << 20;

async fn open(root: &std::path::Path) -> DirPool {
    DirPool::open("default", root, Engine::new(EngineConfig::default()).unwrap(), QemuImg::new()).await.unwrap()
}

fn import(name: &str, kind: ImageKind, source: &std::path::Path) -> ImportImage {
    ImportImage { name: name.into(), kind, source: source.into(), format: None, size: None, sha256: None }
}

fn empty(name: &str, size: u64, format: ImageFormat) -> CreateVolume {
    CreateVolume { name: name.into(), source: VolumeSource::Empty { size, format, preallocation: Preallocation::Off } }
}

fn from_image(name: &str, image: &str, mode: FromImage, size: Option<u64>) -> CreateVolume {
    CreateVolume { name: name.into(), source: VolumeSource::Image { image: image.into(), mode, size } }
}

fn path_of(source: DiskSource) -> std::path::PathBuf {
    match source {
        DiskSource::File { path, .. } => path,
        other => panic!("{other:?}"),
    }
}

#[test]
fn volumes_and_images_lifecycle() {
    require_tool("qemu-img");
    let qemu_io = require_tool("qemu-io");
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("pool");
    let cloud = work.path().join("cloud.raw");
    sparse_file(&cloud, 16 * MIB, &[(0, 2 * MIB), (8 * MIB, 9 * MIB)], 21);
    let cloud_sha = sha256_file(&cloud);
    let rt = rt();
    let ctl = OpControl::new();

    rt.block_on(async {
        let pool = open(&root).await;
        assert_eq!(pool.name(), "default");

        // Library: a raw cloud image (format probed, checksum verified) and an ISO.
        let mut req = import("debian", ImageKind::CloudImage, &cloud);
        req.sha256 = Some(qx_storage::Digest(cloud_sha));
        let img = pool.import_image(req, &ctl).await.unwrap();
        assert_eq!(
            (img.format, img.virtual_size, img.sha256),
            (ImageFormat::Raw, 16 * MIB, Some(qx_storage::Digest(cloud_sha)))
        );
        let iso = pool.import_image(import("tools", ImageKind::Iso, &cloud), &ctl).await.unwrap();
        assert_eq!(iso.format, ImageFormat::Raw);
        assert!(path_of(pool.image_source("tools").await.unwrap()).ends_with("images/tools.iso"));
        let err = pool.import_image(import("debian", ImageKind::CloudImage, &cloud), &ctl).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

        // Volumes: empty raw and qcow2, an overlay and a full copy of the image.
        let v = pool.create_volume(empty("scratch", 8 * MIB, ImageFormat::Raw), &ctl).await.unwrap();
        assert_eq!((v.format, v.capacity, v.origin), (ImageFormat::Raw, 8 * MIB, VolumeOrigin::Empty));
        pool.create_volume(empty("q", 8 * MIB, ImageFormat::Qcow2), &ctl).await.unwrap();
        let overlay =
            pool.create_volume(from_image("web-1", "debian", FromImage::Overlay, Some(32 * MIB)), &ctl).await.unwrap();
        assert_eq!((overlay.format, overlay.capacity), (ImageFormat::Qcow2, 32 * MIB));
        assert_eq!(overlay.backing_image.as_deref(), Some("debian"));
        let copy =
            pool.create_volume(from_image("db-1", "debian", FromImage::Copy, Some(24 * MIB)), &ctl).await.unwrap();
        assert_eq!((copy.format, copy.capacity, copy.backing_image), (ImageFormat::Raw, 24 * MIB, None));

        let copy_path = path_of(pool.volume_source("db-1").await.unwrap());
        assert_eq!(fs::metadata(&copy_path).unwrap().len(), 24 * MIB);
        assert!(allocated(&copy_path) <= 3 * MIB + 64 * 1024, "copy stays sparse: {}", allocated(&copy_path));

        // The overlay reads the image and writes go to the overlay only.
        let overlay_path = path_of(pool.volume_source("web-1").await.unwrap());
        let info = QemuImg::new().info(&overlay_path, Some(ImageFormat::Qcow2)).await.unwrap();
        assert_eq!(info.backing_filename.as_deref(), Some("../images/debian.raw"), "relative backing path");
        assert_eq!(info.virtual_size, 32 * MIB);
        run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", "write -P 0xcd 0 1M"]).arg(&overlay_path));
        assert_eq!(sha256_file(&path_of(pool.image_source("debian").await.unwrap())), cloud_sha);

        // Errors that callers map to statuses.
        let err = pool.create_volume(from_image("x", "tools", FromImage::Overlay, None), &ctl).await.unwrap_err();
        assert!(matches!(err, PoolError::IsoNotABase { .. }), "{err}");
        let err = pool.create_volume(from_image("x", "debian", FromImage::Overlay, Some(MIB)), &ctl).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains("source.size: \"1048576\" is below the image's virtual size 16777216"),
            "{err}"
        );
        let err = pool.create_volume(from_image("x", "nope", FromImage::Copy, None), &ctl).await.unwrap_err();
        assert_eq!(err.to_string(), "image default/nope not found");
        let err = pool.create_volume(empty("scratch", MIB, ImageFormat::Raw), &ctl).await.unwrap_err();
        assert_eq!(err.to_string(), "volume default/scratch already exists");
        let err = pool.create_volume(empty("../etc", MIB, ImageFormat::Raw), &ctl).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains(r#"name: "../etc" contains '/'"#), "{err}");

        // Resize: grow; shrinking needs allow_shrink; refused while in use.
        let grown = pool.resize_volume("web-1", 48 * MIB, false, &NotInUse).await.unwrap();
        assert_eq!(grown.capacity, 48 * MIB);
        assert_eq!(QemuImg::new().info(&overlay_path, None).await.unwrap().virtual_size, 48 * MIB);
        // An online resize (QMP block_resize on the running VM) is recorded by refresh_volume.
        run(Command::new("qemu-img").args(["resize", "-q", "-f", "qcow2"]).arg(&overlay_path).arg("56M"));
        assert_eq!(pool.refresh_volume("web-1").await.unwrap().capacity, 56 * MIB);
        let grown = pool.resize_volume("web-1", 48 * MIB, true, &NotInUse).await.unwrap();
        assert_eq!(grown.capacity, 48 * MIB);
        let err = pool.resize_volume("scratch", 4 * MIB, false, &NotInUse).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            err.to_string(),
            "volume default/scratch: shrinking from 8388608 to 4194304 bytes needs allow_shrink"
        );
        pool.resize_volume("scratch", 4 * MIB, true, &NotInUse).await.unwrap();
        let running = |_: &str, kind: ObjectKind, name: &str| {
            if kind == ObjectKind::Volume && name == "web-1" {
                vec!["web".to_owned()]
            } else {
                vec![]
            }
        };
        let err = pool.resize_volume("web-1", 64 * MIB, false, &running).await.unwrap_err();
        assert_eq!(err.to_string(), r#"volume default/web-1 is in use by running VMs ["web"]"#);

        // Clone keeps the backing image; the image then backs two volumes.
        let clone = pool.clone_volume("web-1", "web-2", &NotInUse, &ctl).await.unwrap();
        assert_eq!(clone.origin, VolumeOrigin::Clone { volume: "web-1".into() });
        assert_eq!(clone.backing_image.as_deref(), Some("debian"));
        let clone_path = path_of(pool.volume_source("web-2").await.unwrap());
        let out = run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", "read -P 0xcd 0 1M"]).arg(&clone_path));
        assert!(out.contains("read 1048576/1048576"), "{out}");
        let err = pool.clone_volume("web-1", "web-3", &running, &ctl).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

        // Delete: refused while in use, and an image that backs volumes stays.
        let err = pool.delete_volume("web-1", &running).await.unwrap_err();
        assert!(matches!(err, PoolError::VolumeInUse { .. }), "{err}");
        let err = pool.delete_image("debian", &NotInUse).await.unwrap_err();
        assert_eq!(err.to_string(), r#"image default/debian is the backing image of volumes ["web-1", "web-2"]"#);
        let iso_in_use = |_: &str, kind: ObjectKind, _: &str| {
            if kind == ObjectKind::Image {
                vec!["installer".to_owned()]
            } else {
                vec![]
            }
        };
        let err = pool.delete_image("tools", &iso_in_use).await.unwrap_err();
        assert!(matches!(err, PoolError::ImageInUse { .. }), "{err}");
        pool.delete_volume("web-1", &NotInUse).await.unwrap();
        pool.delete_volume("web-2", &NotInUse).await.unwrap();
        assert!(!overlay_path.exists() && !clone_path.exists());
        pool.delete_image("debian", &NotInUse).await.unwrap();
        let err = pool.delete_volume("web-1", &NotInUse).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);

        let names: Vec<String> = pool.list_volumes().await.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["db-1", "q", "scratch"]);
        let stats = pool.stats().await.unwrap();
        assert!(stats.capacity > 0 && stats.available <= stats.capacity && stats.used <= stats.capacity, "{stats:?}");
        assert_eq!((stats.volumes, stats.images), (3, 1));
        assert!(stats.allocated >= 3 * MIB, "{stats:?}");
    });

    // Everything above survives a restart: the metadata (and the copy calibration the first import measured) was
    // written, atomically, with no temporary files left.
    assert_eq!(entries(&root), ["copy-calibration.json", "images", "pool.json", "volumes"]);
    rt.block_on(async {
        let pool: Arc<dyn Pool> = Arc::new(open(&root).await);
        let volumes = pool.list_volumes().await.unwrap();
        assert_eq!(volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["db-1", "q", "scratch"]);
        assert_eq!(volumes[2].capacity, 4 * MIB);
        assert_eq!(pool.list_images().await.unwrap().len(), 1);
    });
}

#[test]
fn qcow2_cloud_image_import_overlay_and_copy() {
    require_tool("qemu-img");
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("src.raw");
    sparse_file(&raw, 8 * MIB, &[(0, MIB)], 22);
    let qcow = work.path().join("cloud.qcow2");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow));
    let rt = rt();
    let ctl = OpControl::new();
    rt.block_on(async {
        let pool = open(&work.path().join("pool")).await;
        let img = pool.import_image(import("cloud", ImageKind::CloudImage, &qcow), &ctl).await.unwrap();
        assert_eq!((img.format, img.virtual_size), (ImageFormat::Qcow2, 8 * MIB));

        let v = pool.create_volume(from_image("full", "cloud", FromImage::Copy, Some(16 * MIB)), &ctl).await.unwrap();
        assert_eq!((v.format, v.capacity), (ImageFormat::Qcow2, 16 * MIB));
        let p = path_of(pool.volume_source("full").await.unwrap());
        assert_eq!(QemuImg::new().info(&p, Some(ImageFormat::Qcow2)).await.unwrap().virtual_size, 16 * MIB);

        let o = pool.create_volume(from_image("thin", "cloud", FromImage::Overlay, None), &ctl).await.unwrap();
        let p = path_of(pool.volume_source("thin").await.unwrap());
        let chain = QemuImg::new().backing_chain(&p, Some(ImageFormat::Qcow2)).await.unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(o.capacity, 8 * MIB);
        // Both read as the raw source (qemu-img compare checks guest-visible content).
        run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&p).arg(&raw));

        // A library image must stand alone: an overlay is refused.
        let err = pool.import_image(import("layered", ImageKind::Template, &p), &ctl).await.unwrap_err();
        assert!(matches!(err, PoolError::ImageHasBacking { .. }), "{err}");
    });
}

#[test]
fn cancelled_volume_copy_leaves_no_file_and_no_metadata() {
    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big.raw");
    sparse_file(&big, 64 * MIB, &[(0, 64 * MIB)], 23);
    let rt = rt();
    rt.block_on(async {
        // A slow pipeline, chosen rather than measured: a calibration that picks copy_file_range can finish 64 MiB
        // before the first progress report, and then there is nothing left to cancel.
        let config = EngineConfig {
            copy_method: qx_storage::CopyMethod::Uring,
            reflink: false,
            queue_depth: 1,
            block_size: 64 << 10,
            ..Default::default()
        };
        let engine = Engine::new(config).unwrap();
        let pool = DirPool::open("slow", work.path().join("pool"), engine, QemuImg::new()).await.unwrap();
        let mut req = import("big", ImageKind::Template, &big);
        req.format = Some(ImageFormat::Raw);
        pool.import_image(req, &OpControl::new()).await.unwrap();

        let ctl = OpControl::new();
        let mut rx = ctl.subscribe();
        let canceller = ctl.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if rx.borrow().done > 0 {
                    canceller.cancel();
                }
            }
        });
        let err = pool.create_volume(from_image("v", "big", FromImage::Copy, None), &ctl).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cancelled, "{err:?}");
        assert!(pool.list_volumes().await.unwrap().is_empty());
        assert_eq!(entries(&work.path().join("pool/volumes")), Vec::<String>::new());
        // The name is free again.
        pool.create_volume(empty("v", MIB, ImageFormat::Raw), &OpControl::new()).await.unwrap();
    });
}

#[test]
fn open_sweeps_temporary_files_and_rejects_bad_metadata() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("pool");
    let rt = rt();
    rt.block_on(open(&root));
    fs::write(root.join("volumes/.x.raw.qx-tmp.1.2"), b"half").unwrap();
    rt.block_on(open(&root));
    assert_eq!(entries(&root.join("volumes")), Vec::<String>::new());

    fs::write(root.join("pool.json"), b"{not json").unwrap();
    let err = rt
        .block_on(DirPool::open("default", &root, Engine::new(EngineConfig::default()).unwrap(), QemuImg::new()))
        .unwrap_err();
    assert!(matches!(err, PoolError::MetadataParse { .. }), "{err}");
    assert_eq!(err.to_string(), format!("pool default: parse metadata {}", root.join("pool.json").display()));

    let err = rt
        .block_on(DirPool::open("a/b", &root, Engine::new(EngineConfig::default()).unwrap(), QemuImg::new()))
        .unwrap_err();
    assert!(err.to_string().contains(r#"pool: "a/b" contains '/'"#), "{err}");
}

#[test]
fn first_copy_measures_the_copy_plan_which_is_cached_and_reported() {
    require_tool("qemu-img");
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("pool");
    let disk = work.path().join("disk.raw");
    sparse_file(&disk, 8 * MIB, &[(0, 2 * MIB)], 31);
    let rt = rt();
    rt.block_on(async {
        let pool = open(&root).await;
        assert_eq!(pool.copy_plan(), None, "nothing measured before the first copy");
        pool.import_image(import("base", ImageKind::CloudImage, &disk), &OpControl::new()).await.unwrap();
        let plan = pool.copy_plan().expect("measured by the import");
        assert!(plan.reason.starts_with("measured on "), "{}", plan.reason);
        let cached: qx_storage::Calibration =
            serde_json::from_slice(&fs::read(root.join("copy-calibration.json")).unwrap()).unwrap();
        assert_eq!(cached.plan, plan);
        // Nothing of the measurement is left in the pool.
        assert_eq!(entries(&root.join("volumes")), Vec::<String>::new());
        drop(pool);

        // Reopened: the cached plan, not a new measurement.
        let before = fs::metadata(root.join("copy-calibration.json")).unwrap().modified().unwrap();
        let pool = open(&root).await;
        assert_eq!(pool.copy_plan(), Some(plan.clone()));
        pool.create_volume(from_image("v", "base", FromImage::Copy, None), &OpControl::new()).await.unwrap();
        assert_eq!(fs::metadata(root.join("copy-calibration.json")).unwrap().modified().unwrap(), before);
        drop(pool);

        // A cache from another setup (here: another kernel) is measured again at the next copy.
        let mut stale = cached.clone();
        stale.key.kernel = "0.0.0-other".into();
        fs::write(root.join("copy-calibration.json"), serde_json::to_vec(&stale).unwrap()).unwrap();
        let pool = open(&root).await;
        assert_eq!(pool.copy_plan(), None);
        drop(pool);

        // A copy method fixed in the config is used as is, and says so.
        let config = EngineConfig { copy_method: qx_storage::CopyMethod::Uring, ..EngineConfig::default() };
        let pool = DirPool::open("default", &root, Engine::new(config).unwrap(), QemuImg::new()).await.unwrap();
        let plan = pool.copy_plan().unwrap();
        assert_eq!(plan.reason, "configured: copy_method uring");
        assert_eq!(plan.summary(), "reflink, else io_uring O_DIRECT 4x1 MiB");
        pool.clone_volume("v", "w", &NotInUse, &OpControl::new()).await.unwrap();
        let volumes = root.join("volumes");
        assert_eq!(sha256_file(&volumes.join("w.raw")), sha256_file(&disk));
    });
}

#[test]
fn importing_what_is_no_image_file_is_refused_by_field_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let socket = work.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let rt = rt();
    rt.block_on(async {
        let root = work.path().join("pool");
        let pool = open(&root).await;
        let cases: [(&std::path::Path, &str); 6] = [
            (work.path(), "is a directory, not an image file"),
            (std::path::Path::new("/dev/zero"), "is a device, not an image file"),
            (std::path::Path::new("/dev/null"), "is a device, not an image file"),
            (&fifo, "is a FIFO, not an image file"),
            (&socket, "is a socket, not an image file"),
            (&work.path().join("missing.raw"), "does not exist"),
        ];
        for (source, problem) in cases {
            for kind in [ImageKind::CloudImage, ImageKind::Iso] {
                let err = pool.import_image(import("bad", kind, source), &OpControl::new()).await.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{}: {err}", source.display());
                let PoolError::Invalid { problems, .. } = &err else { panic!("{err:?}") };
                assert_eq!(problems.first_field(), "source", "{err}");
                assert_eq!(problems.0[0].problem, problem, "{err}");
            }
        }
        assert!(pool.list_images().await.unwrap().is_empty());
        assert_eq!(fs::read_dir(root.join("images")).unwrap().count(), 0, "nothing in the library directory");
    });
}
