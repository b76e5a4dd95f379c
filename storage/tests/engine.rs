//! The image engine against real files on the host's filesystem.

mod common;

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use qx_storage::{
    CopyOptions, Digest, Engine, EngineConfig, EngineError, ImportOptions, OpControl, Preallocation, ResizeOptions,
};

const MIB: u64 = 1 << 20;

fn engine() -> Engine {
    Engine::new(EngineConfig::default()).unwrap()
}

/// 16 MiB and a bit: 1 MiB data, 1 MiB hole, ... with a short data tail, and a 512 KiB range of written (allocated)
/// zeros.
fn sparse_source(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("src.raw");
    let data: Vec<(u64, u64)> = (0..8).map(|i| (i * 2 * MIB, i * 2 * MIB + MIB)).collect();
    sparse_file(&src, 16 * MIB + 4097, &data, 7);
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize / 2], 15 * MIB).unwrap();
    f.write_all_at(b"tail", 16 * MIB + 4093).unwrap();
    f.sync_all().unwrap();
    src
}

#[test]
fn sparse_copy_keeps_holes_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_source(dir.path());
    let rt = rt();
    for (i, direct) in [true, false].into_iter().enumerate() {
        let cfg = EngineConfig { direct, ..EngineConfig::default() };
        let engine = Engine::new(cfg).unwrap();
        let dst = dir.path().join(format!("dst{i}.raw"));
        let ctl = OpControl::new();
        let report =
            rt.block_on(engine.copy(&src, &dst, CopyOptions { sha256: true, ..Default::default() }, &ctl)).unwrap();

        assert_eq!(fs::metadata(&dst).unwrap().len(), fs::metadata(&src).unwrap().len());
        assert_eq!(sha256_file(&dst), sha256_file(&src), "direct={direct}");
        assert_eq!(report.sha256.unwrap().0, sha256_file(&src));
        // 8 MiB of data plus the tail block; the allocated zeros at 15 MiB are not written.
        let (a_src, a_dst) = (allocated(&src), allocated(&dst));
        assert!(a_src >= 8 * MIB + MIB / 2, "source allocates {a_src}");
        assert!(a_dst <= 8 * MIB + 64 * 1024, "direct={direct}: copy allocates {a_dst}, source {a_src}");
        assert!(a_dst >= 8 * MIB, "copy allocates {a_dst}");
        assert_eq!(report.written_bytes, 8 * MIB + 4097, "{report:?}");
        assert_eq!(ctl.progress().done, report.size);
        assert_eq!(ctl.progress().total, report.size);
        assert_eq!(entries(dir.path()).len(), 2 + i, "no temporary files left: {:?}", entries(dir.path()));
    }
}

#[test]
fn sha256_streams_with_progress() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_source(dir.path());
    let cfg = EngineConfig { block_size: 64 << 10, queue_depth: 2, ..EngineConfig::default() };
    let engine = Engine::new(cfg).unwrap();
    let ctl = OpControl::new();
    let mut rx = ctl.subscribe();
    let rt = rt();
    let seen = rt.block_on(async {
        let watcher = tokio::spawn(async move {
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                seen.push(*rx.borrow());
            }
            seen
        });
        let digest = engine.sha256(&src, &ctl).await.unwrap();
        assert_eq!(digest.0, sha256_file(&src));
        drop(ctl);
        watcher.await.unwrap()
    });
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "{seen:?}");
    assert_eq!(seen.last().unwrap().done, seen.last().unwrap().total);
}

#[test]
fn cancelled_copy_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    sparse_file(&src, 64 * MIB, &[(0, 64 * MIB)], 3);
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("copy.raw");
    // Small blocks, one in flight: the copy takes long enough to be caught in the middle.
    let engine = Engine::new(EngineConfig { queue_depth: 1, block_size: 64 << 10, ..Default::default() }).unwrap();
    let ctl = OpControl::new();
    let mut rx = ctl.subscribe();
    let rt = rt();
    let err = rt
        .block_on(async {
            let canceller = ctl.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    if rx.borrow().done > 0 {
                        canceller.cancel();
                        break;
                    }
                }
            });
            engine.copy(&src, &dst, CopyOptions::default(), &ctl).await
        })
        .unwrap_err();
    assert!(err.is_cancelled(), "{err:?}");
    assert!(err.to_string().contains("copy of"), "{err}");
    assert!(ctl.progress().done < ctl.progress().total, "cancelled before the end: {:?}", ctl.progress());
    assert_eq!(entries(out.path()), Vec::<String>::new());
}

