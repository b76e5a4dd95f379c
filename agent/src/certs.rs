//! The node's certificates: a node-local CA, the node's own key and certificate, and the cluster CA it received at
//! JoinCluster, as PEM files (mode 0600, in a 0700 directory) under `certificates/` next to the config file.
//!
//! The TCP listener serves TLS 1.3 only and requires a client certificate from a trusted CA: the node-local CA
//! (which signs operator certificates, `qxctl node cert issue NAME`) or the cluster CA. A client certificate
//! carries its name as the subject's common name and its role ([`Role`]) as the organizational unit. Nothing
//! here logs key material; errors name files, never their contents.
//!
//! ```no_run
//! # fn demo() -> Result<(), qx_agent::certs::CertError> {
//! use qx_agent::certs::{CertPaths, Role};
//! let paths = CertPaths::new("/etc/quantix/certificates");
//! paths.ensure("node1", &[])?;
//! let (key_pem, csr_pem) = qx_agent::certs::new_key_and_csr("alice")?;
//! let issued = paths.issue_client(&csr_pem, "alice", Role::Admin, 365)?;
//! # let _ = (key_pem, issued); Ok(()) }
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

/// The directory name, next to the config file.
pub const DIR_NAME: &str = "certificates";
const CA_YEARS: i64 = 20;
const NODE_DAYS: i64 = 825;
/// The longest an operator certificate may be valid.
pub const MAX_CLIENT_DAYS: u32 = 3650;
const DAY: time::Duration = time::Duration::days(1);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Parse { path: PathBuf, problem: String },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("TLS setup")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// What a client certificate may do over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads only: Get*, List*, Watch*; every mutation is PERMISSION_DENIED.
    ReadOnly,
    /// Everything NodeService and UpdateService offer (HostService stays on the unix socket).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read-only" => Some(Role::ReadOnly),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An operator certificate signed by the node-local CA.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate_pem: String,
    /// The CA to trust for the node's own certificate (the node-local CA).
    pub ca_pem: String,
}

/// The files under `certificates/`.
#[derive(Debug, Clone)]
pub struct CertPaths {
    dir: PathBuf,
}

