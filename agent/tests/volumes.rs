//! Pool volumes end to end: qx-node creates a volume in its default pool, a VM boots with it as a disk, and a
//! volume in use can neither be deleted nor started in a second VM.

mod common;

use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::test_guest;
use tonic::Code;

async fn create_with_volume(client: &mut Client, name: &str, volume: &str) {
    let extra = format!("disks:\n  - volume: {volume}\n");
    let spec_text = test_guest().spec_yaml(name, &extra);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
}

async fn start_error(client: &mut Client, name: &str) -> tonic::Status {
    client.start_vm(pb::VmRef { name: name.into() }).await.expect_err("start must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_use_pool_volumes_and_volumes_in_use_are_protected() {
    let daemon = daemon();
    let mut client = client(&daemon).await;

    let request = |name: &str| pb::CreateVolumeRequest {
        pool: String::new(),
        name: name.into(),
        size_bytes: 32 << 20,
        format: pb::DiskFormat::Qcow2 as i32,
    };
    let volume = client.create_volume(request("data1")).await.unwrap().into_inner();
    assert_eq!((volume.pool.as_str(), volume.capacity_bytes), ("default", 32 << 20));
    let status = client.create_volume(request("bad/name")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(client.create_volume(request("data1")).await.unwrap_err().code(), Code::AlreadyExists);
    let status = client.create_volume(pb::CreateVolumeRequest { pool: "nfs1".into(), ..request("x") }).await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound);

    create_with_volume(&mut client, "vol1", "default/data1").await;
    start(&mut client, "vol1").await;
    let mut console = boot(&mut client, "vol1").await;
    let command = b"cat /sys/block/vda/size\n".to_vec();
    console.input.send(pb::ConsoleInput { data: command, ..Default::default() }).await.unwrap();
    console.expect("\r\n65536\r\n", Duration::from_secs(30)).await;

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

    let delete = |name: &str| pb::VolumeRef { pool: "default".into(), name: name.into() };
    let status = client.delete_volume(delete("data1")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "in use by vol1: {status:?}");

    let request = pb::StopVmRequest { name: "vol1".into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request).await.unwrap();
    client.delete_volume(delete("data1")).await.unwrap();
    let listed = client.list_volumes(pb::ListVolumesRequest { pool: String::new() }).await.unwrap().into_inner();
    assert!(listed.volumes.is_empty());
}
