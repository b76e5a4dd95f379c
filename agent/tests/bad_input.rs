//! Bad input over gRPC against a real qx-node: every refusal has the right code, a message short enough for any
//! client to receive, the field problems as `google.rpc.BadRequest` details, and leaves the daemon serving and its
//! files as they were.

mod common;

use std::path::{Path, PathBuf};
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
    // Outside the allowed host paths, which the refusal names, whether or not the file exists.
    let description = &violations[1].description;
    assert!(description.starts_with(r#""/no/such/disk-0.raw" is outside the allowed host paths ("#), "{description}");
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

/// Strings no field accepts as they are: control characters, a bidi override, path escapes, 1 MiB.
fn bad_strings() -> Vec<String> {
    vec!["ctl\u{1}\n".into(), "\u{202e}evil".into(), "../../etc/passwd".into(), "a/b".into(), "x".repeat(1 << 20)]
}

/// A refusal with one of `codes`, bounded like every refusal.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<tonic::Response<T>, tonic::Status>, codes: &[Code]) {
    let status = match result {
        Ok(reply) => panic!("{what}: accepted: {:?}", reply.into_inner()),
        Err(status) => status,
    };
    assert!(codes.contains(&status.code()), "{what}: {:?} {}", status.code(), status.message());
    assert_bounded(&status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_bad_fields_over_grpc_is_refused_by_code_and_changes_nothing() {
    use Code::{InvalidArgument as Invalid, NotFound};
    let daemon = daemon();
    let mut client = client(&daemon).await;
    client.create_vm(pb::CreateVmRequest { spec: Some(spec("base")), spec_text: String::new() }).await.unwrap();
    client.list_images(pb::ListImagesRequest::default()).await.unwrap();
    let before = snapshot(&daemon.data_dir());

    for bad in bad_strings() {
        let what = |rpc: &str| format!("{rpc}({:?})", bad.chars().take(20).collect::<String>());
        let vm = || pb::VmRef { name: bad.clone() };
        refused(&what("GetVm"), client.get_vm(vm()).await, &[NotFound, Invalid]);
        refused(
            &what("StartVm"),
            client.start_vm(pb::StartVmRequest { name: bad.clone(), paused: true }).await,
            &[NotFound, Invalid],
        );
        refused(&what("DeleteVm"), client.delete_vm(vm()).await, &[NotFound, Invalid]);
        refused(&what("PauseVm"), client.pause_vm(vm()).await, &[NotFound, Invalid]);
        refused(&what("ResetVm"), client.reset_vm(vm()).await, &[NotFound, Invalid]);
        let stop = pb::StopVmRequest { name: bad.clone(), force: true, timeout_seconds: u32::MAX };
        refused(&what("StopVm"), client.stop_vm(stop).await, &[NotFound, Invalid]);
        let detach = pb::DetachDeviceRequest { vm: "base".into(), id: bad.clone(), timeout_seconds: u32::MAX };
        refused(&what("DetachDisk"), client.detach_disk(detach.clone()).await, &[NotFound, Invalid]);
        refused(&what("DetachNic"), client.detach_nic(detach).await, &[NotFound, Invalid]);

        let specs = [
            pb::VmSpec { name: bad.clone(), ..spec("x") },
            pb::VmSpec { uuid: bad.clone(), ..spec("x") },
            pb::VmSpec { machine: bad.clone(), ..spec("x") },
            pb::VmSpec { cpu: bad.clone(), ..spec("x") },
            pb::VmSpec { accelerator: bad.clone(), ..spec("x") },
            pb::VmSpec { firmware: bad.clone(), ..spec("x") },
            pb::VmSpec { kernel_boot: Some(pb::KernelBoot { kernel: bad.clone(), ..Default::default() }), ..spec("x") },
            pb::VmSpec { disks: vec![pb::Disk { path: bad.clone(), ..Default::default() }], ..spec("x") },
            pb::VmSpec { disks: vec![pb::Disk { volume: bad.clone(), ..Default::default() }], ..spec("x") },
            pb::VmSpec {
                disks: vec![pb::Disk { volume: "default/v".into(), id: bad.clone(), ..Default::default() }],
                ..spec("x")
            },
            pb::VmSpec { nics: vec![pb::Nic { kind: bad.clone(), ..Default::default() }], ..spec("x") },
            pb::VmSpec { nics: vec![pb::Nic { mac: bad.clone(), ..Default::default() }], ..spec("x") },
            pb::VmSpec {
                nics: vec![pb::Nic { kind: "network".into(), network: bad.clone(), ..Default::default() }],
                ..spec("x")
            },
            pb::VmSpec { labels: [(bad.clone(), "v".into())].into(), ..spec("x") },
            pb::VmSpec { labels: [("k".into(), format!("{bad}\u{7}"))].into(), ..spec("x") },
        ];
        for (i, spec) in specs.into_iter().enumerate() {
            // Label keys may hold `/` and `.` (`app.example/tier`): no path is made of them.
            if i == 13 && bad.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c)) && bad.len() <= 63 {
                continue;
            }
            // `pool/volume` is a volume's name; whether it exists is StartVm's question.
            if i == 8 && bad == "a/b" {
                continue;
            }
            let request = pb::CreateVmRequest { spec: Some(spec), spec_text: String::new() };
            refused(&what(&format!("CreateVm#{i}")), client.create_vm(request).await, &[Invalid]);
        }
        let text = pb::CreateVmRequest { spec: None, spec_text: bad.clone() };
        refused(&what("CreateVm(spec_text)"), client.create_vm(text).await, &[Invalid]);

        let volume = pb::CreateVolumeRequest { name: bad.clone(), size_bytes: 1 << 20, ..Default::default() };
        refused(&what("CreateVolume"), first_of(client.create_volume(volume).await).await, &[Invalid]);
        let volume = pb::CreateVolumeRequest { pool: bad.clone(), name: "v".into(), ..Default::default() };
        refused(&what("CreateVolume(pool)"), first_of(client.create_volume(volume).await).await, &[NotFound, Invalid]);
        let import =
            pb::ImportImageRequest { name: bad.clone(), source_path: "/dev/zero".into(), ..Default::default() };
        refused(&what("ImportImage"), first_of(client.import_image(import).await).await, &[Invalid]);
        let import = pb::ImportImageRequest { name: "i".into(), source_path: bad.clone(), ..Default::default() };
        refused(&what("ImportImage(source)"), first_of(client.import_image(import).await).await, &[Invalid]);
        let network = pb::Network { name: bad.clone(), bridge: "br-x".into(), ..Default::default() };
        refused(&what("CreateNetwork"), client.create_network(network).await, &[Invalid]);
        let network = pb::Network { name: "n".into(), bridge: bad.clone(), ..Default::default() };
        refused(&what("CreateNetwork(bridge)"), client.create_network(network).await, &[Invalid]);
    }

    // Numbers past what their fields mean.
    let numbers = [
        pb::VmSpec { vcpus: u32::MAX, ..spec("n") },
        pb::VmSpec { memory_mib: u64::MAX, ..spec("n") },
        pb::VmSpec { max_memory_mib: Some(u64::MAX), ..spec("n") },
        pb::VmSpec { max_vcpus: Some(u32::MAX), ..spec("n") },
        pb::VmSpec { vnc_display: Some(u32::MAX), ..spec("n") },
        pb::VmSpec {
            disks: vec![pb::Disk { volume: "default/v".into(), format: 99, ..Default::default() }],
            ..spec("n")
        },
        pb::VmSpec {
            nics: vec![pb::Nic {
                host_forwards: vec![pb::HostForward { host_port: 70_000, guest_port: u32::MAX }],
                ..Default::default()
            }],
            ..spec("n")
        },
    ];
    for (i, spec) in numbers.into_iter().enumerate() {
        let request = pb::CreateVmRequest { spec: Some(spec), spec_text: String::new() };
        refused(&format!("CreateVm numbers#{i}"), client.create_vm(request).await, &[Invalid]);
    }
    let vcpus = pb::SetVcpusRequest { vm: "base".into(), vcpus: u32::MAX };
    refused("SetVcpus(MAX)", client.set_vcpus(vcpus).await, &[Invalid, Code::FailedPrecondition]);
    let memory = pb::SetMemoryRequest { vm: "base".into(), memory_mib: u64::MAX };
    refused("SetMemory(MAX)", client.set_memory(memory).await, &[Invalid, Code::FailedPrecondition]);
    let volume = pb::CreateVolumeRequest { name: "huge".into(), size_bytes: u64::MAX, ..Default::default() };
    refused(
        "CreateVolume(MAX)",
        first_of(client.create_volume(volume).await).await,
        &[Invalid, Code::ResourceExhausted],
    );
    let volume = pb::CreateVolumeRequest { name: "fmt".into(), size_bytes: 1 << 20, format: 99, ..Default::default() };
    refused("CreateVolume(format)", first_of(client.create_volume(volume).await).await, &[Invalid]);
    let resize = pb::ResizeVolumeRequest { name: "none".into(), size_bytes: u64::MAX, ..Default::default() };
    refused("ResizeVolume(MAX)", client.resize_volume(resize).await, &[NotFound, Invalid]);
    let network = pb::Network {
        name: "n".into(),
        bridge: "br-n".into(),
        vlan: Some(70_000),
        mtu: Some(u32::MAX),
        ..Default::default()
    };
    refused("CreateNetwork(numbers)", client.create_network(network).await, &[Invalid]);

    assert_eq!(client.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms.len(), 1, "the daemon serves on");
    assert_eq!(snapshot(&daemon.data_dir()), before, "refused requests changed the data dir");
}

/// The first message of a long operation's stream, or the refusal of the call.
async fn first_of<T: std::fmt::Debug>(
    call: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let mut stream = call?.into_inner();
    loop {
        match stream.message().await? {
            Some(message) if format!("{message:?}").contains("Progress") => continue,
            Some(message) => return Ok(tonic::Response::new(message)),
            None => return Err(tonic::Status::unknown("the stream ended without a result")),
        }
    }
}

/// A daemon confined to `allowed` (and the test guest's directory, for its kernel) but none of the test dirs.
fn confined_daemon(allowed: &Path) -> qx_test_infra::Daemon {
    let guest_dir = test_guest().kernel.parent().unwrap().to_owned();
    let config = format!("allowed_paths:\n  - {}\n  - {}\n", allowed.display(), guest_dir.display());
    qx_test_infra::Daemon::start_confined(Path::new(env!("CARGO_BIN_EXE_qx-node")), Some(&config))
}

/// The one field violation of an INVALID_ARGUMENT refusal: (field, description).
fn violation<T: std::fmt::Debug>(what: &str, result: Result<tonic::Response<T>, tonic::Status>) -> (String, String) {
    let status = match result {
        Ok(reply) => panic!("{what}: accepted: {:?}", reply.into_inner()),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert_bounded(&status);
    let violations = status.get_details_bad_request().expect("BadRequest details").field_violations;
    assert_eq!(violations.len(), 1, "{what}: {violations:?}");
    (violations[0].field.clone(), violations[0].description.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_outside_allowed_paths_are_refused_naming_field_value_and_prefixes() {
    let scratch = tempfile::tempdir().unwrap();
    let (allowed, outside) = (scratch.path().join("allowed"), scratch.path().join("outside"));
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    for file in [allowed.join("disk.raw"), allowed.join("disk2.raw"), outside.join("secret.raw")] {
        std::fs::write(file, vec![0u8; 1 << 20]).unwrap();
    }
    std::os::unix::fs::symlink(outside.join("secret.raw"), allowed.join("escape.raw")).unwrap();
    let daemon = confined_daemon(&allowed);
    let mut client = client(&daemon).await;
    let channel = qx_agent::client::channel(daemon.socket()).await.unwrap();
    let mut updates = qx_proto::node::v1::update_service_client::UpdateServiceClient::new(channel);
    client.list_images(pb::ListImagesRequest::default()).await.unwrap();
    let with_disk = |name: &str, path: &Path| pb::VmSpec {
        disks: vec![pb::Disk { path: path.display().to_string(), ..Default::default() }],
        ..spec(name)
    };
    let create = |spec: pb::VmSpec| pb::CreateVmRequest { spec: Some(spec), spec_text: String::new() };
    client.create_vm(create(with_disk("ok", &allowed.join("disk.raw")))).await.expect("a disk under allowed_paths");
    let before = snapshot(&daemon.data_dir());

    let outside_text = "is outside the allowed host paths (";
    let escapes = [
        (outside.join("secret.raw"), outside_text),
        (allowed.join("../outside/secret.raw"), outside_text),
        (PathBuf::from("/etc/passwd"), outside_text),
        (PathBuf::from("/no/such/file.raw"), outside_text),
        (allowed.join("escape.raw"), "leads out through a symlink: it is outside the allowed host paths ("),
    ];
    for (path, problem) in &escapes {
        let shown = format!("{:?} {problem}", path.display().to_string());
        let check = |what: &str, (field, description): (String, String), expected_field: &str| {
            assert_eq!(field, expected_field, "{what} {}", path.display());
            assert!(description.starts_with(&shown), "{what}: {description}");
            assert!(description.contains(&allowed.display().to_string()), "{what}: {description}");
        };
        check(
            "CreateVm",
            violation("CreateVm", client.create_vm(create(with_disk("bad", path))).await),
            "disks[0].path",
        );
        let mut boot = spec("bad");
        boot.kernel_boot.as_mut().unwrap().kernel = path.display().to_string();
        check(
            "CreateVm(kernel)",
            violation("CreateVm(kernel)", client.create_vm(create(boot.clone())).await),
            "kernel.kernel",
        );
        boot.kernel_boot.as_mut().unwrap().kernel = test_guest().kernel.display().to_string();
        boot.kernel_boot.as_mut().unwrap().initrd = path.display().to_string();
        check("CreateVm(initrd)", violation("CreateVm(initrd)", client.create_vm(create(boot)).await), "kernel.initrd");
        let update = pb::UpdateVmRequest { spec: Some(with_disk("ok", path)), spec_text: String::new() };
        check("UpdateVm", violation("UpdateVm", client.update_vm(update).await), "disks[0].path");
        let attach = pb::AttachDiskRequest {
            vm: "ok".into(),
            disk: Some(pb::Disk { path: path.display().to_string(), ..Default::default() }),
        };
        check("AttachDisk", violation("AttachDisk", client.attach_disk(attach).await), "disk.path");
        let import = pb::ImportImageRequest {
            name: "img".into(),
            kind: pb::ImageKind::CloudImage as i32,
            source_path: path.display().to_string(),
            ..Default::default()
        };
        check("ImportImage", violation("ImportImage", first_of(client.import_image(import).await).await), "source");
        let start = pb::UpdateHostStart {
            path: path.display().to_string(),
            size: 1 << 20,
            sha256: "0".repeat(64),
            ..Default::default()
        };
        let request = pb::UpdateHostRequest { message: Some(pb::update_host_request::Message::Start(start)) };
        let progress = updates.update_host(tokio_stream::iter([request])).await;
        let progress = match progress {
            Ok(stream) => first_of(Ok(stream)).await,
            Err(status) => Err(status),
        };
        check("UpdateHost", violation("UpdateHost", progress), "path");
    }
    assert_eq!(snapshot(&daemon.data_dir()), before, "refused requests changed the data dir");
    let vm = client.get_vm(pb::VmRef { name: "ok".into() }).await.unwrap().into_inner();
    assert_eq!(vm.spec.unwrap().disks.len(), 1, "the VM kept its one disk");

    // Under a prefix, the same calls go through.
    let attach = pb::AttachDiskRequest {
        vm: "ok".into(),
        disk: Some(pb::Disk { path: allowed.join("disk2.raw").display().to_string(), ..Default::default() }),
    };
    let vm = client.attach_disk(attach).await.expect("AttachDisk under allowed_paths").into_inner();
    assert_eq!(vm.spec.unwrap().disks.len(), 2);
    let import = pb::ImportImageRequest {
        name: "img".into(),
        kind: pb::ImageKind::CloudImage as i32,
        source_path: allowed.join("disk.raw").display().to_string(),
        ..Default::default()
    };
    first_of(client.import_image(import).await).await.expect("ImportImage under allowed_paths");
}
