//! The TCP listener: TLS 1.3 with client certificates from the node-local or the cluster CA only, roles from the
//! certificate, rotation without a restart, and the certificates made at first start (mode 0600, never logged).

mod tls_common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use qx_proto::controlplane::v1 as cp;
use qx_proto::controlplane::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_client::HostServiceClient;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_test_infra::test_guest;
use tls_common::{ClientFiles, TlsNode};
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// A unary call with an empty message to any method: enough to meet the role check, which runs first.
async fn call_empty(channel: Channel, path: &str) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_str(path).unwrap();
    grpc.unary(Request::new(()), path, codec).await.map(|_| ())
}

/// Every method the TCP listener serves, as `/package.Service/Method`.
fn tcp_methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(qx_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let name = format!("{}.{}", file.package(), service.name());
            if name == "quantix.node.v1.HostService" {
                continue;
            }
            if name.starts_with("quantix.node.v1.") {
                methods.extend(service.method.iter().map(|m| format!("/{name}/{}", m.name())));
            }
        }
    }
    methods
}

fn tls_client(
    files: &ClientFiles,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(&files.ca).unwrap()).unwrap();
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_file(&files.cert).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The serial number of the certificate the node presents on a fresh TLS 1.3 connection.
async fn server_serial(node: &TlsNode, files: &ClientFiles) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_client(files, &[&rustls::version::TLS13]).connect(name, tcp).await.unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    parsed.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_serves_tls_1_3_with_client_certificates_only() {
    let node = TlsNode::start("");
    // The unix socket opens before the node makes its certificates; the TCP port after.
    node.wait_tcp().await;
    let dir = node.certificates();
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for file in ["local-ca.pem", "local-ca.key", "node.pem", "node.key"] {
        let mode = std::fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    let admin = node.issue("alice", "admin").await;
    let channel = node.channel(&admin).await.expect("mutual TLS with an issued certificate");
    let info = NodeServiceClient::new(channel.clone()).get_node_info(pb::GetNodeInfoRequest {}).await.unwrap();
    assert!(!info.into_inner().node_name.is_empty());

    // HostService stays on the unix socket.
    let err = HostServiceClient::new(channel.clone()).get_host_status(pb::GetHostStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    // Plain HTTP/2 is not answered.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", node.port)).unwrap();
    let plain = plain.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(5));
    match plain.connect().await {
        Err(_) => {}
        Ok(channel) => {
            let err = NodeServiceClient::new(channel).get_node_info(pb::GetNodeInfoRequest {}).await.unwrap_err();
            // The TLS listener drops the connection: seen as unavailable, unknown, internal, or (when the close
            // races the request) cancelled.
            let refused = [Code::Unavailable, Code::Unknown, Code::Internal, Code::Cancelled];
            assert!(refused.contains(&err.code()), "{err:?}");
        }
    }
    // TLS 1.2 is refused, and so is TLS 1.3 without a client certificate or with one from another CA.
    let name = || rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    assert!(tls_client(&admin, &[&rustls::version::TLS12]).connect(name(), tcp).await.is_err(), "TLS 1.2");
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = qx_agent::certs::CertPaths::new(stranger_dir.path());
    stranger.ensure("elsewhere", &[]).unwrap();
    let (key, csr) = qx_agent::certs::new_key_and_csr("mallory").unwrap();
    let foreign = stranger.issue_client(&csr, "mallory", qx_agent::certs::Role::Admin, 1).unwrap();
    let files = ClientFiles {
        key: stranger_dir.path().join("k.pem"),
        cert: stranger_dir.path().join("c.pem"),
        ca: admin.ca.clone(),
    };
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.cert, foreign.certificate_pem).unwrap();
    let refused = async {
        let channel = node.channel(&files).await.ok()?;
        NodeServiceClient::new(channel).get_node_info(pb::GetNodeInfoRequest {}).await.ok()
    };
    assert!(refused.await.is_none(), "a certificate from another CA is refused");

    // Reflection and health on TCP too, without HostService.
    let mut services = reflected(channel.clone()).await;
    services.sort();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "quantix.node.v1.GuestAgentService",
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
    assert_eq!(health.check(request).await.unwrap().into_inner().status, 1, "SERVING");

    let log = node.daemon.log_text();
    assert!(!log.contains("PRIVATE KEY") && !log.contains("BEGIN CERTIFICATE"), "key material in the log");
}

