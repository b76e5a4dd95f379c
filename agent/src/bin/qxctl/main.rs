//! `qxctl`: the command-line client of a Quantix node.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use crate::storage::{ImageCommand, PoolCommand, VolumeCommand};

mod clock;
mod guest;
mod migrate;
mod progress;
mod remote;
mod sg;
mod snapshot;
mod storage;
mod system;

/// Ctrl-]: leaves `vm console` without touching the guest, as telnet and virsh do.
const DETACH_KEY: u8 = 0x1d;

#[derive(Debug, Parser)]
#[command(version, about = "Manage the VMs of a Quantix node")]
struct Cli {
    #[command(flatten)]
    target: remote::Target,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum Command {
    /// The node itself.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Node networks: an Open vSwitch bridge and VLAN for VM NICs.
    Network {
        #[command(subcommand)]
        command: NetworkCommand,
    },
    /// Security groups: allow rules for VM NICs on OVN networks (`security_groups` in a NIC's spec).
    Sg {
        #[command(subcommand)]
        command: sg::SgCommand,
    },
    /// Storage pools: capacity and usage.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Volumes of a storage pool ("default" unless --pool): VM disks, named "pool/name" in specs.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// The image library of a storage pool: ISOs, cloud images, templates.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// The host's A/B systems: status and updates.
    System {
        #[command(subcommand)]
        command: system::SystemCommand,
    },
    /// Follow VM state changes, one line each: local time, VM, previous -> new state, reason.
    Events {
        /// Only this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Print a shell completion script: `source <(qxctl completions bash)`, or save it where the shell looks
    /// (`/usr/share/bash-completion/completions/qxctl`, a directory of `$fpath` as `_qxctl`,
    /// `~/.config/fish/completions/qxctl.fish`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    List,
    Create {
        name: String,
        /// ovs (a bridge and VLAN on this host) or ovn (an OVN logical switch spanning nodes).
        #[arg(long, default_value = "ovs")]
        kind: String,
        /// ovs: the Open vSwitch bridge (created when missing).
        #[arg(long, default_value = "")]
        bridge: String,
        /// ovs: access VLAN (1-4094) of the VM ports; untagged when absent.
        #[arg(long)]
        vlan: Option<u32>,
        #[arg(long)]
        mtu: Option<u32>,
        /// ovn: the logical switch (default: the network's name).
        #[arg(long = "switch", default_value = "")]
        logical_switch: String,
        /// ovn: the IPv4 subnet, a.b.c.d/len.
        #[arg(long, default_value = "")]
        subnet: String,
        /// ovn: the default gateway DHCP hands out.
        #[arg(long, default_value = "")]
        gateway: String,
        /// ovn: a DNS server DHCP hands out; repeatable.
        #[arg(long = "dns")]
        dns_servers: Vec<String>,
        /// ovn: no DHCP on the subnet.
        #[arg(long)]
        no_dhcp: bool,
    },
    /// Refused while a VM names the network.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Host CPU, memory, QEMU and accelerator.
    Info,
    /// The host's PCI devices: ids and names, driver, IOMMU group, SR-IOV, and which ones the host keeps.
    Devices,
    /// Operator certificates for the TCP listener (mutual TLS).
    Cert {
        #[command(subcommand)]
        command: remote::CertCommand,
    },
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum VmCommand {
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Define a VM from a YAML/JSON spec file or from flags.
    Create(CreateArgs),
    /// Replace a stopped VM's spec from a YAML/JSON spec file.
    Update {
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Start a stopped VM.
    Start {
        name: String,
        /// Leave it paused before its first instruction, every device plugged (`vm resume` runs it).
        #[arg(long)]
        paused: bool,
    },
    /// Graceful stop (ACPI power button, then quit, then kill), or --force.
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest (default: the node's).
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Reboot a running VM: the ACPI power button, then a reset (at once if the guest ignores the button).
    Reboot { name: String },
    /// Hard reset of a running or paused VM, like the reset button: the guest gets no warning.
    Reset { name: String },
    /// Pause the vCPUs; memory and devices stay as they are.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Delete a stopped or crashed VM's definition and its directory on the node.
    Delete { name: String },
    /// Disks of a VM: attach (hotplug when running) or detach.
    Disk {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// NICs of a VM: attach (hotplug when running) or detach.
    Nic {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Change vCPUs or memory (hotplug when running, up to max_vcpus / max_memory_mib).
    Set {
        name: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// MiB.
        #[arg(long)]
        memory: Option<u64>,
    },
    /// Live-migrate a running VM to another node (Ctrl-C cancels while in precopy).
    Migrate(migrate::MigrateArgs),
    /// Cancel a running VM's migration; it keeps running on this node.
    MigrateCancel { name: String },
    /// The guest agent of a running VM: info, exec, files, passwords.
    Guest {
        #[command(subcommand)]
        command: guest::GuestCommand,
    },
    /// Snapshots of a VM's disks, with or without its memory: create, list, revert, delete.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Attach to the serial console (detach with Ctrl-]).
    Console {
        name: String,
        /// Print the recent console output and exit.
        #[arg(long)]
        dump: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Disk: PATH|volume=POOL/NAME[,id=ID][,format=..][,ro][,cache=..][,aio=..]; NIC: user|network=NAME[,id=ID][,mac=MAC][,ipv4=ADDR][,sg=GROUP].
    Attach { name: String, device: String },
    /// Detach the device with this id, waiting --timeout seconds (default 10) for the guest to release it.
    Detach {
        name: String,
        id: String,
        #[arg(long)]
        timeout: Option<u32>,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// A YAML or JSON spec (as in docs); other flags are then not allowed.
    #[arg(long, short, conflicts_with_all = ["name", "kernel", "disk"])]
    file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    name: Option<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    #[arg(long, default_value = "q35")]
    machine: String,
    /// CPU model (a QEMU model, or host under KVM); default: the node's default model.
    #[arg(long)]
    cpu: Option<String>,
    /// vCPUs the VM may grow to while running.
    #[arg(long)]
    max_vcpus: Option<u32>,
    /// MiB the VM may grow to while running.
    #[arg(long)]
    max_memory: Option<u64>,
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// seabios or uefi (OVMF, with the VM's own NVRAM).
    #[arg(long, default_value = "seabios")]
    firmware: String,
    /// UEFI Secure Boot with Microsoft's keys enrolled (with --firmware uefi).
    #[arg(long)]
    secure_boot: bool,
    /// A TPM 2.0 (swtpm), as Windows 11 requires.
    #[arg(long)]
    tpm: bool,
    /// Host CPUs for the next vCPU (e.g. 2 or 2-3), once per vCPU in order.
    #[arg(long = "pin-vcpu", value_name = "CPUS")]
    pin_vcpu: Vec<String>,
    /// Host CPUs for QEMU's other threads (main loop, I/O).
    #[arg(long, value_name = "CPUS")]
    emulator_cpus: Option<String>,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// PATH or volume=POOL/NAME, then [,format=raw|qcow2][,ro][,cache=MODE][,aio=MODE]; repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// user or network=NAME, then [,mac=MAC]; ovn networks also [,ipv4=ADDR] (static) and [,sg=GROUP]...
    /// (security groups); repeatable.
    #[arg(long)]
    nic: Vec<String>,
    #[arg(long)]
    vnc: Option<u32>,
    /// KEY=VALUE; repeatable.
    #[arg(long)]
    label: Vec<String>,
    #[arg(long)]
    no_serial: bool,
    /// cloud-init: the guest's hostname (default: the VM name).
    #[arg(long)]
    hostname: Option<String>,
    /// cloud-init: a user to create, with --ssh-key keys and passwordless sudo.
    #[arg(long)]
    user: Option<String>,
    /// cloud-init: a file holding OpenSSH public keys for --user; repeatable.
    #[arg(long, requires = "user")]
    ssh_key: Vec<PathBuf>,
    /// Start the VM once it is created.
    #[arg(long)]
    start: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    clock::read_local_offset();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let message = match e.downcast_ref::<tonic::Status>() {
            Some(status) => format!("{:?}: {}", status.code(), status.message()),
            None => format!("{e:#}"),
        };
        eprintln!("qxctl: {message}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "qxctl", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Node { command: NodeCommand::Cert { command } } = cli.command {
        return remote::cert(&cli.target, command, json).await;
    }
    let channel = cli.target.channel().await?;
    let mut node = NodeServiceClient::new(channel.clone());
    match cli.command {
        Command::Node { command: NodeCommand::Cert { .. } } | Command::Completions { .. } => {
            unreachable!("handled above")
        }
        Command::Node { command: NodeCommand::Info } => {
            let info = node.get_node_info(pb::GetNodeInfoRequest {}).await?.into_inner();
            print_node(&info, json);
        }
        Command::Node { command: NodeCommand::Devices } => {
            let devices = node.list_host_devices(pb::ListHostDevicesRequest {}).await?.into_inner();
            print_host_devices(&devices, json);
        }
        Command::Events { vm } => events(&mut node, vm.unwrap_or_default(), json).await?,
        Command::Network { command } => network(&mut node, command, json).await?,
        Command::Sg { command } => sg::run(channel, command, json).await?,
        Command::Pool { command } => storage::pool(&mut node, command, json).await?,
        Command::Volume { command } => storage::volume(&mut node, command, json).await?,
        Command::Image { command } => storage::image(&mut node, command, json).await?,
        Command::Vm { command: VmCommand::Migrate(args) } => migrate::migrate(channel, args, json).await?,
        Command::Vm { command: VmCommand::MigrateCancel { name } } => migrate::cancel(channel, name).await?,
        Command::Vm { command: VmCommand::Guest { command } } => guest::run(channel, command, json).await?,
        Command::Vm { command: VmCommand::Snapshot { command } } => snapshot::run(channel, command, json).await?,
        Command::Vm { command } => vm(&mut node, command, json).await?,
        Command::System { command } => system::run(channel, command, json).await?,
    }
    Ok(())
}

async fn vm(node: &mut NodeServiceClient<Channel>, command: VmCommand, json: bool) -> anyhow::Result<()> {
    let name_ref = |name: String| pb::VmRef { name };
    let vm = match command {
        VmCommand::List => {
            let vms = node.list_vms(pb::ListVmsRequest {}).await?.into_inner().vms;
            print_list(&vms, json);
            return Ok(());
        }
        VmCommand::Show { name } => node.get_vm(name_ref(name)).await?,
        VmCommand::Create(args) => {
            let start = args.start;
            let vm = node.create_vm(create_request(args)?).await?.into_inner();
            let name = vm.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            if start {
                node.start_vm(pb::StartVmRequest { name, paused: false }).await?
            } else {
                tonic::Response::new(vm)
            }
        }
        VmCommand::Update { file } => {
            let spec_text = read_spec(&file)?;
            node.update_vm(pb::UpdateVmRequest { spec: None, spec_text }).await?
        }
        VmCommand::Start { name, paused } => node.start_vm(pb::StartVmRequest { name, paused }).await?,
        VmCommand::Stop { name, force, timeout } => {
            let request = pb::StopVmRequest { name, force, timeout_seconds: timeout.unwrap_or(0) };
            node.stop_vm(request).await?
        }
        VmCommand::Reboot { name } => node.reboot_vm(name_ref(name)).await?,
        VmCommand::Reset { name } => node.reset_vm(name_ref(name)).await?,
        VmCommand::Pause { name } => node.pause_vm(name_ref(name)).await?,
        VmCommand::Resume { name } => node.resume_vm(name_ref(name)).await?,
        VmCommand::Delete { name } => {
            node.delete_vm(name_ref(name.clone())).await?;
            if json {
                println!("{}", json!({ "deleted": name }));
            } else {
                println!("deleted {name}");
            }
            return Ok(());
        }
        VmCommand::Console { name, dump } => return console(node, name, dump).await,
        VmCommand::Migrate(_)
        | VmCommand::MigrateCancel { .. }
        | VmCommand::Guest { .. }
        | VmCommand::Snapshot { .. } => {
            unreachable!("handled in run")
        }
        VmCommand::Disk { command: DeviceCommand::Attach { name, device } } => {
            let disk = Some(parse_disk(&device)?);
            node.attach_disk(pb::AttachDiskRequest { vm: name, disk }).await?
        }
        VmCommand::Nic { command: DeviceCommand::Attach { name, device } } => {
            let nic = Some(parse_nic(&device)?);
            node.attach_nic(pb::AttachNicRequest { vm: name, nic }).await?
        }
        VmCommand::Disk { command: DeviceCommand::Detach { name, id, timeout } } => {
            node.detach_disk(pb::DetachDeviceRequest { vm: name, id, timeout_seconds: timeout.unwrap_or(0) }).await?
        }
        VmCommand::Nic { command: DeviceCommand::Detach { name, id, timeout } } => {
            node.detach_nic(pb::DetachDeviceRequest { vm: name, id, timeout_seconds: timeout.unwrap_or(0) }).await?
        }
        VmCommand::Set { name, vcpus, memory } => {
            if vcpus.is_none() && memory.is_none() {
                bail!("vm set: give --vcpus and/or --memory");
            }
            let mut vm = None;
            if let Some(vcpus) = vcpus {
                vm = Some(node.set_vcpus(pb::SetVcpusRequest { vm: name.clone(), vcpus }).await?);
            }
            if let Some(memory_mib) = memory {
                vm = Some(node.set_memory(pb::SetMemoryRequest { vm: name, memory_mib }).await?);
            }
            vm.expect("one was set")
        }
    };
    print_vm(&vm.into_inner(), json);
    Ok(())
}

async fn network(node: &mut NodeServiceClient<Channel>, command: NetworkCommand, json: bool) -> anyhow::Result<()> {
    let networks = match command {
        NetworkCommand::List => node.list_networks(pb::ListNetworksRequest {}).await?.into_inner().networks,
        NetworkCommand::Create {
            name,
            kind,
            bridge,
            vlan,
            mtu,
            logical_switch,
            subnet,
            gateway,
            dns_servers,
            no_dhcp,
        } => {
            let dhcp = (kind == "ovn").then_some(!no_dhcp);
            let request =
                pb::Network { name, kind, bridge, vlan, mtu, logical_switch, subnet, gateway, dns_servers, dhcp };
            vec![node.create_network(request).await?.into_inner()]
        }
        NetworkCommand::Delete { name } => {
            node.delete_network(pb::NetworkRef { name: name.clone() }).await?;
            println!("deleted {name}");
            return Ok(());
        }
    };
    let none = |v: Option<u32>| v.map_or("-".to_owned(), |v| v.to_string());
    if json {
        let list: Vec<Value> = networks
            .iter()
            .map(|n| {
                json!({
                    "name": n.name, "kind": n.kind, "bridge": n.bridge, "vlan": n.vlan, "mtu": n.mtu,
                    "logical_switch": n.logical_switch, "subnet": n.subnet, "gateway": n.gateway,
                    "dns_servers": n.dns_servers, "dhcp": n.dhcp,
                })
            })
            .collect();
        println!("{}", Value::Array(list));
        return Ok(());
    }
    println!("{:<20} {:<5} {:<16} {:>5} {:>6}  SUBNET", "NAME", "KIND", "BRIDGE/SWITCH", "VLAN", "MTU");
    for n in networks {
        let (on, subnet) = if n.kind == "ovn" {
            let switch = if n.logical_switch.is_empty() { n.name.clone() } else { n.logical_switch.clone() };
            let dhcp = if n.dhcp == Some(false) { "" } else { " dhcp" };
            (switch, format!("{}{dhcp}", n.subnet))
        } else {
            (n.bridge.clone(), "-".to_owned())
        };
        let kind = if n.kind.is_empty() { "ovs" } else { n.kind.as_str() };
        println!("{:<20} {:<5} {:<16} {:>5} {:>6}  {subnet}", n.name, kind, on, none(n.vlan), none(n.mtu));
    }
    Ok(())
}

fn read_spec(file: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read spec file {}", file.display()))
}

/// `PATH|volume=POOL/NAME[,id=ID][,format=raw|qcow2][,ro][,cache=MODE][,aio=MODE]`.
fn parse_disk(text: &str) -> anyhow::Result<pb::Disk> {
    let mut parts = text.split(',');
    let first = parts.next().unwrap_or_default();
    let mut disk = match first.strip_prefix("volume=") {
        Some(volume) => pb::Disk { volume: volume.to_owned(), ..Default::default() },
        None => pb::Disk { path: first.to_owned(), ..Default::default() },
    };
    for option in parts {
        match option.split_once('=') {
            Some(("id", id)) => disk.id = id.to_owned(),
            Some(("format", "raw")) => disk.format = pb::DiskFormat::Raw as i32,
            Some(("format", "qcow2")) => disk.format = pb::DiskFormat::Qcow2 as i32,
            Some(("cache", mode)) => disk.cache = mode.to_owned(),
            Some(("aio", mode)) => disk.aio = mode.to_owned(),
            None if option == "ro" => disk.read_only = true,
            _ => bail!("{option:?} is not one of id=ID, format=raw|qcow2, ro, cache=MODE, aio=MODE"),
        }
    }
    Ok(disk)
}

/// `user|network=NAME[,id=ID][,mac=MAC][,ipv4=ADDR][,sg=GROUP]...`.
fn parse_nic(text: &str) -> anyhow::Result<pb::Nic> {
    let mut nic = pb::Nic { kind: "user".into(), ..Default::default() };
    for option in text.split(',') {
        match option.split_once('=') {
            None if option == "user" => {}
            Some(("network", network)) => {
                nic.kind = "network".into();
                nic.network = network.to_owned();
            }
            Some(("mac", mac)) => nic.mac = mac.to_owned(),
            Some(("id", id)) => nic.id = id.to_owned(),
            Some(("ipv4", ip)) => nic.ipv4 = ip.to_owned(),
            Some(("sg", group)) => nic.security_groups.push(group.to_owned()),
            _ => bail!("{option:?} is not one of user, network=NAME, id=ID, mac=MAC, ipv4=ADDR, sg=GROUP"),
        }
    }
    Ok(nic)
}

fn create_request(args: CreateArgs) -> anyhow::Result<pb::CreateVmRequest> {
    if let Some(file) = &args.file {
        return Ok(pb::CreateVmRequest { spec: None, spec_text: read_spec(file)? });
    }
    let mut disks = Vec::new();
    for (i, text) in args.disk.iter().enumerate() {
        disks.push(parse_disk(text).with_context(|| format!("--disk #{}", i + 1))?);
    }
    let mut nics = Vec::new();
    for text in &args.nic {
        nics.push(parse_nic(text).with_context(|| format!("--nic {text:?}"))?);
    }
    let mut labels = std::collections::HashMap::new();
    for label in &args.label {
        let (key, value) = label.split_once('=').with_context(|| format!("--label {label:?} is not KEY=VALUE"))?;
        labels.insert(key.to_owned(), value.to_owned());
    }
    let mut keys = Vec::new();
    for file in &args.ssh_key {
        let text = std::fs::read_to_string(file).with_context(|| format!("--ssh-key {}", file.display()))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    let users: Vec<pb::CloudInitUser> = args
        .user
        .map(|name| pb::CloudInitUser {
            name,
            ssh_authorized_keys: keys,
            sudo: "ALL=(ALL) NOPASSWD:ALL".into(),
            shell: "/bin/bash".into(),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let cloud_init = (args.hostname.is_some() || !users.is_empty()).then(|| pb::CloudInit {
        hostname: args.hostname.unwrap_or_default(),
        users,
        ..Default::default()
    });
    let spec = pb::VmSpec {
        name: args.name.unwrap_or_default(),
        uuid: String::new(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        machine: args.machine,
        accelerator: args.accel,
        firmware: args.firmware,
        secure_boot: args.secure_boot,
        tpm: args.tpm,
        placement: (!args.pin_vcpu.is_empty() || args.emulator_cpus.is_some())
            .then(|| pb::Placement { vcpu_cpus: args.pin_vcpu, emulator_cpus: args.emulator_cpus.unwrap_or_default() }),
        kernel_boot: args.kernel.map(|kernel| pb::KernelBoot {
            kernel: kernel.display().to_string(),
            initrd: args.initrd.map(|i| i.display().to_string()).unwrap_or_default(),
            cmdline: args.cmdline.unwrap_or_default(),
        }),
        disks,
        nics,
        serial: Some(!args.no_serial),
        vnc_display: args.vnc,
        labels,
        cloud_init,
        cpu: args.cpu.unwrap_or_default(),
        max_vcpus: args.max_vcpus,
        max_memory_mib: args.max_memory,
    };
    Ok(pb::CreateVmRequest { spec: Some(spec), spec_text: String::new() })
}

async fn events(node: &mut NodeServiceClient<Channel>, vm: String, json: bool) -> anyhow::Result<()> {
    let mut stream = node.watch_events(pb::WatchEventsRequest { vm }).await?.into_inner();
    while let Some(event) = stream.message().await? {
        if json {
            println!("{}", event_json(&event));
        } else {
            let state = state_name(event.state);
            let previous = state_name(event.previous);
            let at = clock::time_of_day(event.at_unix_ms);
            println!("{at}  {:<16} {previous} -> {state}  {}", event.vm, event.reason);
        }
    }
    Ok(())
}

/// Restores the terminal when the console session ends, however it ends.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        let stdin = rustix::stdio::stdin();
        let saved = rustix::termios::tcgetattr(stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(rustix::stdio::stdin(), rustix::termios::OptionalActions::Now, &self.0);
    }
}

async fn console(node: &mut NodeServiceClient<Channel>, vm: String, dump: bool) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsoleInput>(16);
    tx.send(pb::ConsoleInput { vm: vm.clone(), history: true, data: Vec::new() }).await?;
    let mut output = node.console(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut stdout = std::io::stdout();
    if dump {
        // History arrives at once; stop when the node has nothing more to say.
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_millis(500), output.next()).await {
            stdout.write_all(&chunk.data)?;
        }
        stdout.flush()?;
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to the serial console of {vm}. Detach with Ctrl-].\r");
    }
    let _raw = interactive.then(RawMode::enter).flatten();
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return Input::Ended,
                Ok(n) => n,
            };
            let (data, detach) = match buf[..n].iter().position(|b| *b == DETACH_KEY) {
                Some(at) => (&buf[..at], true),
                None => (&buf[..n], false),
            };
            if !data.is_empty()
                && tx.send(pb::ConsoleInput { data: data.to_vec(), ..Default::default() }).await.is_err()
            {
                return Input::Ended;
            }
            if detach {
                return Input::Detached;
            }
        }
    });
    let mut print = |chunk: pb::ConsoleOutput| stdout.write_all(&chunk.data).and_then(|()| stdout.flush());
    let input = tokio::select! {
        input = input => input.unwrap_or(Input::Ended),
        _ = async {
            while let Some(Ok(chunk)) = output.next().await {
                if print(chunk).is_err() {
                    break;
                }
            }
        } => return Ok(()),
    };
    match input {
        Input::Detached => eprintln!("\r\nDetached from {vm}.\r"),
        // Piped input ran out: show what the guest answers until it falls quiet.
        Input::Ended => {
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(1), output.next()).await {
                print(chunk)?;
            }
        }
    }
    Ok(())
}

enum Input {
    Detached,
    Ended,
}

fn state_name(state: i32) -> &'static str {
    match pb::VmState::try_from(state) {
        Ok(pb::VmState::Stopped) => "stopped",
        Ok(pb::VmState::Starting) => "starting",
        Ok(pb::VmState::Running) => "running",
        Ok(pb::VmState::Paused) => "paused",
        Ok(pb::VmState::Stopping) => "stopping",
        Ok(pb::VmState::Crashed) => "crashed",
        Ok(pb::VmState::Migrating) => "migrating",
        Ok(pb::VmState::Incoming) => "incoming",
        _ => "-",
    }
}

/// The root port device `id` sits on, when it has one.
fn root_port(vm: &pb::Vm, id: &str) -> Option<u32> {
    vm.devices.iter().find(|d| d.id == id).map(|d| d.root_port).filter(|port| *port != 0)
}

/// ` on rpN` for a device on a root port.
fn port_text(vm: &pb::Vm, id: &str) -> String {
    root_port(vm, id).map(|port| format!(" on rp{port}")).unwrap_or_default()
}

fn vm_json(vm: &pb::Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    let runtime = vm.runtime.clone().unwrap_or_default();
    json!({
        "name": spec.name,
        "uuid": spec.uuid,
        "state": state_name(vm.state),
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "machine": spec.machine,
        "cpu": spec.cpu,
        "max_vcpus": spec.max_vcpus,
        "max_memory_mib": spec.max_memory_mib,
        "accelerator": spec.accelerator,
        "firmware": spec.firmware,
        "secure_boot": spec.secure_boot,
        "tpm": spec.tpm,
        "placement": spec.placement.as_ref().map(|p| json!({ "vcpu_cpus": p.vcpu_cpus, "emulator_cpus": p.emulator_cpus })),
        "kernel": spec.kernel_boot.map(|k| json!({ "kernel": k.kernel, "initrd": k.initrd, "cmdline": k.cmdline })),
        "disks": spec.disks.iter().map(|d| json!({
            "id": d.id,
            "root_port": root_port(vm, &d.id),
            "path": d.path,
            "format": if d.format == pb::DiskFormat::Qcow2 as i32 { "qcow2" } else { "raw" },
            "read_only": d.read_only, "cache": d.cache, "aio": d.aio,
        })).collect::<Vec<_>>(),
        "nics": spec.nics.iter().map(|n| json!({
            "id": n.id, "root_port": root_port(vm, &n.id), "kind": n.kind, "network": n.network, "mac": n.mac,
        })).collect::<Vec<_>>(),
        "root_ports": vm.root_ports,
        "serial": spec.serial.unwrap_or(true),
        "vnc_display": spec.vnc_display,
        "labels": spec.labels,
        "pid": (runtime.pid != 0).then_some(runtime.pid),
        "started_at_unix": (runtime.started_at_unix != 0).then_some(runtime.started_at_unix),
        "running_accelerator": runtime.accelerator,
        "reason": runtime.last_reason,
        "guest_agent": runtime.guest_agent.map(|a| json!({
            "state": guest::agent_state_name(a.state), "version": a.version, "reason": a.reason,
        })),
    })
}

fn event_json(event: &pb::VmEvent) -> Value {
    json!({
        "vm": event.vm,
        "state": state_name(event.state),
        "previous": state_name(event.previous),
        "reason": event.reason,
        "at_unix_ms": event.at_unix_ms,
    })
}

fn print_list(vms: &[pb::Vm], json: bool) {
    if json {
        println!("{}", Value::Array(vms.iter().map(vm_json).collect()));
        return;
    }
    println!("{:<20} {:<9} {:>5} {:>8} {:>8} {:<5}", "NAME", "STATE", "VCPUS", "MEMORY", "PID", "ACCEL");
    for vm in vms {
        let spec = vm.spec.clone().unwrap_or_default();
        let runtime = vm.runtime.clone().unwrap_or_default();
        let pid = if runtime.pid == 0 { "-".to_owned() } else { runtime.pid.to_string() };
        let accel = if runtime.accelerator.is_empty() { "-".to_owned() } else { runtime.accelerator };
        println!(
            "{:<20} {:<9} {:>5} {:>6}Mi {:>8} {:<5}",
            spec.name,
            state_name(vm.state),
            spec.vcpus,
            spec.memory_mib,
            pid,
            accel
        );
    }
}

fn print_host_devices(reply: &pb::ListHostDevicesResponse, json: bool) {
    if json {
        let devices: Vec<Value> = reply
            .devices
            .iter()
            .map(|d| {
                json!({
                    "address": d.address, "vendor_id": format!("{:04x}", d.vendor_id),
                    "device_id": format!("{:04x}", d.device_id), "vendor": d.vendor_name, "device": d.device_name,
                    "class": format!("{:06x}", d.class_code), "class_name": d.class_name, "driver": d.driver,
                    "numa_node": d.numa_node, "iommu_group": d.iommu_group, "iommu_group_peers": d.iommu_group_peers,
                    "sriov_total_vfs": d.sriov_total_vfs, "sriov_num_vfs": d.sriov_num_vfs, "physfn": d.physfn,
                    "net_interfaces": d.net_interfaces, "bridge": d.bridge, "host_use": d.host_use,
                })
            })
            .collect();
        println!("{}", json!({ "iommu_enabled": reply.iommu_enabled, "devices": devices }));
        return;
    }
    if !reply.iommu_enabled {
        println!("IOMMU off: no device can be passed through");
    }
    println!("{:<13} {:<9} {:<12} {:<5} {:<30} AVAILABLE", "ADDRESS", "ID", "DRIVER", "GROUP", "DEVICE");
    for d in &reply.devices {
        let name = match (d.vendor_name.as_str(), d.device_name.as_str()) {
            ("", _) if d.class_name.is_empty() => format!("class {:06x}", d.class_code),
            ("", _) => d.class_name.clone(),
            (vendor, "") => vendor.to_owned(),
            (vendor, device) => format!("{vendor} {device}"),
        };
        let available = if d.bridge {
            "no: a bridge".to_owned()
        } else if !d.host_use.is_empty() {
            format!("no: {}", d.host_use)
        } else {
            "yes".to_owned()
        };
        let group = d.iommu_group.map_or_else(|| "-".to_owned(), |g| g.to_string());
        let driver = if d.driver.is_empty() { "-" } else { &d.driver };
        let id = format!("{:04x}:{:04x}", d.vendor_id, d.device_id);
        println!("{:<13} {id:<9} {driver:<12} {group:<5} {:<30} {available}", d.address, shorten_name(&name, 30));
    }
}

/// `name` cut to `max` characters, with an ellipsis when cut.
fn shorten_name(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        return name.to_owned();
    }
    let mut cut: String = name.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

fn print_vm(vm: &pb::Vm, json: bool) {
    if json {
        println!("{}", vm_json(vm));
        return;
    }
    let spec = vm.spec.clone().unwrap_or_default();
    let runtime = vm.runtime.clone().unwrap_or_default();
    let mut rows = vec![
        ("name", spec.name),
        ("uuid", spec.uuid),
        ("state", state_name(vm.state).to_owned()),
        ("reason", runtime.last_reason),
    ];
    if runtime.pid != 0 {
        rows.push(("pid", runtime.pid.to_string()));
        rows.push(("accelerator", runtime.accelerator));
        if let Some(agent) = &runtime.guest_agent {
            let state = guest::agent_state_name(agent.state);
            let text = if agent.version.is_empty() { state.to_owned() } else { format!("{state} ({})", agent.version) };
            rows.push(("guest agent", text));
        }
    } else {
        rows.push(("accelerator", spec.accelerator));
    }
    let max = |max: Option<u64>, now: u64, unit: &str| match max {
        Some(max) if max > now => format!("{now}{unit} (max {max}{unit})"),
        _ => format!("{now}{unit}"),
    };
    let secure = if spec.secure_boot { " (Secure Boot)" } else { "" };
    rows.push(("firmware", format!("{}{secure}", spec.firmware)));
    if spec.tpm {
        rows.push(("tpm", "TPM 2.0 (swtpm)".to_owned()));
    }
    if let Some(placement) = &spec.placement {
        let vcpus: Vec<String> =
            placement.vcpu_cpus.iter().enumerate().map(|(i, cpus)| format!("vCPU {i} on {cpus}")).collect();
        if !vcpus.is_empty() {
            rows.push(("pinning", vcpus.join(", ")));
        }
        if !placement.emulator_cpus.is_empty() {
            rows.push(("emulator cpus", placement.emulator_cpus.clone()));
        }
    }
    rows.push(("vcpus", max(spec.max_vcpus.map(u64::from), u64::from(spec.vcpus), "")));
    rows.push(("memory", max(spec.max_memory_mib, spec.memory_mib, " MiB")));
    rows.push(("machine", spec.machine));
    if !spec.cpu.is_empty() {
        rows.push(("cpu", spec.cpu));
    }
    if let Some(kernel) = spec.kernel_boot {
        rows.push(("kernel", kernel.kernel));
        rows.push(("initrd", kernel.initrd));
        rows.push(("cmdline", kernel.cmdline));
    }
    for disk in &spec.disks {
        let format = if disk.format == pb::DiskFormat::Qcow2 as i32 { "qcow2" } else { "raw" };
        let mode = if disk.read_only { "ro" } else { "rw" };
        let source = if disk.volume.is_empty() { disk.path.clone() } else { format!("volume {}", disk.volume) };
        let at = port_text(vm, &disk.id);
        rows.push((
            "disk",
            format!("{} {source} ({format}, {mode}, cache={}, aio={}){at}", disk.id, disk.cache, disk.aio),
        ));
    }
    for nic in &spec.nics {
        let on = if nic.network.is_empty() { nic.kind.clone() } else { format!("network {}", nic.network) };
        let port = runtime.nics.iter().find(|status| status.id == nic.id).map(|status| {
            let ofport = if status.ofport > 0 { format!(" ofport {}", status.ofport) } else { String::new() };
            let ipv4 = if status.ipv4.is_empty() { String::new() } else { format!(" ip {}", status.ipv4) };
            let up = if status.up { " up" } else { "" };
            format!(" tap {}{ofport}{ipv4}{up}", status.tap)
        });
        let at = port_text(vm, &nic.id);
        rows.push(("nic", format!("{} {on} {}{at}{}", nic.id, nic.mac, port.unwrap_or_default())));
    }
    if vm.root_ports > 0 {
        let used = vm.devices.iter().filter(|d| d.root_port != 0).count() as u32;
        rows.push((
            "root ports",
            format!("{} ({} free for hotplug)", vm.root_ports, vm.root_ports.saturating_sub(used)),
        ));
    }
    if let Some(display) = spec.vnc_display {
        rows.push(("vnc", format!("127.0.0.1:{}", 5900 + display)));
    }
    let mut labels: Vec<_> = spec.labels.into_iter().collect();
    labels.sort();
    for (key, value) in labels {
        rows.push(("label", format!("{key}={value}")));
    }
    for (key, value) in rows.into_iter().filter(|(_, v)| !v.is_empty()) {
        println!("{key:<12} {value}");
    }
}

fn print_node(info: &pb::NodeInfo, json: bool) {
    let gib = |bytes: u64| format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64);
    let rows = [
        ("node_name", info.node_name.clone()),
        ("hostname", info.hostname.clone()),
        ("version", info.version.clone()),
        ("cpu_model", info.cpu_model.clone()),
        ("cpu_count", info.cpu_count.to_string()),
        ("memory_total", gib(info.memory_total_bytes)),
        ("memory_available", gib(info.memory_available_bytes)),
        ("qemu_binary", info.qemu_binary.clone()),
        ("qemu_version", info.qemu_version.clone()),
        ("accelerator", info.accelerator.clone()),
        ("accelerator_reason", info.accelerator_reason.clone()),
        ("vms", format!("{} running / {} total", info.vms_running, info.vms_total)),
        ("warm_pool", format!("{} ready / {} reserved", info.warm_pool_ready, info.warm_pool_reserved)),
        ("data_dir", info.data_dir.clone()),
    ];
    let system = info.system.clone().unwrap_or_default();
    if json {
        println!(
            "{}",
            json!({
                "node_name": info.node_name, "hostname": info.hostname, "version": info.version,
                "cpu_model": info.cpu_model, "cpu_count": info.cpu_count,
                "memory_total_bytes": info.memory_total_bytes, "memory_available_bytes": info.memory_available_bytes,
                "qemu_binary": info.qemu_binary, "qemu_version": info.qemu_version,
                "accelerator": info.accelerator, "accelerator_reason": info.accelerator_reason,
                "vms_total": info.vms_total, "vms_running": info.vms_running, "data_dir": info.data_dir,
                "warm_pool_ready": info.warm_pool_ready, "warm_pool_reserved": info.warm_pool_reserved,
                "system": system::status_json(&system),
            })
        );
        return;
    }
    for (key, value) in rows {
        println!("{key:<19} {value}");
    }
    for (key, value) in system::status_lines(&system) {
        println!("{key:<19} {value}");
    }
}
