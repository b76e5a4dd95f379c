//! A qx-node with its TCP listener on, and operator certificates issued through its unix socket, for the TLS,
//! authorization and standard-client tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_client::HostServiceClient;
use qx_test_infra::{test_guest, Daemon};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub struct TlsNode {
    pub daemon: Daemon,
    pub port: u16,
}

/// An operator's files, written 0600 like `qxctl node cert issue` writes them.
pub struct ClientFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TlsNode {
    /// A daemon serving TCP on 127.0.0.1 with `extra` appended to its node.yaml.
    pub fn start(extra: &str) -> Self {
        test_guest();
        let port = free_port();
        let config = format!("listen:\n  tcp: 127.0.0.1:{port}\n{extra}");
        let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
        Self { daemon, port }
    }

    /// `certificates/` next to the test's node.yaml.
    pub fn certificates(&self) -> PathBuf {
        self.daemon.data_dir().parent().unwrap().join("certificates")
    }

    /// Signs a certificate for `name` with `role` ("admin", "read-only") through HostService on the unix socket.
    pub async fn issue(&self, name: &str, role: &str) -> ClientFiles {
        let (key_pem, csr_pem) = qx_agent::certs::new_key_and_csr(name).unwrap();
        let channel = qx_agent::client::channel(self.daemon.socket()).await.unwrap();
        let request = pb::IssueClientCertificateRequest { name: name.into(), role: role.into(), days: 1, csr_pem };
        let issued = HostServiceClient::new(channel).issue_client_certificate(request).await.unwrap().into_inner();
        let dir = self.daemon.data_dir().parent().unwrap().join(format!("client-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let files = ClientFiles { key: dir.join("key.pem"), cert: dir.join("cert.pem"), ca: dir.join("ca.pem") };
        qx_agent::certs::write_secret(&files.key, key_pem.as_bytes()).unwrap();
        qx_agent::certs::write_secret(&files.cert, issued.certificate_pem.as_bytes()).unwrap();
        qx_agent::certs::write_secret(&files.ca, issued.ca_pem.as_bytes()).unwrap();
        files
    }

    /// A mutual-TLS channel to the TCP listener (retrying while the daemon binds it).
    pub async fn channel(&self, files: &ClientFiles) -> Result<Channel, tonic::transport::Error> {
        let read = |p: &Path| std::fs::read(p).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&files.ca)))
            .identity(Identity::from_pem(read(&files.cert), read(&files.key)))
            .domain_name("localhost");
        let endpoint =
            Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port)).unwrap().tls_config(tls).unwrap();
        self.wait_tcp().await;
        endpoint.connect().await
    }

    /// Waits until the TCP port accepts connections (it opens after the unix socket).
    pub async fn wait_tcp(&self) {
        let port = self.port;
        let open = tokio::time::timeout(Duration::from_secs(30), async move {
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(open.is_ok(), "qx-node never listened on TCP {port}:\n{}", self.daemon.log_text());
    }
}