async fn reflected(channel: Channel) -> Vec<String> {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    match stream.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_certificate_is_denied_every_mutation_and_nothing_changes() {
    let node = TlsNode::start("tls:\n  clients:\n    - name: promoted\n      role: admin\n");
    let mut unix = NodeServiceClient::new(qx_agent::client::channel(node.daemon.socket()).await.unwrap());
    let spec_text = test_guest().spec_yaml("kept", "nics:\n  - kind: user\n");
    unix.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.unwrap();
    let before = unix.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner();

    let reader = node.issue("bob", "read-only").await;
    let channel = node.channel(&reader).await.unwrap();
    let methods = tcp_methods();
    assert!(methods.len() > 20, "{methods:?}");
    let mut mutations = 0;
    // Reads are not called here (WatchEvents never ends); ListVms below stands for them.
    for method in methods.iter().filter(|m| !qx_agent::authz::is_read_only(m)) {
        mutations += 1;
        let err = call_empty(channel.clone(), method).await.expect_err(method);
        assert_eq!(err.code(), Code::PermissionDenied, "{method}: {err:?}");
        assert!(err.message().contains("\"bob\" has role read-only"), "{}", err.message());
    }
    assert!(mutations >= 15, "{mutations} mutations");
    let list = NodeServiceClient::new(channel).list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner();
    assert_eq!(list, before, "a reader sees the VMs");
    assert_eq!(unix.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner(), before, "nothing changed");

    // The allow-list makes "promoted" an admin whatever its certificate carries; an admin may mutate.
    let promoted = node.issue("promoted", "read-only").await;
    let mut admin = NodeServiceClient::new(node.channel(&promoted).await.unwrap());
    admin.delete_vm(pb::VmRef { name: "kept".into() }).await.expect("an admin deletes");
    assert!(unix.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    assert!(node.daemon.log_text().contains("audit: permission denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_node_certificate_is_served_without_a_restart() {
    let node = TlsNode::start("");
    let admin = node.issue("alice", "admin").await;
    node.wait_tcp().await;
    let first = server_serial(&node, &admin).await;
    // Rotate: a new node certificate for the same key, signed by the same CA (what `ensure` does when it is gone).
    let paths = qx_agent::certs::CertPaths::new(node.certificates());
    std::fs::remove_file(paths.node_cert()).unwrap();
    paths.ensure("rotated", &[]).unwrap();
    let pid = node.daemon.pid().unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::HUP).unwrap();
    let rotated = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let serial = server_serial(&node, &admin).await;
            if serial != first {
                return serial;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the new certificate is served within 20 s");
    assert_ne!(rotated, first);
    assert_eq!(node.daemon.pid(), Some(pid), "no restart");
    assert!(node.daemon.log_text().contains("reloaded the TLS certificates"));
}

#[test]
fn tcp_without_usable_certificates_is_refused_at_startup_saying_what_to_set() {
    test_guest();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.yaml");
    let port = tls_common::free_port();
    // A directory that cannot be created: under a regular file.
    std::fs::write(dir.path().join("file"), "").unwrap();
    let certs = dir.path().join("file/certificates");
    std::fs::write(
        &config,
        format!("listen:\n  tcp: 127.0.0.1:{port}\ntls:\n  certificates_dir: {}\n", certs.display()),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_qx-node"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(dir.path().join("node.sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listen.tcp serves TLS only"), "{stderr}");
    assert!(stderr.contains("set tls.certificates_dir"), "{stderr}");
}

/// A control plane with a cluster CA: signs the node's CSR at RegisterNode and sends its CA.
#[derive(Clone)]
struct SigningControlPlane {
    ca: Arc<qx_agent::certs::CertPaths>,
}

#[tonic::async_trait]
impl ControlPlane for SigningControlPlane {
    async fn register_node(
        &self,
        request: Request<cp::RegisterNodeRequest>,
    ) -> Result<Response<cp::RegisterNodeResponse>, Status> {
        let request = request.into_inner();
        if request.join_token != "one-use-secret" || request.csr_pem.is_empty() {
            return Err(Status::unauthenticated("no"));
        }
        // The test's cluster CA signs with the same code a node uses for operators; the role is irrelevant for a
        // server certificate, and the node's name must be a SAN of it for the test's clients.
        let signed = sign_server(&self.ca, &request.csr_pem);
        Ok(Response::new(cp::RegisterNodeResponse {
            node_id: "n-1".into(),
            cluster_name: "lab".into(),
            heartbeat_interval_seconds: 3600,
            cluster_ca_pem: std::fs::read_to_string(self.ca.local_ca()).unwrap(),
            node_certificate_pem: signed,
        }))
    }

    async fn heartbeat(&self, _: Request<cp::HeartbeatRequest>) -> Result<Response<cp::HeartbeatResponse>, Status> {
        Ok(Response::new(cp::HeartbeatResponse {}))
    }
}

fn sign_server(ca: &qx_agent::certs::CertPaths, csr_pem: &str) -> String {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "cluster-signed");
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.local_ca_key()).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca.local_ca()).unwrap(), key).unwrap();
    params.signed_by(&csr.public_key, &issuer).unwrap().pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_cluster_installs_the_cluster_ca_and_a_signed_node_certificate() {
    let node = TlsNode::start("");
    let cluster_dir = tempfile::tempdir().unwrap();
    let cluster = qx_agent::certs::CertPaths::new(cluster_dir.path().join("ca"));
    cluster.ensure("control-plane", &[]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = ControlPlaneServer::new(SigningControlPlane { ca: Arc::new(cluster.clone()) });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut host = HostServiceClient::new(qx_agent::client::channel(node.daemon.socket()).await.unwrap());
    let request = pb::JoinClusterRequest { control_plane_url: url, join_token: "one-use-secret".into() };
    host.join_cluster(request).await.expect("JoinCluster");
    let dir = node.certificates();
    assert!(dir.join("cluster-ca.pem").exists());

    // A client certificate from the cluster CA (the control plane's own) is accepted once the node reloads.
    let (key, csr) = qx_agent::certs::new_key_and_csr("control-plane").unwrap();
    let issued = cluster.issue_client(&csr, "control-plane", qx_agent::certs::Role::Admin, 1).unwrap();
    let files =
        ClientFiles { key: cluster_dir.path().join("k"), cert: cluster_dir.path().join("c"), ca: cluster.local_ca() };
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.cert, issued.certificate_pem).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(channel) = node.channel(&files).await {
                if NodeServiceClient::new(channel).get_node_info(pb::GetNodeInfoRequest {}).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(answered.is_ok(), "the cluster CA's client is served:\n{}", node.daemon.log_text());

    // The token was spent, never kept or logged.
    for entry in walk(node.daemon.data_dir().parent().unwrap()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains("one-use-secret"), "{} holds the token", entry.display());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files.extend(walk(&path)),
            Ok(t) if t.is_file() => files.push(path),
            _ => {}
        }
    }
    files
}
