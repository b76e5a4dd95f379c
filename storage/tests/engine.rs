//! The image engine against real files on the host's filesystem.

mod common;

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use qx_storage::{
    CopyOptions, CopyPlan, DataMethod, Digest, Engine, EngineConfig, EngineError, ImportOptions, Mechanism, OpControl,
    Preallocation, ResizeOptions, UringTuning,
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

/// A plan that forces one data path (no reflink), and the mechanism its report must name.
fn forced(data: DataMethod, direct: bool) -> (CopyPlan, Mechanism) {
    let uring = UringTuning { direct, block_size: if direct { 1 << 20 } else { 64 << 10 }, queue_depth: 3 };
    let plan = CopyPlan { reflink: false, data, uring, reason: "test".to_owned() };
    let mechanism = match data {
        DataMethod::CopyFileRange => Mechanism::CopyFileRange,
        DataMethod::Uring => Mechanism::Uring(uring),
    };
    (plan, mechanism)
}

/// Every data path: io_uring with O_DIRECT, io_uring buffered, copy_file_range.
fn data_paths() -> Vec<(CopyPlan, Mechanism)> {
    vec![forced(DataMethod::Uring, true), forced(DataMethod::Uring, false), forced(DataMethod::CopyFileRange, false)]
}

fn with_plan(plan: &CopyPlan) -> CopyOptions {
    CopyOptions { plan: Some(plan.clone()), ..CopyOptions::default() }
}

#[test]
fn every_data_path_keeps_holes_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_source(dir.path());
    let rt = rt();
    let engine = engine();
    for (i, (plan, mechanism)) in data_paths().into_iter().enumerate() {
        let dst = dir.path().join(format!("dst{i}.raw"));
        let ctl = OpControl::new();
        let opts = CopyOptions { sha256: plan.data == DataMethod::Uring, ..with_plan(&plan) };
        let report = rt.block_on(engine.copy(&src, &dst, opts, &ctl)).unwrap();

        assert_eq!(report.mechanism, mechanism);
        assert_eq!(fs::metadata(&dst).unwrap().len(), fs::metadata(&src).unwrap().len());
        assert_eq!(sha256_file(&dst), sha256_file(&src), "{mechanism}");
        let (a_src, a_dst) = (allocated(&src), allocated(&dst));
        assert!(a_src >= 8 * MIB + MIB / 2, "source allocates {a_src}");
        assert!(a_dst >= 8 * MIB, "{mechanism}: copy allocates {a_dst}");
        if plan.data == DataMethod::Uring {
            // 8 MiB of data plus the tail block; the allocated zeros at 15 MiB are not written.
            assert_eq!(report.sha256.unwrap().0, sha256_file(&src));
            assert!(a_dst <= 8 * MIB + 64 * 1024, "{mechanism}: copy allocates {a_dst}, source {a_src}");
            assert_eq!(report.written_bytes, 8 * MIB + 4097, "{report:?}");
        } else {
            // The kernel copies the source's extents as they are, allocated zeros included; the holes stay.
            assert!(a_dst <= a_src + 64 * 1024, "{mechanism}: copy allocates {a_dst}, source {a_src}");
            assert_eq!(report.written_bytes, report.data_bytes, "{report:?}");
        }
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

/// Copies `src` into `out_dir` with a speed limit (so that the copy is certainly still running), cancels it once it
/// has reported progress, and checks that it stopped with `Cancelled` and left nothing in `out_dir`.
fn cancel_midway(engine: &Engine, plan: &CopyPlan, src: &std::path::Path, out_dir: &std::path::Path) {
    let dst = out_dir.join("copy.raw");
    let ctl = OpControl::new();
    ctl.set_speed_limit(16 * MIB);
    let mut rx = ctl.subscribe();
    let err = rt()
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
            engine.copy(src, &dst, with_plan(plan), &ctl).await
        })
        .unwrap_err();
    assert!(err.is_cancelled(), "{}: {err:?}", plan.summary());
    assert!(err.to_string().contains("copy of"), "{err}");
    assert!(ctl.progress().done < ctl.progress().total, "cancelled before the end: {:?}", ctl.progress());
    assert_eq!(entries(out_dir), Vec::<String>::new(), "{}", plan.summary());
}

