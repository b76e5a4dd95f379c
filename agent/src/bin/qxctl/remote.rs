//! Where qxctl talks to: the local unix socket, or a node's TCP listener over mutual TLS (`--remote` with
//! `--cert`, `--key`, `--ca`, or a context file `~/.config/quantix/contexts/NAME.yaml` named by `--context`), and
//! `qxctl node cert issue`, which makes an operator key and has the node-local CA sign it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_client::HostServiceClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach a node; the unix socket unless `--remote` or `--context` says otherwise.
#[derive(Debug, Args)]
pub struct Target {
    /// The node's API socket.
    #[arg(long, global = true, env = "QX_SOCKET", default_value = qx_agent::client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// A node's TCP listener, HOST:PORT, over mutual TLS (needs --cert, --key and --ca).
    #[arg(long, global = true, env = "QX_REMOTE", requires_all = ["cert", "key", "ca"])]
    pub remote: Option<String>,
    /// The client certificate (PEM) for --remote, e.g. from `qxctl node cert issue`.
    #[arg(long, global = true, env = "QX_CERT")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "QX_KEY")]
    pub key: Option<PathBuf>,
    /// The CA (PEM) that signed the node's certificate: the node-local CA, or the cluster CA.
    #[arg(long, global = true, env = "QX_CA")]
    pub ca: Option<PathBuf>,
    /// The name to verify the node's certificate against (default: HOST of --remote).
    #[arg(long, global = true, env = "QX_SERVER_NAME")]
    pub server_name: Option<String>,
    /// A saved remote: ~/.config/quantix/contexts/NAME.yaml (remote, cert, key, ca, server_name).
    #[arg(long, global = true, env = "QX_CONTEXT", conflicts_with = "remote")]
    pub context: Option<String>,
}

/// A context file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteContext {
    pub remote: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("quantix"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".config/quantix"))
}

fn context_file(name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("--context {name:?} is not a context name");
    }
    Ok(config_dir()?.join("contexts").join(format!("{name}.yaml")))
}

impl Target {
    /// True when the commands go to the local socket.
    pub fn is_local(&self) -> bool {
        self.remote.is_none() && self.context.is_none()
    }

    /// A channel to the node: unix socket, or mutual TLS to a remote.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let remote = match (&self.remote, &self.context) {
            (Some(remote), _) => RemoteContext {
                remote: remote.clone(),
                cert: self.cert.clone().context("--remote needs --cert")?,
                key: self.key.clone().context("--remote needs --key")?,
                ca: self.ca.clone().context("--remote needs --ca")?,
                server_name: self.server_name.clone(),
            },
            (None, Some(name)) => {
                let file = context_file(name)?;
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read context {name:?} ({})", file.display()))?;
                let mut context: RemoteContext =
                    serde_norway::from_str(&text).with_context(|| format!("context file {}", file.display()))?;
                if self.server_name.is_some() {
                    context.server_name = self.server_name.clone();
                }
                context
            }
            (None, None) => {
                return qx_agent::client::channel(&self.socket)
                    .await
                    .with_context(|| format!("cannot reach qx-node at {} (is it running?)", self.socket.display()))
            }
        };
        remote_channel(&remote).await
    }
}

async fn remote_channel(remote: &RemoteContext) -> anyhow::Result<Channel> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
    };
    let host = remote
        .remote
        .rsplit_once(':')
        .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
        .filter(|host| !host.is_empty())
        .with_context(|| format!("--remote {:?} is not HOST:PORT", remote.remote))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&remote.ca, "CA")?))
        .identity(Identity::from_pem(read(&remote.cert, "certificate")?, read(&remote.key, "key")?))
        .domain_name(remote.server_name.clone().unwrap_or_else(|| host.to_owned()));
    let endpoint = Endpoint::from_shared(format!("https://{}", remote.remote))
        .with_context(|| format!("--remote {:?} is not HOST:PORT", remote.remote))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .tls_config(tls)?;
    endpoint.connect().await.with_context(|| format!("cannot reach qx-node at {} over TLS", remote.remote))
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Make an operator key here and have the node-local CA sign its certificate (on the node: the unix socket).
    /// Writes key.pem, cert.pem and ca.pem (mode 0600) and a context file for `qxctl --context NAME`.
    Issue {
        /// The certificate's name (its subject common name).
        name: String,
        /// admin, or read-only (Get, List and Watch calls only).
        #[arg(long, default_value = "admin")]
        role: String,
        /// Validity in days (1-3650).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Where the files go (default: ~/.config/quantix/certs/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The HOST:PORT remote clients use for this node, for the context file (default: the node's
        /// management address and TCP port, when it has a TCP listener).
        #[arg(long)]
        address: Option<String>,
    },
}

pub async fn cert(target: &Target, command: CertCommand, json: bool) -> anyhow::Result<()> {
    let CertCommand::Issue { name, role, days, out, address } = command;
    if !target.is_local() {
        bail!("node cert issue runs on the node itself: it calls HostService, which only the unix socket serves");
    }
    let (key_pem, csr_pem) = qx_agent::certs::new_key_and_csr(&name)?;
    let mut host = HostServiceClient::new(target.channel().await?);
    let request = pb::IssueClientCertificateRequest { name: name.clone(), role: role.clone(), days, csr_pem };
    let issued = host.issue_client_certificate(request).await?.into_inner();
    let address = match address {
        Some(address) => Some(address),
        None => {
            let status = host.get_host_status(pb::GetHostStatusRequest {}).await?.into_inner();
            // A member's management URL is its control plane's (http or https); grpcs:// is this node's TLS listener.
            status.management_url.strip_prefix("grpcs://").map(str::to_owned)
        }
    };
    let dir = match out {
        Some(dir) => dir,
        None => config_dir()?.join("certs").join(&name),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let (key, cert, ca) = (dir.join("key.pem"), dir.join("cert.pem"), dir.join("ca.pem"));
    write_private(&key, key_pem.as_bytes())?;
    write_private(&cert, issued.certificate_pem.as_bytes())?;
    write_private(&ca, issued.ca_pem.as_bytes())?;
    let server_name = issued.node_names.first().cloned();
    let context = address.as_ref().map(|remote| RemoteContext {
        remote: remote.clone(),
        cert: cert.clone(),
        key: key.clone(),
        ca: ca.clone(),
        server_name: server_name.clone(),
    });
    let context_path = match &context {
        Some(context) => {
            let path = context_file(&name)?;
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
            }
            write_private(&path, serde_norway::to_string(context)?.as_bytes())?;
            Some(path)
        }
        None => None,
    };
    if json {
        let value = serde_json::json!({
            "name": name, "role": role, "key": key, "cert": cert, "ca": ca, "context": context_path,
            "node_names": issued.node_names,
        });
        println!("{value}");
        return Ok(());
    }
    println!("key:     {}", key.display());
    println!("cert:    {}", cert.display());
    println!("ca:      {}", ca.display());
    println!("node certificate names: {}", issued.node_names.join(", "));
    match (context_path, address) {
        (Some(path), Some(_)) => {
            println!("context: {}", path.display());
            println!("use:     qxctl --context {name} vm list");
        }
        _ => {
            let server = server_name.unwrap_or_default();
            println!(
                "use:     qxctl --remote HOST:PORT --server-name {server} --cert {} --key {} --ca {} vm list",
                cert.display(),
                key.display(),
                ca.display()
            );
        }
    }
    Ok(())
}

/// Writes a file only its owner can read (0600), replacing it atomically.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
