//! Storage end to end through qx-node: pool volumes as VM disks (and protected while in use), the image library,
//! a VM booting from a qcow2 overlay whose base stays unchanged, clone and resize, and a cloud-init seed that the
//! guest mounts from its CD-ROM.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::test_guest;
use tonic::Code;

const BASE_MARKER: &[u8] = b"QX-BASE-DATA";
const OVERLAY_MARKER: &str = "QX-OVERLAY-WRITE";

async fn create_with(client: &mut Client, name: &str, extra: &str) {
    let spec_text = test_guest().spec_yaml(name, extra);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
}

async fn create_with_volume(client: &mut Client, name: &str, volume: &str) {
    create_with(client, name, &format!("disks:\n  - volume: {volume}\n")).await;
}

async fn start_error(client: &mut Client, name: &str) -> tonic::Status {
    client.start_vm(pb::StartVmRequest { name: name.into(), paused: false }).await.expect_err("start must be refused")
}

async fn stop(client: &mut Client, name: &str) {
    client.stop_vm(pb::StopVmRequest { name: name.into(), force: true, timeout_seconds: 0 }).await.expect("StopVm");
}

/// Waits until the guest's `/sys/block/vda/size` says `sectors` (a capacity change reaches it within moments).
async fn guest_sees(console: &mut Console, sectors: &str) {
    for _ in 0..50 {
        if console.command("cat /sys/block/vda/size").await == sectors {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the guest never saw {sectors} sectors on vda");
}

type Operation = Result<tonic::Response<tonic::Streaming<pb::VolumeOperation>>, tonic::Status>;

/// Follows a volume operation to its result or its error.
async fn outcome(operation: Operation) -> Result<pb::Volume, tonic::Status> {
    let mut stream = operation?.into_inner();
    while let Some(op) = stream.message().await? {
        if let Some(pb::volume_operation::Event::Volume(volume)) = op.event {
            return Ok(volume);
        }
    }
    panic!("the stream ended without a volume");
}

async fn finish(operation: Operation) -> pb::Volume {
    outcome(operation).await.expect("volume operation")
}

fn empty_volume(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: 32 << 20,
        format: pb::DiskFormat::Qcow2 as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_use_pool_volumes_and_volumes_in_use_are_protected() {
    let daemon = daemon();
    let mut client = client(&daemon).await;

    let volume = finish(client.create_volume(empty_volume("data1")).await).await;
    assert_eq!((volume.pool.as_str(), volume.capacity_bytes, volume.origin.as_str()), ("default", 32 << 20, "empty"));
    let status = outcome(client.create_volume(empty_volume("bad/name")).await).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("name: \"bad/name\""), "{status:?}");
    let status = outcome(client.create_volume(empty_volume("data1")).await).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let other_pool = pb::CreateVolumeRequest { pool: "nfs1".into(), ..empty_volume("x") };
    let status = outcome(client.create_volume(other_pool).await).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    create_with_volume(&mut client, "vol1", "default/data1").await;
    start(&mut client, "vol1").await;
    let mut console = boot(&mut client, "vol1").await;
    assert_eq!(console.command("cat /sys/block/vda/size").await, "65536");

    // The same volume in a second VM, and a missing volume: refused before any QEMU is spawned.
    create_with_volume(&mut client, "vol2", "default/data1").await;
    let status = start_error(&mut client, "vol2").await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("disks[0].volume") && status.message().contains("vol1"), "{status:?}");
    create_with_volume(&mut client, "vol3", "default/nope").await;
    let status = start_error(&mut client, "vol3").await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("disks[0].volume: \"default/nope\" does not exist"), "{}", status.message());
    assert_eq!(daemon.qemu_pids().len(), 1, "only vol1's QEMU runs");

    // Deleting a volume a running VM uses is refused.
    let data1 = || pb::VolumeRef { pool: "default".into(), name: "data1".into() };
    let status = client.delete_volume(data1()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "in use by vol1: {status:?}");

    // Resizing it grows the running VM's disk online (`block_resize`): the guest sees the new size without a
    // reboot, and the pool records it. Shrinking a disk in use is refused, naming the field and value.
    let resize =
        |mib: u64| pb::ResizeVolumeRequest { pool: String::new(), name: "data1".into(), size_bytes: mib << 20 };
    let grown = client.resize_volume(resize(64)).await.expect("ResizeVolume online").into_inner();
    assert_eq!(grown.capacity_bytes, 64 << 20, "the pool re-read the grown size");
    guest_sees(&mut console, "131072").await;
    let status = client.resize_volume(resize(32)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("size: \"33554432\" is below the disk's current size 67108864"), "{status:?}");
    let qxctl = std::process::Command::new(env!("CARGO_BIN_EXE_qxctl"))
        .arg("--socket")
        .arg(daemon.socket())
        .args(["volume", "resize", "data1", "--size-mib", "96"])
        .output()
        .unwrap();
    assert!(qxctl.status.success(), "qxctl: {}", String::from_utf8_lossy(&qxctl.stderr));
    guest_sees(&mut console, "196608").await;
    assert_eq!(daemon.qemu_pids().len(), 1, "the same QEMU: no reboot, no restart");

    // A stopped VM's volume resizes offline, as before; shrinking stays refused.
    stop(&mut client, "vol1").await;
    let grown = client.resize_volume(resize(128)).await.expect("ResizeVolume").into_inner();
    assert_eq!(grown.capacity_bytes, 128 << 20);
    assert_eq!(client.resize_volume(resize(32)).await.unwrap_err().code(), Code::FailedPrecondition, "no shrinking");
    client.delete_volume(data1()).await.unwrap();
    let listed = client.list_volumes(pb::ListVolumesRequest { pool: String::new() }).await.unwrap().into_inner();
    assert!(listed.volumes.is_empty());
    let pools = client.list_pools(pb::ListPoolsRequest {}).await.unwrap().into_inner().pools;
    assert_eq!(pools.len(), 1);
    assert!(pools[0].name == "default" && pools[0].capacity_bytes > 0 && pools[0].available_bytes > 0, "{pools:?}");
}