#[test]
fn dropping_the_future_cancels_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    sparse_file(&src, 64 * MIB, &[(0, 64 * MIB)], 4);
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("copy.raw");
    let engine = Engine::new(EngineConfig { queue_depth: 1, block_size: 64 << 10, ..Default::default() }).unwrap();
    let ctl = OpControl::new();
    let rt = rt();
    let timed_out = rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(20), engine.copy(&src, &dst, CopyOptions::default(), &ctl)).await
    });
    assert!(timed_out.is_err(), "the copy finished within 20 ms; make the source larger");
    // The engine thread notices at its next block and removes the temporary file.
    let clean = qx_test_infra::wait_until(Duration::from_secs(10), || entries(out.path()).is_empty().then_some(()));
    assert!(clean.is_some(), "left behind: {:?}", entries(out.path()));
    // The engine is still usable afterwards.
    rt.block_on(engine.copy(&src, &dst, CopyOptions::default(), &OpControl::new())).unwrap();
    assert_eq!(sha256_file(&dst), sha256_file(&src));
}

#[test]
fn out_of_space_is_a_clear_error_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, 16 * MIB, &[(0, 16 * MIB)], 5);
    let small = Tmpfs::mount(4 * MIB).expect("mount tmpfs");
    let dst = small.path().join("copy.raw");
    let err = rt().block_on(engine().copy(&src, &dst, CopyOptions::default(), &OpControl::new())).unwrap_err();
    assert!(matches!(err, EngineError::Write { .. }), "{err:?}");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::StorageFull), "{err:?}");
    let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(msg.contains(&small.path().display().to_string()) && msg.contains("No space left on device"), "{msg}");
    assert_eq!(entries(small.path()), Vec::<String>::new());
}

#[test]
fn bad_paths_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, MIB, &[(0, MIB)], 6);
    let engine = engine();
    let rt = rt();

    let missing = dir.path().join("missing.raw");
    let err = rt
        .block_on(engine.copy(&missing, dir.path().join("x"), CopyOptions::default(), &OpControl::new()))
        .unwrap_err();
    assert!(matches!(err, EngineError::Open { .. }), "{err:?}");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
    assert_eq!(err.to_string(), format!("open {}", missing.display()));

    let err = rt
        .block_on(engine.copy(&src, dir.path().join("no/such/dir/x"), CopyOptions::default(), &OpControl::new()))
        .unwrap_err();
    assert!(matches!(err, EngineError::Create { .. }), "{err:?}");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));

    let err = rt
        .block_on(engine.copy(dir.path(), dir.path().join("y"), CopyOptions::default(), &OpControl::new()))
        .unwrap_err();
    assert!(matches!(err, EngineError::NotRegular { kind: "directory", .. }), "{err:?}");

    let err = rt.block_on(engine.copy(&src, &src, CopyOptions::default(), &OpControl::new())).unwrap_err();
    assert!(matches!(err, EngineError::Exists { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("{} already exists", src.display()));
}

#[test]
fn permission_denied_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, MIB, &[(0, MIB)], 8);
    let locked = tempfile::tempdir().unwrap();
    let guard = Immutable::set(locked.path());
    let err = rt()
        .block_on(engine().copy(&src, locked.path().join("copy.raw"), CopyOptions::default(), &OpControl::new()))
        .unwrap_err();
    drop(guard);
    assert!(matches!(err, EngineError::Create { .. }), "{err:?}");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::PermissionDenied), "{err:?}");
    assert!(err.to_string().starts_with(&format!("create {}/.copy.raw.qx-tmp.", locked.path().display())), "{err}");
}

