//! VM snapshots against real QEMU and qemu-img: the test guest with a qcow2 data disk it writes to, snapshots with
//! and without memory, reverts, and a delete in the middle of the chain; what qx-node records agrees with
//! `qemu-img snapshot -l`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::snapshot_service_client::SnapshotServiceClient;
use tonic::Code;

type Snapshots = SnapshotServiceClient<tonic::transport::Channel>;

fn image(dir: &Path, name: &str, format: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&path)
        .arg("16M")
        .status()
        .expect("qemu-img (scripts/install-deps.sh)");
    assert!(status.success(), "qemu-img create: {status}");
    path
}

/// The snapshot tags qemu-img finds in `file` (`-U`: the VM may be running).
fn qemu_img_tags(file: &Path) -> Vec<String> {
    let output = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(file)
        .output()
        .expect("qemu-img info");
    assert!(output.status.success(), "qemu-img info: {}", String::from_utf8_lossy(&output.stderr));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut tags: Vec<String> = info["snapshots"]
        .as_array()
        .map(|list| list.iter().map(|s| s["name"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default();
    tags.sort();
    tags
}

async fn create(
    snapshots: &mut Snapshots,
    name: &str,
    kind: pb::SnapshotKind,
) -> Result<pb::VmSnapshot, tonic::Status> {
    let request = pb::CreateSnapshotRequest { vm: "snap".into(), name: name.into(), kind: kind as i32 };
    snapshots.create_snapshot(request).await.map(|r| r.into_inner())
}

async fn revert(snapshots: &mut Snapshots, name: &str) -> Result<pb::Vm, tonic::Status> {
    snapshots.revert_snapshot(pb::SnapshotRef { vm: "snap".into(), name: name.into() }).await.map(|r| r.into_inner())
}

async fn list(snapshots: &mut Snapshots) -> pb::ListSnapshotsResponse {
    snapshots.list_snapshots(pb::ListSnapshotsRequest { vm: "snap".into() }).await.expect("ListSnapshots").into_inner()
}

/// `(name, kind, parent)` of each snapshot, and the current one.
fn shape(list: &pb::ListSnapshotsResponse) -> (Vec<(String, i32, String)>, String) {
    let rows = list.snapshots.iter().map(|s| (s.name.clone(), s.kind, s.parent.clone())).collect();
    (rows, list.current.clone())
}

async fn stop(client: &mut Client) {
    client.stop_vm(pb::StopVmRequest { name: "snap".into(), force: true, timeout_seconds: 0 }).await.expect("StopVm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_disk_snapshots_revert_and_a_middle_delete_keeps_later_data() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let channel = qx_agent::client::channel(daemon.socket()).await.expect("connect to qx-node");
    let mut snapshots = SnapshotServiceClient::new(channel);
    let dir = tempfile::tempdir().unwrap();
    let data = image(dir.path(), "data.qcow2", "qcow2");
    let extra = format!("nics:\n  - kind: user\ndisks:\n  - path: {}\n    format: qcow2\n", data.display());
    let spec_text = qx_test_infra::test_guest().spec_yaml("snap", &extra);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");

    // Refusals before anything runs: a memory snapshot needs a running VM, names are checked.
    let err = create(&mut snapshots, "m0", pb::SnapshotKind::Memory).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = create(&mut snapshots, "bad name", pb::SnapshotKind::DiskOnly).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("snapshot"), "{}", err.message());

    start(&mut client, "snap").await;
    let mut console = boot(&mut client, "snap").await;
    console.command("echo one > /dev/vda; sync; X=one").await;

    // A memory snapshot of the running guest; then the guest changes its disk and its shell.
    let m1 = create(&mut snapshots, "m1", pb::SnapshotKind::Memory).await.expect("memory snapshot");
    assert_eq!(
        (m1.kind, m1.parent.as_str(), m1.state),
        (pb::SnapshotKind::Memory as i32, "", pb::SnapshotState::Ready as i32)
    );
    console.command("echo two > /dev/vda; sync; X=two").await;
    assert_eq!(console.command("echo $X; head -c 3 /dev/vda").await, "two\ntwo");

    // Reverted: the guest is back at the snapshot, memory (the shell variable) and disk.
    let vm = revert(&mut snapshots, "m1").await.expect("revert to m1");
    assert_eq!(state(&vm), pb::VmState::Running);
    assert_eq!(console.command("echo $X; head -c 3 /dev/vda").await, "one\none");

    // A disk-only snapshot of the running guest (no guest agent here: not quiesced), on top of m1.
    console.command("echo two > /dev/vda; sync").await;
    let d2 = create(&mut snapshots, "d2", pb::SnapshotKind::DiskOnly).await.expect("disk-only snapshot");
    assert_eq!((d2.parent.as_str(), d2.quiesced), ("m1", false));
    let err = create(&mut snapshots, "d2", pb::SnapshotKind::DiskOnly).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = revert(&mut snapshots, "d2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a disk-only revert needs the VM stopped: {err:?}");
    console.command("echo six > /dev/vda; sync").await;
    assert_eq!(qemu_img_tags(&data), ["d2", "m1"]);

    // Stopped, reverted to d2, started: the disk holds what it held at d2.
    stop(&mut client).await;
    revert(&mut snapshots, "d2").await.expect("revert to d2");
    start(&mut client, "snap").await;
    let mut console = boot(&mut client, "snap").await;
    assert_eq!(console.command("head -c 3 /dev/vda").await, "two");
    let memory = pb::SnapshotKind::Memory as i32;
    let disk_only = pb::SnapshotKind::DiskOnly as i32;
    assert_eq!(
        shape(&list(&mut snapshots).await),
        (vec![("m1".into(), memory, String::new()), ("d2".into(), disk_only, "m1".into())], "d2".into())
    );

    // Deleting m1, in the middle of the chain, on the running VM: d2 keeps its data and becomes a root.
    snapshots.delete_snapshot(pb::SnapshotRef { vm: "snap".into(), name: "m1".into() }).await.expect("delete m1");
    assert_eq!(shape(&list(&mut snapshots).await), (vec![("d2".into(), disk_only, String::new())], "d2".into()));
    assert_eq!(qemu_img_tags(&data), ["d2"]);
    console.command("echo ten > /dev/vda; sync").await;
    stop(&mut client).await;
    // Taken while stopped (qemu-img), then back to d2 once more.
    let d3 = create(&mut snapshots, "d3", pb::SnapshotKind::DiskOnly).await.expect("snapshot of a stopped VM");
    assert_eq!(d3.parent, "d2");
    revert(&mut snapshots, "d2").await.expect("revert to d2 after m1 is gone");
    start(&mut client, "snap").await;
    let mut console = boot(&mut client, "snap").await;
    assert_eq!(console.command("head -c 3 /dev/vda").await, "two");
    assert_eq!(qemu_img_tags(&data), ["d2", "d3"]);
    let err = snapshots.delete_snapshot(pb::SnapshotRef { vm: "snap".into(), name: "m1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    stop(&mut client).await;

    // A raw disk cannot hold internal snapshots: refused naming the disk.
    let raw = image(dir.path(), "data.raw", "raw");
    let extra = format!("disks:\n  - path: {}\n    format: raw\n", raw.display());
    let spec_text = qx_test_infra::test_guest().spec_yaml("rawvm", &extra);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm rawvm");
    let request = pb::CreateSnapshotRequest { vm: "rawvm".into(), name: "s".into(), kind: disk_only };
    let err = snapshots.create_snapshot(request).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("disks[0]") && err.message().contains("raw"), "{}", err.message());
}
