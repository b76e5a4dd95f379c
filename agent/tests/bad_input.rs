//! Bad input over gRPC against a real qx-node: every refusal has the right code, a message short enough for any
//! client to receive, the field problems as `google.rpc.BadRequest` details, and leaves the daemon serving and its
//! files as they were.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::test_guest;
use tonic::Code;
use tonic_types::StatusExt;

/// What any refusal must look like on the wire: within the limits every gRPC client keeps (grpc-core refuses
/// metadata past 8 KiB at random and past 16 KiB always), the message well below.
fn assert_bounded(status: &tonic::Status) {
    assert!(status.message().len() <= 1024, "a message of {} bytes: {}", status.message().len(), status.message());
    let trailers = status.message().len() * 3 + status.details().len() * 4 / 3;
    assert!(trailers < 8 * 1024, "trailers of about {trailers} bytes");
}

fn spec(name: &str) -> pb::VmSpec {
    let guest = test_guest();
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 128,
        kernel_boot: Some(pb::KernelBoot {
            kernel: guest.kernel.display().to_string(),
            initrd: guest.initrd.display().to_string(),
            cmdline: guest.cmdline.clone(),
        }),
        ..Default::default()
    }
}

fn many_disks() -> pb::VmSpec {
    let disks = (0..200).map(|i| pb::Disk { path: format!("/no/such/disk-{i}.raw"), ..Default::default() });
    pb::VmSpec { disks: disks.collect(), ..spec("many") }
}

fn huge_label() -> pb::VmSpec {
    pb::VmSpec { labels: [("big".to_owned(), "v".repeat(1 << 20))].into(), ..spec("label") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_specs_are_invalid_argument_with_a_short_message_and_every_field_in_details() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    // The daemon serves once it has made its files (certificates, the lock).
    client.list_vms(pb::ListVmsRequest {}).await.unwrap();
    let before = snapshot(&daemon.data_dir());

    let status = client.create_vm(pb::CreateVmRequest { spec: Some(many_disks()), spec_text: String::new() });
    let status = status.await.expect_err("200 disks");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);
    assert!(status.message().starts_with(r#"invalid VM spec: disks: "200" is more than 16 disks; disks[0].path"#));
    assert!(status.message().contains(" more problems"), "{}", status.message());
    let violations = status.get_details_bad_request().expect("BadRequest details").field_violations;
    assert_eq!(violations[0].field, "disks");
    assert_eq!(violations[1].field, "disks[0].path");
    assert_eq!(violations[1].description, r#""/no/such/disk-0.raw" does not exist"#);
    let last = violations.last().unwrap();
    assert!(last.field.is_empty() && last.description.ends_with(" more problems"), "{last:?}");

    for request in [
        pb::CreateVmRequest { spec: Some(huge_label()), spec_text: String::new() },
        pb::CreateVmRequest {
            spec: None,
            spec_text: format!("{}labels:\n  big: {}\n", spec_yaml("label"), "v".repeat(1 << 20)),
        },
    ] {
        let status = client.create_vm(request).await.expect_err("a 1 MiB label");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_bounded(&status);
        assert!(status.message().contains(r#"…" (1048576 bytes) is not a valid label value"#), "{}", status.message());
        let violations = status.get_details_bad_request().expect("BadRequest details").field_violations;
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].field, "labels.big");
    }

    // The daemon serves on, with nothing written.
    assert!(client.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    assert_eq!(snapshot(&daemon.data_dir()), before, "refused requests changed the data dir");
}

fn spec_yaml(name: &str) -> String {
    test_guest().spec_yaml(name, "")
}

/// grpc-core (Python here) is the client whose metadata limit turned a long message into RESOURCE_EXHAUSTED.
#[test]
fn python_grpcio_gets_invalid_argument_for_oversized_specs() {
    let Some(python) = python() else { return };
    let daemon = daemon();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let output = Command::new(python)
        .arg(repo.join("agent/tests/python/bad_request.py"))
        .arg(repo.join("proto/proto"))
        .arg(format!("unix:{}", daemon.socket().display()))
        .arg(&test_guest().kernel)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim_end().ends_with("OK"),
        "the Python client failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The error an import stream ends with.
async fn import_error(client: &mut Client, source: &Path, kind: pb::ImageKind) -> tonic::Status {
    let request = pb::ImportImageRequest {
        name: "bad".into(),
        kind: kind as i32,
        source_path: source.display().to_string(),
        ..Default::default()
    };
    let mut stream = match client.import_image(request).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => return status,
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("importing {} succeeded", source.display()),
            Err(status) => return status,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_a_directory_a_device_or_a_fifo_is_invalid_argument_on_source_and_leaves_nothing() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    // Beside the data dir, not in it: the snapshot below would wait forever on the FIFO.
    let scratch = daemon.data_dir().parent().unwrap().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let fifo = scratch.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // The pool comes up on first use: list it once so the snapshot holds its files.
    client.list_images(pb::ListImagesRequest::default()).await.unwrap();
    let before = snapshot(&daemon.data_dir());
    for source in [scratch.as_path(), Path::new("/dev/zero"), &fifo, &scratch.join("missing.raw")] {
        for kind in [pb::ImageKind::CloudImage, pb::ImageKind::Iso] {
            let status = import_error(&mut client, source, kind).await;
            assert_eq!(status.code(), Code::InvalidArgument, "{}: {status:?}", source.display());
            assert!(status.message().contains("source: "), "{}", status.message());
            let violations = status.get_details_bad_request().expect("BadRequest details").field_violations;
            assert_eq!(violations[0].field, "source");
        }
    }
    assert!(client.list_images(pb::ListImagesRequest::default()).await.unwrap().into_inner().images.is_empty());
    assert_eq!(snapshot(&daemon.data_dir()), before, "refused imports changed the data dir");
}