#[test]
fn import_verifies_size_and_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_source(dir.path());
    let size = fs::metadata(&src).unwrap().len();
    let good = Digest(sha256_file(&src));
    let lib = tempfile::tempdir().unwrap();
    let engine = engine();
    let rt = rt();

    let wrong_size = ImportOptions { size: Some(size + 1), sha256: None };
    let err = rt.block_on(engine.import(&src, lib.path().join("a.raw"), wrong_size, &OpControl::new())).unwrap_err();
    assert_eq!(err.to_string(), format!("{} is {size} bytes, expected {}", src.display(), size + 1));

    let bad: Digest = "00".repeat(32).parse().unwrap();
    let err = rt
        .block_on(engine.import(
            &src,
            lib.path().join("a.raw"),
            ImportOptions { size: Some(size), sha256: Some(bad) },
            &OpControl::new(),
        ))
        .unwrap_err();
    assert!(matches!(err, EngineError::ChecksumMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&good.to_string()), "{err}");
    assert_eq!(entries(lib.path()), Vec::<String>::new());

    let report = rt
        .block_on(engine.import(
            &src,
            lib.path().join("a.raw"),
            ImportOptions { size: Some(size), sha256: Some(good) },
            &OpControl::new(),
        ))
        .unwrap();
    assert_eq!(report.sha256, Some(good));
    assert_eq!(sha256_file(&lib.path().join("a.raw")), good.0);
}

#[test]
fn create_zero_and_resize_raw_images() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let rt = rt();
    let ctl = OpControl::new();

    let sparse = dir.path().join("sparse.raw");
    rt.block_on(engine.create_raw(&sparse, 64 * MIB, Preallocation::Off, &ctl)).unwrap();
    assert_eq!(fs::metadata(&sparse).unwrap().len(), 64 * MIB);
    assert_eq!(allocated(&sparse), 0);

    let full = dir.path().join("full.raw");
    rt.block_on(engine.create_raw(&full, 16 * MIB, Preallocation::Full, &ctl)).unwrap();
    assert!(allocated(&full) >= 16 * MIB);

    let err = rt.block_on(engine.create_raw(&full, MIB, Preallocation::Off, &ctl)).unwrap_err();
    assert!(matches!(err, EngineError::Exists { .. }), "{err:?}");

    let data = dir.path().join("data.raw");
    sparse_file(&data, 8 * MIB, &[(0, 8 * MIB)], 9);
    let report = rt.block_on(engine.zero(&data, &ctl)).unwrap();
    assert!(report.punched);
    assert_eq!(fs::metadata(&data).unwrap().len(), 8 * MIB);
    assert_eq!(allocated(&data), 0);
    assert!(fs::read(&data).unwrap().iter().all(|&b| b == 0));

    assert_eq!(rt.block_on(engine.resize(&sparse, 128 * MIB, ResizeOptions::default())).unwrap(), 64 * MIB);
    assert_eq!(fs::metadata(&sparse).unwrap().len(), 128 * MIB);
    let err = rt.block_on(engine.resize(&sparse, MIB, ResizeOptions::default())).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("shrinking {} from {} to {} bytes needs allow_shrink", sparse.display(), 128 * MIB, MIB)
    );
    let shrink = ResizeOptions { allow_shrink: true, ..Default::default() };
    rt.block_on(engine.resize(&sparse, MIB, shrink)).unwrap();
    assert_eq!(fs::metadata(&sparse).unwrap().len(), MIB);
}

#[test]
fn zero_of_unaligned_file_reads_back_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.raw");
    sparse_file(&data, 3 * MIB + 5, &[(0, 3 * MIB + 5)], 10);
    rt().block_on(engine().zero(&data, &OpControl::new())).unwrap();
    assert_eq!(fs::metadata(&data).unwrap().len(), 3 * MIB + 5);
    assert!(fs::read(&data).unwrap().iter().all(|&b| b == 0));
}
