//! `qxctl vm guest`: the guest agent of a running VM (GuestAgentService).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use futures::StreamExt;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::guest_agent_service_client::GuestAgentServiceClient;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// OS, host name, time zone, interfaces with addresses and file systems, as the guest agent reports them.
    Info { name: String },
    /// Run a program in the guest and print its output; qxctl exits with the program's exit code.
    Exec {
        name: String,
        /// Seconds to wait before the program is killed (default 60).
        #[arg(long)]
        timeout: Option<u32>,
        /// Send qxctl's standard input to the program.
        #[arg(long)]
        stdin: bool,
        /// NAME=value for the program's environment; repeatable.
        #[arg(long)]
        env: Vec<String>,
        /// The program and its arguments (after --).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Read or write a guest file.
    File {
        #[command(subcommand)]
        command: FileCommand,
    },
    /// Set a guest user's password, read from standard input (one line).
    Password {
        name: String,
        user: String,
        /// The input is a crypt(3) hash already.
        #[arg(long)]
        crypted: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Print a guest file (or write it to --output).
    Read {
        name: String,
        path: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Refuse files larger than this many bytes (default 1 MiB, at most 16 MiB).
        #[arg(long)]
        max_bytes: Option<u64>,
    },
    /// Write a guest file from a local file (or standard input with -).
    Write { name: String, path: String, source: PathBuf },
}

pub async fn run(channel: Channel, command: GuestCommand, json: bool) -> anyhow::Result<()> {
    let mut client = GuestAgentServiceClient::new(channel);
    match command {
        GuestCommand::Info { name } => {
            let info = client.get_guest_info(pb::GetGuestInfoRequest { vm: name }).await?.into_inner();
            print_info(&info, json);
        }
        GuestCommand::Exec { name, timeout, stdin, env, command } => {
            let mut input = Vec::new();
            if stdin {
                std::io::stdin().read_to_end(&mut input).context("reading standard input")?;
            }
            let mut parts = command.into_iter();
            let path = parts.next().expect("clap requires the program");
            let request = pb::ExecGuestRequest {
                vm: name,
                path,
                args: parts.collect(),
                env,
                stdin: input,
                timeout_seconds: timeout.unwrap_or(0),
            };
            let mut stream = client.exec_guest(request).await?.into_inner();
            while let Some(event) = stream.next().await {
                match event?.event {
                    Some(pb::exec_guest_event::Event::Started(pid)) if json => {
                        println!("{}", json!({ "started": pid }));
                    }
                    Some(pb::exec_guest_event::Event::Exited(exited)) => return exit(&exited, json),
                    Some(pb::exec_guest_event::Event::Started(_)) | None => {}
                }
            }
            bail!("the node ended the exec stream without the program's exit");
        }
        GuestCommand::File { command: FileCommand::Read { name, path, output, max_bytes } } => {
            let request = pb::ReadGuestFileRequest { vm: name, path, max_bytes: max_bytes.unwrap_or(0) };
            let content = client.read_guest_file(request).await?.into_inner().content;
            match output {
                Some(file) => std::fs::write(&file, &content).with_context(|| format!("writing {}", file.display()))?,
                None => std::io::stdout().write_all(&content)?,
            }
        }
        GuestCommand::File { command: FileCommand::Write { name, path, source } } => {
            let content = if source.as_os_str() == "-" {
                let mut content = Vec::new();
                std::io::stdin().read_to_end(&mut content).context("reading standard input")?;
                content
            } else {
                std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?
            };
            let bytes = content.len();
            client.write_guest_file(pb::WriteGuestFileRequest { vm: name, path: path.clone(), content }).await?;
            if json {
                println!("{}", json!({ "written": path, "bytes": bytes }));
            } else {
                println!("wrote {bytes} bytes to {path}");
            }
        }
        GuestCommand::Password { name, user, crypted } => {
            if std::io::stdin().is_terminal() {
                eprint!("password for {user}: ");
            }
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
            let password = line.trim_end_matches(['\r', '\n']).to_owned();
            if password.is_empty() {
                bail!("password: the input is empty");
            }
            let request = pb::SetGuestPasswordRequest { vm: name, user: user.clone(), password, crypted };
            client.set_guest_password(request).await?;
            if json {
                println!("{}", json!({ "password_set": user }));
            } else {
                println!("password of {user} set");
            }
        }
    }
    Ok(())
}

fn exit(exited: &pb::ExecGuestExited, json: bool) -> anyhow::Result<()> {
    if json {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let value = json!({
            "exit_code": exited.exit_code,
            "signal": exited.signal,
            "stdout": text(&exited.stdout),
            "stderr": text(&exited.stderr),
            "truncated": exited.truncated,
        });
        println!("{value}");
    } else {
        std::io::stdout().write_all(&exited.stdout)?;
        std::io::stderr().write_all(&exited.stderr)?;
        if let Some(signal) = exited.signal {
            eprintln!("qxctl: the program was killed by signal {signal}");
        }
    }
    std::io::stdout().flush()?;
    // Like ssh: the program's exit code is qxctl's; a signal is 128 + its number.
    let code = exited.exit_code.or(exited.signal.map(|s| 128 + s)).unwrap_or(0);
    if code != 0 {
        std::process::exit(i32::try_from(code).unwrap_or(1));
    }
    Ok(())
}

pub fn agent_state_name(state: i32) -> &'static str {
    match pb::GuestAgentState::try_from(state) {
        Ok(pb::GuestAgentState::Connected) => "connected",
        Ok(pb::GuestAgentState::NotResponding) => "not responding",
        _ => "unknown",
    }
}

