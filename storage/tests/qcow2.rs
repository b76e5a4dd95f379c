//! qcow2 overlays with the real qemu-img, written through with the real qemu-io.

mod common;

use std::fs;
use std::process::Command;

use common::*;
use qx_storage::{ImageFormat, Qcow2Error, QemuImg};

const MIB: u64 = 1 << 20;

#[test]
fn overlay_reads_through_and_leaves_the_base_unchanged() {
    let qemu_io = require_tool("qemu-io");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_file(&base, 32 * MIB, &[(0, 4 * MIB), (16 * MIB, 20 * MIB)], 11);
    let base_sha = sha256_file(&base);
    let overlay = dir.path().join("vm.qcow2");
    let q = QemuImg::new();
    let rt = rt();

    rt.block_on(q.create_overlay(&overlay, &base, ImageFormat::Raw, None)).unwrap();
    let info = rt.block_on(q.info(&overlay, Some(ImageFormat::Qcow2))).unwrap();
    assert_eq!(info.image_format(), Some(ImageFormat::Qcow2));
    assert_eq!(info.virtual_size, 32 * MIB);
    assert_eq!(info.full_backing_filename.as_deref(), Some(base.as_path()));
    assert_eq!(info.backing_format.as_deref(), Some("raw"));
    assert!(fs::metadata(&overlay).unwrap().len() < MIB, "overlay is thin");

    // Before any write the overlay reads exactly the base's bytes (compared through qemu-img itself).
    run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&overlay).arg(&base));

    // Write a pattern through the overlay, over data and over a hole of the base.
    for offset in ["0", "8M"] {
        run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", &format!("write -P 0xab {offset} 1M")]).arg(&overlay));
    }
    let out = run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", "read -P 0xab 8M 1M"]).arg(&overlay));
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    // Unwritten ranges still come from the base.
    let out = run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", "read -P 0 24M 1M"]).arg(&overlay));
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    assert_eq!(sha256_file(&base), base_sha, "the base image was modified");

    let chain = rt.block_on(q.backing_chain(&overlay, Some(ImageFormat::Qcow2))).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[0].filename, overlay);
    assert_eq!(chain[1].filename, base);
    assert_eq!(chain[1].image_format(), Some(ImageFormat::Raw));

    rt.block_on(q.resize(&overlay, ImageFormat::Qcow2, 64 * MIB, false)).unwrap();
    assert_eq!(rt.block_on(q.info(&overlay, None)).unwrap().virtual_size, 64 * MIB);
    let err = rt.block_on(q.resize(&overlay, ImageFormat::Qcow2, 16 * MIB, false)).unwrap_err();
    assert!(matches!(err, Qcow2Error::Failed { .. }), "{err:?}");
    assert!(err.to_string().contains("--shrink"), "qemu-img's reason is in the message: {err}");
    assert_eq!(sha256_file(&base), base_sha);
}

#[test]
fn overlay_on_qcow2_base_with_larger_size() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let q = QemuImg::new();
    let rt = rt();
    rt.block_on(q.create(&base, 10 * MIB)).unwrap();
    let overlay = dir.path().join("top.qcow2");
    rt.block_on(q.create_overlay(&overlay, &base, ImageFormat::Qcow2, Some(20 * MIB))).unwrap();
    let chain = rt.block_on(q.backing_chain(&overlay, None)).unwrap();
    assert_eq!(chain.iter().map(|i| i.virtual_size).collect::<Vec<_>>(), [20 * MIB, 10 * MIB]);
}

#[test]
fn info_on_missing_file_reports_qemu_img_stderr() {
    require_tool("qemu-img");
    let err = rt().block_on(QemuImg::new().info(std::path::Path::new("/nonexistent/x.qcow2"), None)).unwrap_err();
    let Qcow2Error::Failed { command, stderr, .. } = &err else { panic!("{err:?}") };
    assert!(command.contains("info --output=json -U /nonexistent/x.qcow2"), "{command}");
    assert!(stderr.contains("No such file"), "{stderr}");
}