#[test]
fn cancelled_copy_leaves_nothing_on_every_data_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    sparse_file(&src, 64 * MIB, &[(0, 64 * MIB)], 3);
    let out = tempfile::tempdir().unwrap();
    let engine = engine();
    for (plan, _) in data_paths() {
        cancel_midway(&engine, &plan, &src, out.path());
        // Cancelled before it starts: nothing either.
        let ctl = OpControl::new();
        ctl.cancel();
        let err = rt().block_on(engine.copy(&src, out.path().join("c.raw"), with_plan(&plan), &ctl)).unwrap_err();
        assert!(err.is_cancelled(), "{err:?}");
        assert_eq!(entries(out.path()), Vec::<String>::new());
    }
}

#[test]
fn dropping_the_future_cancels_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    sparse_file(&src, 64 * MIB, &[(0, 64 * MIB)], 4);
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("copy.raw");
    let engine = engine();
    let ctl = OpControl::new();
    // Limited to 16 MiB/s, the copy takes 4 s: it is running when the future is dropped.
    ctl.set_speed_limit(16 * MIB);
    let mut rx = ctl.subscribe();
    let rt = rt();
    let finished = rt.block_on(async {
        tokio::select! {
            r = engine.copy(&src, &dst, CopyOptions::default(), &ctl) => Some(r),
            _ = async { while rx.changed().await.is_ok() && rx.borrow().done == 0 {} } => None,
        }
    });
    assert!(finished.is_none(), "the copy ended before it reported progress: {finished:?}");
    // The engine thread notices at its next chunk and removes the temporary file.
    let clean = qx_test_infra::wait_until(Duration::from_secs(10), || entries(out.path()).is_empty().then_some(()));
    assert!(clean.is_some(), "left behind: {:?}", entries(out.path()));
    // The engine is still usable afterwards.
    rt.block_on(engine.copy(&src, &dst, CopyOptions::default(), &OpControl::new())).unwrap();
    assert_eq!(sha256_file(&dst), sha256_file(&src));
}

#[test]
fn out_of_space_is_a_clear_error_and_leaves_nothing_on_every_data_path() {
    if !is_root() {
        return qx_test_infra::skip("mounting a small tmpfs needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, 16 * MIB, &[(0, 16 * MIB)], 5);
    let small = Tmpfs::mount(4 * MIB).expect("mount tmpfs");
    let engine = engine();
    for (plan, _) in data_paths() {
        let dst = small.path().join("copy.raw");
        let err = rt().block_on(engine.copy(&src, &dst, with_plan(&plan), &OpControl::new())).unwrap_err();
        assert!(matches!(err, EngineError::Write { .. } | EngineError::CopyRange { .. }), "{err:?}");
        assert_eq!(err.io_kind(), Some(io::ErrorKind::StorageFull), "{err:?}");
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains(&small.path().display().to_string()) && msg.contains("No space left on device"), "{msg}");
        assert_eq!(entries(small.path()), Vec::<String>::new());
    }
}

#[test]
fn reflink_clones_within_a_filesystem_and_falls_back_across() {
    let xfs = match Xfs::mount() {
        Ok(x) => x,
        Err(why) => return qx_test_infra::skip(&format!("no XFS with reflink: {why}")),
    };
    let src = xfs.path().join("src.raw");
    sparse_file(&src, 64 * MIB, &[(0, 16 * MIB), (32 * MIB, 40 * MIB)], 11);
    let engine = engine();
    let rt = rt();
    let (data, _) = forced(DataMethod::CopyFileRange, false);
    let plan = CopyPlan { reflink: true, ..data };

    // Within the filesystem: shared blocks, nothing written.
    let used = fs_used(xfs.path());
    let dst = xfs.path().join("clone.raw");
    let ctl = OpControl::new();
    let report = rt.block_on(engine.copy(&src, &dst, with_plan(&plan), &ctl)).unwrap();
    assert_eq!(report.mechanism, Mechanism::Reflink);
    assert_eq!(sha256_file(&dst), sha256_file(&src));
    assert_eq!(allocated(&dst), allocated(&src), "holes kept");
    assert_eq!(report.data_bytes, 24 * MIB);
    let grew = fs_used(xfs.path()) - used;
    assert!(grew < 4 * MIB, "a clone of 24 MiB of data used {grew} bytes");
    assert_eq!(ctl.progress().done, 64 * MIB);

    // An import that checks a SHA-256 must see the bytes: io_uring, even here.
    let want = Digest(sha256_file(&src));
    let opts = ImportOptions { sha256: Some(want), plan: Some(plan.clone()), ..Default::default() };
    let report = rt.block_on(engine.import(&src, xfs.path().join("imported.raw"), opts, &OpControl::new())).unwrap();
    assert!(matches!(report.mechanism, Mechanism::Uring(_)), "{}", report.mechanism);
    assert_eq!(report.sha256, Some(want));

    // From another filesystem there is nothing to share: the data path copies.
    let outside = tempfile::tempdir().unwrap();
    let other = outside.path().join("other.raw");
    sparse_file(&other, 8 * MIB, &[(MIB, 3 * MIB)], 12);
    let report =
        rt.block_on(engine.copy(&other, xfs.path().join("across.raw"), with_plan(&plan), &OpControl::new())).unwrap();
    assert_ne!(report.mechanism, Mechanism::Reflink);
    assert_eq!(sha256_file(&xfs.path().join("across.raw")), sha256_file(&other));

    // Cancelled while cloning: nothing left.
    let out = xfs.path().join("out");
    fs::create_dir(&out).unwrap();
    cancel_midway(&engine, &plan, &src, &out);
}

#[test]
fn calibration_measures_every_candidate_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let calibration = rt().block_on(engine().calibrate(dir.path(), &OpControl::new())).unwrap();
    assert_eq!(entries(dir.path()), Vec::<String>::new());
    assert!(calibration.samples.len() >= 3, "{calibration:?}");
    assert!(calibration.samples.iter().all(|s| s.seconds > 0.0), "{calibration:?}");
    assert!(calibration.samples.iter().any(|s| s.mechanism == "copy_file_range"), "{calibration:?}");
    let plan = &calibration.plan;
    let winner = match plan.data {
        DataMethod::CopyFileRange => Mechanism::CopyFileRange.to_string(),
        DataMethod::Uring => Mechanism::Uring(plan.uring).to_string(),
    };
    // copy_file_range (cp's kernel path) unless the fastest io_uring setting is more than 1.5x faster.
    let seconds = |name: &str| calibration.samples.iter().find(|s| s.mechanism == name).unwrap().seconds;
    let best_uring = calibration
        .samples
        .iter()
        .filter(|s| s.mechanism != "copy_file_range")
        .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
        .unwrap();
    let expected =
        if best_uring.seconds * 1.5 < seconds("copy_file_range") { &best_uring.mechanism } else { "copy_file_range" };
    assert_eq!(winner, expected, "{calibration:?}");
    assert_eq!(Mechanism::Uring(plan.uring).to_string(), best_uring.mechanism, "{calibration:?}");
    assert!(
        plan.reason.starts_with(&format!("measured on {}: {winner} chosen", calibration.filesystem)),
        "{}",
        plan.reason
    );
    assert!(!calibration.reflink_supported || calibration.filesystem != "ext4");
}