fn print_info(info: &pb::GuestInfo, json: bool) {
    let os = info.os.clone().unwrap_or_default();
    let agent = info.agent.clone().unwrap_or_default();
    if json {
        let interfaces: Vec<_> = info
            .interfaces
            .iter()
            .map(|nic| {
                let addresses: Vec<_> = nic.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix)).collect();
                json!({ "name": nic.name, "mac": nic.mac, "addresses": addresses })
            })
            .collect();
        let filesystems: Vec<_> = info
            .filesystems
            .iter()
            .map(|fs| {
                json!({ "mountpoint": fs.mountpoint, "type": fs.fs_type, "used_bytes": fs.used_bytes,
                        "total_bytes": fs.total_bytes, "devices": fs.devices })
            })
            .collect();
        let value = json!({
            "agent": { "state": agent_state_name(agent.state), "version": agent.version },
            "os": { "id": os.id, "pretty_name": os.pretty_name, "version_id": os.version_id,
                    "kernel_release": os.kernel_release, "machine": os.machine },
            "host_name": info.host_name,
            "timezone": info.timezone,
            "utc_offset_seconds": info.utc_offset_seconds,
            "interfaces": interfaces,
            "filesystems": filesystems,
            "unavailable": info.unavailable,
        });
        println!("{value}");
        return;
    }
    println!("agent:      {} {}", agent_state_name(agent.state), agent.version);
    println!("os:         {} ({} {})", os.pretty_name, os.kernel_release, os.machine);
    println!("host name:  {}", info.host_name);
    println!("time zone:  {} (UTC{:+}s)", info.timezone, info.utc_offset_seconds);
    println!("interfaces:");
    for nic in &info.interfaces {
        let addresses: Vec<_> = nic.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix)).collect();
        println!("  {:<12} {:<17} {}", nic.name, nic.mac, addresses.join(" "));
    }
    println!("file systems:");
    for fs in &info.filesystems {
        let mib = |bytes: u64| bytes >> 20;
        println!(
            "  {:<20} {:<8} {:>8} / {:>8} MiB  {}",
            fs.mountpoint,
            fs.fs_type,
            mib(fs.used_bytes),
            mib(fs.total_bytes),
            fs.devices.join(",")
        );
    }
    for part in &info.unavailable {
        println!("unavailable: {part}");
    }
}