impl CertPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node-local CA's certificate: operators trust it for the node and it signs their certificates.
    pub fn local_ca(&self) -> PathBuf {
        self.dir.join("local-ca.pem")
    }

    pub fn local_ca_key(&self) -> PathBuf {
        self.dir.join("local-ca.key")
    }

    /// The node's TLS certificate (signed by the node-local CA, or by the cluster CA after JoinCluster).
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }

    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    /// The cluster CA from JoinCluster: trusted for client certificates.
    pub fn cluster_ca(&self) -> PathBuf {
        self.dir.join("cluster-ca.pem")
    }

    /// Creates whatever is missing: the directory (0700), the node-local CA, the node key and a certificate for
    /// `node_name` and `extra_names` (DNS names or IP addresses; `localhost` and the loopback addresses are always
    /// in). Existing files are kept.
    pub fn ensure(&self, node_name: &str, extra_names: &[String]) -> Result<(), CertError> {
        let write = |source| CertError::Write { path: self.dir.clone(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(write)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(write)?;
        if !self.local_ca().exists() || !self.local_ca_key().exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = name(&format!("Quantix node {node_name} local CA"), None);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut params, time::Duration::days(365 * CA_YEARS));
            params.serial_number = Some(serial());
            let cert = params.self_signed(&key)?;
            write_secret(&self.local_ca_key(), key.serialize_pem().as_bytes())?;
            write_secret(&self.local_ca(), cert.pem().as_bytes())?;
            // A new CA invalidates a node certificate signed by an older one.
            let _ = fs::remove_file(self.node_cert());
            info!(dir = %self.dir.display(), "created the node-local CA");
        }
        if !self.node_key().exists() {
            let key = KeyPair::generate()?;
            write_secret(&self.node_key(), key.serialize_pem().as_bytes())?;
            let _ = fs::remove_file(self.node_cert());
        }
        if !self.node_cert().exists() {
            let key = KeyPair::from_pem(&read(&self.node_key())?).map_err(|e| parse(&self.node_key(), e))?;
            let mut names: Vec<String> = vec![node_name.to_owned(), hostname(), "localhost".into()];
            names.extend(["127.0.0.1".into(), "::1".into()]);
            names.extend(extra_names.iter().cloned());
            names.retain(|n| !n.is_empty());
            names.dedup();
            // A node name that is no DNS name stays out of the SANs, not out of the node.
            names.retain(|n| n.parse::<std::net::IpAddr>().is_ok() || is_dns_name(n));
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name = name(node_name, None);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            validity(&mut params, time::Duration::days(NODE_DAYS));
            params.serial_number = Some(serial());
            let cert = params.signed_by(&key, &self.issuer()?)?;
            write_secret(&self.node_cert(), cert.pem().as_bytes())?;
            info!(path = %self.node_cert().display(), "created the node certificate");
        }
        Ok(())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CertError> {
        let key = KeyPair::from_pem(&read(&self.local_ca_key())?).map_err(|e| parse(&self.local_ca_key(), e))?;
        Issuer::from_ca_cert_pem(&read(&self.local_ca())?, key).map_err(|e| parse(&self.local_ca(), e))
    }

    /// Signs an operator certificate for the key in `csr_pem` with the node-local CA. Only the CSR's public key
    /// is used: name, role and validity are the node's choice, never the requester's.
    pub fn issue_client(&self, csr_pem: &str, client: &str, role: Role, days: u32) -> Result<Issued, CertError> {
        check_client_name(client)?;
        if days == 0 || days > MAX_CLIENT_DAYS {
            return Err(CertError::Invalid {
                field: "days",
                problem: format!("{days} is outside 1..={MAX_CLIENT_DAYS}"),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::Invalid { field: "csr_pem", problem: format!("is not a valid CSR: {e}") })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(client, Some(role));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, time::Duration::days(days.into()));
        params.serial_number = Some(serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        info!(client, role = role.as_str(), days, "issued an operator certificate");
        Ok(Issued { certificate_pem: cert.pem(), ca_pem: read(&self.local_ca())? })
    }

    /// The DNS names and IP addresses of the node certificate.
    pub fn node_names(&self) -> Result<Vec<String>, CertError> {
        let path = self.node_cert();
        let cert = certificates(&path)?.remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).map_err(|e| parse(&path, e))?;
        let Ok(Some(sans)) = parsed.subject_alternative_name() else { return Ok(Vec::new()) };
        Ok(sans
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                    16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect())
    }

    /// A CSR for the node's own key, for a control plane to sign at JoinCluster.
    pub fn node_csr(&self, node_name: &str) -> Result<String, CertError> {
        let key = KeyPair::from_pem(&read(&self.node_key())?).map_err(|e| parse(&self.node_key(), e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(node_name, None);
        Ok(params.serialize_request(&key)?.pem()?)
    }

    /// Installs what a control plane sent at JoinCluster: its CA (trusted for clients from then on) and, when
    /// given, the node certificate it signed for the node's key.
    pub fn install_cluster(&self, ca_pem: &str, node_cert_pem: &str) -> Result<(), CertError> {
        let invalid = |field, problem: &str| CertError::Invalid { field, problem: problem.to_owned() };
        let ca: Vec<_> =
            CertificateDer::pem_slice_iter(ca_pem.as_bytes()).collect::<Result<_, _>>().unwrap_or_default();
        if ca.is_empty() {
            return Err(invalid("cluster_ca_pem", "holds no PEM certificate"));
        }
        if !node_cert_pem.is_empty() {
            let node = CertificateDer::from_pem_slice(node_cert_pem.as_bytes())
                .map_err(|_| invalid("node_certificate_pem", "holds no PEM certificate"))?;
            let key = KeyPair::from_pem(&read(&self.node_key())?).map_err(|e| parse(&self.node_key(), e))?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&node)
                .map_err(|_| invalid("node_certificate_pem", "is not an X.509 certificate"))?;
            if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(invalid("node_certificate_pem", "is not for this node's key"));
            }
            write_secret(&self.node_cert(), node_cert_pem.as_bytes())?;
        }
        write_secret(&self.cluster_ca(), ca_pem.as_bytes())
    }

    /// The TLS server configuration of the TCP listener: TLS 1.3 only, HTTP/2, a client certificate from the
    /// node-local or the cluster CA required.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for path in [self.local_ca(), self.cluster_ca()] {
            if path == self.cluster_ca() && !path.exists() {
                continue;
            }
            for cert in certificates(&path)? {
                roots.add(cert).map_err(|e| parse(&path, e))?;
            }
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()?;
        let key = PrivateKeyDer::from_pem_file(self.node_key()).map_err(|e| parse(&self.node_key(), e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certificates(&self.node_cert())?, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The TLS server configuration of the Host UI listener: browsers and monitoring scrapers have no client
    /// certificate, so none is asked for (the UI's login stands in for it); TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1
    /// (WebSockets need the latter).
    pub fn browser_server_config(&self) -> Result<Arc<rustls::ServerConfig>, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::from_pem_file(self.node_key()).map_err(|e| parse(&self.node_key(), e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(certificates(&self.node_cert())?, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// When each file the server configuration reads last changed, to notice a rotation.
    fn stamp(&self) -> Vec<Option<SystemTime>> {
        [self.local_ca(), self.cluster_ca(), self.node_cert(), self.node_key()]
            .iter()
            .map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// A new key and a CSR for it, made where the key stays (qxctl): the key never travels.
pub fn new_key_and_csr(client: &str) -> Result<(String, String), CertError> {
    check_client_name(client)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(client, None);
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

/// The name and role a client certificate carries (common name, organizational unit); `None` when the
/// certificate does not parse or has no common name. A missing or unknown unit is no role.
pub fn subject_of(cert: &[u8]) -> Option<(String, Option<Role>)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let subject = parsed.subject();
    let common_name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let role = subject.iter_organizational_unit().next().and_then(|ou| ou.as_str().ok()).and_then(Role::parse);
    Some((common_name, role))
}

fn check_client_name(client: &str) -> Result<(), CertError> {
    let ok = !client.is_empty()
        && client.len() <= 64
        && client.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        let shown: String = client.chars().take(64).collect();
        Err(CertError::Invalid {
            field: "name",
            problem: format!("{shown:?} ({} bytes) must be 1-64 of A-Z a-z 0-9 - _ . @", client.len()),
        })
    }
}

fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len()) && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn name(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Quantix");
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, lifetime: time::Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A client whose clock is a little behind still accepts a fresh certificate.
    params.not_before = now - DAY;
    params.not_after = now + lifetime;
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("the system RNG works");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read { path: path.to_owned(), source })
}

fn parse(path: &Path, error: impl std::fmt::Display) -> CertError {
    CertError::Parse { path: path.to_owned(), problem: error.to_string() }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| parse(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| parse(path, e))?;
    if certs.is_empty() {
        return Err(parse(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Writes a file readable by its owner only, atomically: a 0600 temp file in the same directory, fsync, rename,
/// fsync of the directory.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    let write = |source| CertError::Write { path: path.to_owned(), source };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(write)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(write)?;
    fs::rename(&tmp, path).map_err(write)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write)
}

/// The TCP listener's TLS configuration, rebuilt when its files change (checked by [`TlsState::reload_if_changed`]
/// on SIGHUP and every few seconds), so a rotated certificate needs no restart. A rebuild that fails keeps the
/// configuration in force and says why.
#[derive(Debug)]
pub struct TlsState {
    paths: CertPaths,
    current: RwLock<(Vec<Option<SystemTime>>, Arc<rustls::ServerConfig>)>,
}

impl TlsState {
    pub fn load(paths: CertPaths) -> Result<Self, CertError> {
        let stamp = paths.stamp();
        let config = paths.server_config()?;
        Ok(Self { paths, current: RwLock::new((stamp, config)) })
    }

    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()).1)
    }

    pub fn paths(&self) -> &CertPaths {
        &self.paths
    }

    /// Rebuilds the configuration when a file changed, or always with `force` (SIGHUP). Returns whether a new
    /// configuration is in force.
    pub fn reload_if_changed(&self, force: bool) -> bool {
        let stamp = self.paths.stamp();
        if !force && self.current.read().unwrap_or_else(|e| e.into_inner()).0 == stamp {
            return false;
        }
        match self.paths.server_config() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (stamp, config);
                info!(dir = %self.paths.dir().display(), "reloaded the TLS certificates");
                true
            }
            Err(error) => {
                // Remember the stamp: a broken file is reported once, not every few seconds.
                self.current.write().unwrap_or_else(|e| e.into_inner()).0 = stamp;
                warn!(error = %crate::grpc::error_chain(&error), "kept the previous TLS certificates");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_creates_a_ca_and_a_node_certificate_readable_by_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path().join(DIR_NAME));
        paths.ensure("node1", &["192.0.2.7".into()]).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(paths.dir()), 0o700);
        for file in [paths.local_ca(), paths.local_ca_key(), paths.node_cert(), paths.node_key()] {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        let ca = fs::read(paths.local_ca()).unwrap();
        paths.ensure("node1", &[]).unwrap();
        assert_eq!(fs::read(paths.local_ca()).unwrap(), ca, "a second start keeps the CA");
        let node = certificates(&paths.node_cert()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&node[0]).unwrap();
        let sans = format!("{:?}", parsed.subject_alternative_name().unwrap().unwrap().value.general_names);
        assert!(sans.contains("node1") && sans.contains("localhost") && sans.contains("[192, 0, 2, 7]"), "{sans}");
        let names = paths.node_names().unwrap();
        assert!(names.contains(&"192.0.2.7".to_owned()) && names.contains(&"::1".to_owned()), "{names:?}");
        paths.server_config().unwrap();
    }

    #[test]
    fn operator_certificates_carry_the_nodes_choice_of_name_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path());
        paths.ensure("node1", &[]).unwrap();
        let (_key, csr) = new_key_and_csr("mallory-asks-admin").unwrap();
        let issued = paths.issue_client(&csr, "alice", Role::ReadOnly, 30).unwrap();
        let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).unwrap();
        assert_eq!(subject_of(&der), Some(("alice".into(), Some(Role::ReadOnly))));
        assert_eq!(issued.ca_pem, fs::read_to_string(paths.local_ca()).unwrap());

        let err = paths.issue_client(&csr, "a b", Role::Admin, 30).unwrap_err().to_string();
        assert_eq!(err, r#"name: "a b" (3 bytes) must be 1-64 of A-Z a-z 0-9 - _ . @"#);
        let err = paths.issue_client(&csr, "alice", Role::Admin, 0).unwrap_err().to_string();
        assert_eq!(err, "days: 0 is outside 1..=3650");
        let err = paths.issue_client("junk", "alice", Role::Admin, 1).unwrap_err().to_string();
        assert!(err.starts_with("csr_pem: is not a valid CSR"), "{err}");
    }

    #[test]
    fn a_cluster_certificate_must_be_for_the_nodes_key() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path());
        paths.ensure("node1", &[]).unwrap();
        // A "cluster CA": another node's local CA signing this node's CSR.
        let other = CertPaths::new(dir.path().join("cp"));
        other.ensure("cp", &[]).unwrap();
        let csr = CertificateSigningRequestParams::from_pem(&paths.node_csr("node1").unwrap()).unwrap();
        let mut params = CertificateParams::new(vec!["node1".to_owned()]).unwrap();
        params.distinguished_name = name("node1", None);
        let signed = params.signed_by(&csr.public_key, &other.issuer().unwrap()).unwrap().pem();
        let cluster_ca = fs::read_to_string(other.local_ca()).unwrap();

        let stranger = fs::read_to_string(other.node_cert()).unwrap();
        let err = paths.install_cluster(&cluster_ca, &stranger).unwrap_err().to_string();
        assert_eq!(err, "node_certificate_pem: is not for this node's key");
        assert!(!paths.cluster_ca().exists(), "nothing installed after a refusal");
        assert_eq!(paths.install_cluster("", "").unwrap_err().to_string(), "cluster_ca_pem: holds no PEM certificate");

        let state = TlsState::load(paths.clone()).unwrap();
        paths.install_cluster(&cluster_ca, &signed).unwrap();
        assert!(state.reload_if_changed(false), "new files are noticed");
        assert!(!state.reload_if_changed(false), "unchanged files are not reloaded");
        fs::write(paths.node_cert(), "garbage").unwrap();
        assert!(!state.reload_if_changed(false), "a broken file keeps the old configuration");
    }
}
