//! Standard gRPC clients against a real qx-node: Python grpcio stubs generated from proto/ (grpc-core sends the
//! %-encoded socket path as `:authority`), server reflection and health.

mod common;
mod tls_common;

use std::path::Path;
use std::process::Command;

use qx_test_infra::{test_guest, Daemon};
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Runs `agent/tests/python/client.py` with `args` after the proto dir and returns its stdout; fails the test with
/// its output when it fails.
pub fn run_python(python: &Path, daemon: &Daemon, args: &[&str]) -> String {
    let output = Command::new(python)
        .arg(repo().join("agent/tests/python/client.py"))
        .arg(repo().join("proto/proto"))
        .args(args)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && stdout.trim_end().ends_with("OK"),
        "the Python client failed ({}):\n{stdout}\n{}\ndaemon log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        daemon.log_text()
    );
    stdout
}

#[test]
fn python_grpcio_drives_a_vm_over_the_unix_socket() {
    let Some(python) = common::python() else { return };
    let daemon = common::daemon();
    let spec = daemon.data_dir().parent().unwrap().join("py-unix.yaml");
    std::fs::write(&spec, test_guest().spec_yaml("py-unix", "nics:\n  - kind: user\n")).unwrap();
    let target = format!("unix:{}", daemon.socket().display());
    let out = run_python(&python, &daemon, &[&target, spec.to_str().unwrap(), "py-unix"]);
    assert!(out.contains("VM_STATE_STOPPED -> VM_STATE_STARTING") || out.contains("-> VM_STATE_RUNNING"), "{out}");
    assert!(out.contains("missing VM: NOT_FOUND"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_drives_a_vm_over_mutual_tls() {
    let Some(python) = common::python() else { return };
    let node = tls_common::TlsNode::start("");
    let files = node.issue("py-operator", "admin").await;
    node.wait_tcp().await;
    let spec = node.daemon.data_dir().parent().unwrap().join("py-tls.yaml");
    std::fs::write(&spec, test_guest().spec_yaml("py-tls", "nics:\n  - kind: user\n")).unwrap();
    let target = format!("localhost:{}", node.port);
    let args = [&target, spec.to_str().unwrap(), "py-tls", files.ca.to_str().unwrap(), files.cert.to_str().unwrap()];
    let out =
        run_python(&python, &node.daemon, &[args[0], args[1], args[2], args[3], args[4], files.key.to_str().unwrap()]);
    assert!(out.contains("-> VM_STATE_RUNNING"), "{out}");
}

/// The services reflection lists on a channel.
pub async fn reflected_services(channel: tonic::transport::Channel) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut responses =
        client.server_reflection_info(tokio_stream::once(request)).await.expect("ServerReflectionInfo").into_inner();
    let response = responses.next().await.expect("a reflection answer").expect("reflection");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn reflection_and_health_answer_on_the_unix_socket() {
    let daemon = common::daemon();
    let channel = qx_agent::client::channel(daemon.socket()).await.unwrap();
    let mut services = reflected_services(channel.clone()).await;
    services.sort();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "quantix.node.v1.GuestAgentService",
            "quantix.node.v1.HostService",
            "quantix.node.v1.MigrationPeerService",
            "quantix.node.v1.MigrationService",
            "quantix.node.v1.NodeService",
            "quantix.node.v1.SecurityGroupService",
            "quantix.node.v1.SnapshotService",
            "quantix.node.v1.UpdateService"
        ]
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: "quantix.node.v1.NodeService".into() };
    let status = health.check(request).await.expect("Health.Check").into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}