/// A file of many small extents (4 KiB of data every 64 KiB) goes through io_uring even under a copy_file_range
/// plan; one of large extents keeps copy_file_range. Both copies are exact and keep the holes.
#[test]
fn many_small_extents_go_through_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.raw");
    let extents: Vec<(u64, u64)> = (0..256).map(|i| (i * 64 * 1024, i * 64 * 1024 + 4096)).collect();
    sparse_file(&small, 16 * MIB, &extents, 3);
    let large = sparse_source(dir.path());
    let (plan, _) = forced(DataMethod::CopyFileRange, true);
    let rt = rt();
    let engine = engine();
    for (src, uring) in [(&small, true), (&large, false)] {
        let dst = dir.path().join(format!("{}.copy", src.file_name().unwrap().to_string_lossy()));
        let report = rt.block_on(engine.copy(src, &dst, with_plan(&plan), &OpControl::new())).unwrap();
        assert_eq!(matches!(report.mechanism, Mechanism::Uring(_)), uring, "{}: {}", src.display(), report.mechanism);
        assert_eq!(sha256_file(&dst), sha256_file(src));
        assert!(allocated(&dst) <= allocated(src) + 64 * 1024, "{}: holes kept", src.display());
    }
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

    let wrong_size = ImportOptions { size: Some(size + 1), ..Default::default() };
    let err = rt.block_on(engine.import(&src, lib.path().join("a.raw"), wrong_size, &OpControl::new())).unwrap_err();
    assert_eq!(err.to_string(), format!("{} is {size} bytes, expected {}", src.display(), size + 1));

    let bad: Digest = "00".repeat(32).parse().unwrap();
    let err = rt
        .block_on(engine.import(
            &src,
            lib.path().join("a.raw"),
            ImportOptions { size: Some(size), sha256: Some(bad), plan: None },
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
            ImportOptions { size: Some(size), sha256: Some(good), plan: None },
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
