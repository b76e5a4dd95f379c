//! `qx-node`: the Quantix node daemon.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use qx_agent::config::NodeConfig;
use qx_agent::host::{logring, update};
use qx_agent::node::Node;
use qx_agent::server;
use qx_vmm::spec::AccelChoice;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How long a shutdown or restart waits for open calls (a console, an event stream) to finish before going ahead.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs and supervises QEMU VMs on this host and serves the Quantix node API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// YAML config file (default: /etc/quantix/node.yaml when it exists; built-in defaults otherwise).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_name: Option<String>,
    /// Where VM specs, state and logs live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The API's unix socket.
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Also serve the API on this TCP address.
    #[arg(long)]
    listen_tcp: Option<SocketAddr>,
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Also allow VM disks, kernels, initrds and image imports under this host path (added to allowed_paths;
    /// repeatable).
    #[arg(long = "allow-path", value_name = "PATH")]
    allow_paths: Vec<PathBuf>,
    /// auto, kvm or tcg.
    #[arg(long)]
    accel: Option<String>,
    /// Read a password from standard input (one line), print its argon2id hash for ui.admin_password_hash, and
    /// exit.
    #[arg(long)]
    hash_password: bool,
    /// Print the nft commands that open exactly the ports this configuration serves in the host firewall
    /// (/usr/share/quantix/firewall.nft's sets), and exit. /etc/init.d/firewall runs it.
    #[arg(long)]
    firewall_ports: bool,
    /// tracing filter, e.g. `info`, `qx_vmm=debug`.
    #[arg(long, env = "QX_LOG", default_value = "info")]
    log: String,
}

impl Args {
    fn into_config(self) -> anyhow::Result<NodeConfig> {
        let mut config = NodeConfig::load(self.config.as_deref())?;
        if let Some(name) = self.node_name {
            config.node_name = name;
        }
        if let Some(dir) = self.data_dir {
            config.data_dir = dir;
        }
        if let Some(socket) = self.listen {
            config.listen.unix = socket;
        }
        if let Some(addr) = self.listen_tcp {
            config.listen.tcp = Some(addr);
        }
        if let Some(qemu) = self.qemu {
            config.qemu_binary = qemu;
        }
        config.allowed_paths.extend(self.allow_paths);
        if let Some(accel) = self.accel {
            config.accelerator = match accel.as_str() {
                "auto" => AccelChoice::Auto,
                "kvm" => AccelChoice::Kvm,
                "tcg" => AccelChoice::Tcg,
                other => anyhow::bail!("--accel: {other:?} is not one of auto, kvm, tcg"),
            };
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.hash_password {
        let mut password = String::new();
        std::io::stdin().read_line(&mut password).context("cannot read the password from standard input")?;
        let password = password.strip_suffix('\n').unwrap_or(&password);
        anyhow::ensure!(!password.is_empty(), "--hash-password: the password on standard input is empty");
        println!("{}", qx_agent::ui::auth::hash_password(password).map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    if args.firewall_ports {
        let config = args.into_config()?;
        print!("{}", qx_agent::host::firewall::OpenPorts::of(&config).nft_commands());
        return Ok(());
    }
    // stderr, and the in-memory ring that GetDiagnostics reads.
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(&args.log))
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(logring::layer(logring::global()))
        .init();
    let config = args.into_config()?;
    // Two workers: VM operations are I/O-bound waits on QEMU, and a small daemon is part of the product.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(config))
}

async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let lock = server::lock_data_dir(&config.data_dir)?;
    let listener = server::bind_unix(&config.listen.unix).await?;
    let node = Arc::new(Node::open(config).await.context("cannot start the node")?);
    // An update's first boot becomes the default once this daemon answers on its socket.
    let health = Arc::clone(&node);
    let socket = health.config().listen.unix.clone();
    tokio::spawn(async move { update::report_health_when_serving(health.host().updates(), socket).await });
    let mut restart = node.host().restart_requested();
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!("shutting down; VMs keep running"),
            _ = int.recv() => info!("shutting down; VMs keep running"),
            _ = restart.wait_for(|requested| *requested) => info!("restarting; VMs keep running"),
        }
        let _ = stopping_tx.send(true);
    };
    // Streams (a console, an event watch) never end by themselves; they get a moment, not a veto.
    let grace = async move {
        if stopping.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server::serve(Arc::clone(&node), listener, shutdown) => served?,
        () = grace => warn!("calls still open after {} s; going ahead", SHUTDOWN_GRACE.as_secs()),
    }
    // VMs outlive the daemon; its idle warm QEMUs do not.
    node.vms().drain_warm_pool().await;
    if *node.host().restart_requested().borrow() {
        drop(lock);
        return Err(anyhow::Error::new(re_exec()).context("cannot re-execute qx-node"));
    }
    Ok(())
}

/// Replaces this process with a fresh qx-node: same PID, same argv and environment. The QEMUs stay our children
/// and the new image reattaches to them (and reaps them when they exit) like after any restart. Returns only on
/// failure. Every fd qx-node opens is close-on-exec, so the listeners and the data-dir lock go with the old image.
fn re_exec() -> std::io::Error {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "qx-node".into());
    info!("re-executing qx-node");
    std::process::Command::new("/proc/self/exe").arg0(argv0).args(args).exec()
}