/// A 64 MiB raw disk: a marker in the first sector, a few MiB of data in the middle, holes elsewhere.
fn write_base_image(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(BASE_MARKER).unwrap();
    file.seek(SeekFrom::Start(16 << 20)).unwrap();
    file.write_all(&vec![0xa5; 4 << 20]).unwrap();
    file.set_len(64 << 20).unwrap();
}

fn library_file(daemon: &qx_test_infra::Daemon, file: &str) -> PathBuf {
    daemon.data_dir().join("pools/default/images").join(file)
}

/// The names in `dir` (temporary files included), sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn volume_file(daemon: &qx_test_infra::Daemon, file: &str) -> PathBuf {
    daemon.data_dir().join("pools/default/volumes").join(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_boots_from_an_overlay_and_its_base_image_stays_unchanged() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let scratch = tempfile::tempdir().unwrap();
    let source = scratch.path().join("base.raw");
    write_base_image(&source);
    let original = std::fs::read(&source).unwrap();

    // Import with a wrong checksum is refused and leaves nothing; then the real import.
    let import = |sha256: &str| pb::ImportImageRequest {
        name: "base".into(),
        kind: pb::ImageKind::Template as i32,
        source_path: source.display().to_string(),
        sha256: sha256.into(),
        ..Default::default()
    };
    let mut stream = client.import_image(import(&"0".repeat(64))).await.unwrap().into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("an import with a wrong checksum must fail"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("sha256") || status.message().contains("SHA-256"), "{status:?}");
    assert!(client.list_images(pb::ListImagesRequest::default()).await.unwrap().into_inner().images.is_empty());
    assert_eq!(files_in(&library_file(&daemon, "")), Vec::<String>::new(), "the refused import left files");

    let mut stream = client.import_image(import("")).await.unwrap().into_inner();
    let image = loop {
        match stream.message().await.expect("import").and_then(|op| op.event) {
            Some(pb::image_operation::Event::Image(image)) => break image,
            Some(pb::image_operation::Event::Progress(p)) => assert!(p.done_bytes <= p.total_bytes, "{p:?}"),
            None => panic!("the import ended without an image"),
        }
    };
    assert_eq!((image.name.as_str(), image.virtual_size_bytes), ("base", 64 << 20));
    assert_eq!(image.format, pb::DiskFormat::Raw as i32);

    let overlay = pb::CreateVolumeRequest {
        name: "root".into(),
        image: "base".into(),
        from_image: pb::FromImage::Overlay as i32,
        size_bytes: 128 << 20,
        ..Default::default()
    };
    let root = finish(client.create_volume(overlay).await).await;
    assert_eq!((root.origin.as_str(), root.backing_image.as_str()), ("overlay", "base"));
    assert_eq!((root.format, root.capacity_bytes), (pb::DiskFormat::Qcow2 as i32, 128 << 20));

    create_with_volume(&mut client, "ovl", "default/root").await;
    start(&mut client, "ovl").await;
    let mut console = boot(&mut client, "ovl").await;
    // Reads go through to the base; the size is the overlay's; writes land in the overlay.
    assert_eq!(console.command("dd if=/dev/vda bs=12 count=1 2>/dev/null; echo").await, "QX-BASE-DATA");
    assert_eq!(console.command("cat /sys/block/vda/size").await, "262144");
    let write = format!("echo {OVERLAY_MARKER} | dd of=/dev/vda conv=fsync 2>/dev/null && echo WROTE");
    assert_eq!(console.command(&write).await, "WROTE");
    stop(&mut client, "ovl").await;

    let base_now = std::fs::read(library_file(&daemon, "base.raw")).unwrap();
    assert!(base_now == original, "the base image changed");
    let overlay_bytes = std::fs::read(volume_file(&daemon, "root.qcow2")).unwrap();
    assert!(overlay_bytes.windows(OVERLAY_MARKER.len()).any(|w| w == OVERLAY_MARKER.as_bytes()), "not in the overlay");

    // The base cannot go while an overlay reads through to it; a full copy can be made and stands alone.
    let status = client.delete_image(pb::ImageRef { pool: String::new(), name: "base".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let copy = pb::CreateVolumeRequest {
        name: "copy".into(),
        image: "base".into(),
        from_image: pb::FromImage::Copy as i32,
        ..Default::default()
    };
    let copy = finish(client.create_volume(copy).await).await;
    assert_eq!((copy.origin.as_str(), copy.backing_image.as_str(), copy.capacity_bytes), ("copy", "", 64 << 20));
    let clone = pb::CloneVolumeRequest { pool: String::new(), name: "root".into(), new_name: "root2".into() };
    let clone = finish(client.clone_volume(clone).await).await;
    assert_eq!((clone.origin.as_str(), clone.origin_name.as_str(), clone.capacity_bytes), ("clone", "root", 128 << 20));

    // A clone boots with the overlay's writes.
    create_with_volume(&mut client, "cl", "default/root2").await;
    start(&mut client, "cl").await;
    let mut console = boot(&mut client, "cl").await;
    assert_eq!(console.command("dd if=/dev/vda bs=16 count=1 2>/dev/null; echo").await, OVERLAY_MARKER);
    stop(&mut client, "cl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_mounts_its_cloud_init_seed() {
    let daemon = daemon();
    let mut client = client(&daemon).await;

    let bad = "cloud_init:\n  user_data:\n    hostname: -bad-\n    users:\n      - name: Root!\n";
    let status = client
        .create_vm(pb::CreateVmRequest { spec: None, spec_text: test_guest().spec_yaml("bad", bad) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for field in ["cloud_init.user_data.hostname: \"-bad-\"", "cloud_init.user_data.users[0].name: \"Root!\""] {
        assert!(status.message().contains(field), "{field} in {}", status.message());
    }

    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@example";
    let extra = format!(
        "cloud_init:\n  user_data:\n    hostname: web-1\n    users:\n      - name: ops\n        \
         ssh_authorized_keys: [\"{key}\"]\n  network_config:\n    ethernets:\n      - id: eth0\n        \
         addressing: {{kind: static, addresses: [192.0.2.10/24], gateway4: 192.0.2.1}}\n"
    );
    create_with(&mut client, "ci", &extra).await;
    let vm = start(&mut client, "ci").await;
    let uuid = vm.spec.unwrap().uuid;
    let mut console = boot(&mut client, "ci").await;
    console.expect("QX-GUEST-MOUNT /dev/sr0 vfat meta-data network-config user-data", Duration::from_secs(1)).await;
    // The guest finds the seed by its label, as cloud-init does (the test guest mounts any CD-ROM).
    assert_eq!(console.command("findfs LABEL=cidata").await, "/dev/sr0");
    let instance_id = console.command("grep '\"instance-id\"' /mnt/sr0/meta-data").await;
    assert_eq!(instance_id.trim().trim_end_matches(','), format!("\"instance-id\": \"{uuid}\""));
    assert_eq!(console.command("grep -c ops@example /mnt/sr0/user-data").await, "1");
    // Read-only for the guest: the block device itself (the test guest mounts every seed with `mount -r`, so a
    // failing write to the mount would prove nothing), and a read-write remount is refused.
    assert_eq!(console.command("cat /sys/block/sr0/ro").await, "1");
    let remount = console.command("mount -o remount,rw /mnt/sr0 2>/dev/null; echo rc=$?").await;
    assert_ne!(remount, "rc=0", "the seed was remounted read-write");
    stop(&mut client, "ci").await;
}

/// A client that drops an import's stream midway cancels the real import: no image, no temporary file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_import_stream_cancels_the_import_and_leaves_nothing() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let scratch = tempfile::tempdir().unwrap();
    let source = scratch.path().join("big.iso");
    // 1 GiB of data (no holes, which a copy would skip): 64 chunks of copying that each check for a cancel, so
    // the drop below comes while the copy runs. (Kept at 1 GiB: the test machine's disk is shared.)
    {
        let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&source).unwrap());
        let chunk = vec![0x5a_u8; 8 << 20];
        for _ in 0..128 {
            file.write_all(&chunk).unwrap();
        }
        file.into_inner().unwrap().sync_all().unwrap();
    }
    let import = pb::ImportImageRequest {
        name: "big".into(),
        kind: pb::ImageKind::Iso as i32,
        source_path: source.display().to_string(),
        ..Default::default()
    };
    let mut stream = client.import_image(import).await.unwrap().into_inner();
    let progress = loop {
        match stream.message().await.expect("import").and_then(|op| op.event) {
            Some(pb::image_operation::Event::Progress(p)) if p.done_bytes > 0 => break p,
            Some(pb::image_operation::Event::Progress(_)) => continue,
            Some(pb::image_operation::Event::Image(image)) => {
                panic!("the import ended before it could be dropped: {image:?}")
            }
            None => panic!("the import stream ended"),
        }
    };
    assert!(progress.done_bytes < progress.total_bytes, "{progress:?}");
    drop(stream);

    // The daemon notices, the copy stops at its next chunk and removes its temporary file.
    let images = library_file(&daemon, "");
    let clean = qx_test_infra::wait_until(Duration::from_secs(30), || {
        (files_in(&images).is_empty() && daemon.log_text().contains("client went away; cancelling")).then_some(())
    });
    assert!(clean.is_some(), "left behind in {}: {:?}", images.display(), files_in(&images));
    assert!(client.list_images(pb::ListImagesRequest::default()).await.unwrap().into_inner().images.is_empty());
    // The name is free again: the cancelled import released it (a small file will do).
    drop(scratch);
    let small = tempfile::tempdir().unwrap();
    let small_source = small.path().join("small.iso");
    std::fs::write(&small_source, vec![0x5a_u8; 1 << 20]).unwrap();
    let again = pb::ImportImageRequest {
        name: "big".into(),
        kind: pb::ImageKind::Iso as i32,
        source_path: small_source.display().to_string(),
        ..Default::default()
    };
    // The cancelled import holds the name until its task has finished (just after its file is gone): a new import
    // of the name is refused as busy until then, and no longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let busy =
        |status: &tonic::Status| status.code() == tonic::Code::FailedPrecondition && status.message().contains("busy");
    let image = 'retry: loop {
        let mut stream = match client.import_image(again.clone()).await {
            Ok(response) => response.into_inner(),
            Err(status) if busy(&status) => {
                assert!(std::time::Instant::now() < deadline, "the name stays busy: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'retry;
            }
            Err(status) => panic!("import: {status:?}"),
        };
        loop {
            match stream.message().await {
                Ok(Some(pb::ImageOperation { event: Some(pb::image_operation::Event::Image(image)), .. })) => {
                    break 'retry image
                }
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the import ended without an image"),
                Err(status) if busy(&status) => {
                    assert!(std::time::Instant::now() < deadline, "the name stays busy: {status:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'retry;
                }
                Err(status) => panic!("import: {status:?}"),
            }
        }
    };
    assert_eq!(image.file_size_bytes, 1 << 20);
}
