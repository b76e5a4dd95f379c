//! The QMP commands `VmManager` sends, typed, and what it makes of the run states QEMU reports.
//!
//! Every command goes through `qapi-qmp`'s types (or `qx_qmp::commands` where QEMU 7.2 differs). Disks, NICs and
//! netdevs are rendered once as JSON by [`crate::cmdline`], for the command line and for QMP alike, and typed here on
//! the way out; the golden tests below pin the exact sequences.

use qx_qmp::qapi_qmp::{self, ShutdownAction};
use qx_qmp::{commands, Error, QmpClient, RunState};
use serde_json::{json, Value};

use crate::cmdline::{Device, Plug};
use crate::state::VmState;

/// Plugs a disk or user-mode NIC: its block nodes or netdev, then its device.
pub(crate) async fn plug_device(qmp: &QmpClient, plug: &Plug) -> Result<(), String> {
    for blockdev in &plug.blockdevs {
        let command = commands::blockdev_add(blockdev).map_err(|e| format!("blockdev-add: {e}"))?;
        qmp.execute(command).await.map_err(|e| format!("blockdev-add: {e}"))?;
    }
    if let Some(netdev) = &plug.netdev {
        netdev_add(qmp, netdev).await.map_err(|e| format!("netdev_add: {e}"))?;
    }
    device_add(qmp, &plug.device).await.map_err(|e| format!("device_add {}: {e}", plug.device.id))
}

/// `netdev_add` of a netdev rendered as JSON.
pub(crate) async fn netdev_add(qmp: &QmpClient, netdev: &Value) -> Result<(), Error> {
    qmp.execute(commands::netdev_add(netdev)?).await.map(drop)
}

/// `device_add` of a device.
pub(crate) async fn device_add(qmp: &QmpClient, device: &Device) -> Result<(), Error> {
    qmp.execute(commands::device_add(&device.to_qmp())?).await.map(drop)
}

/// The netdev of a tap whose queue fds QEMU holds under `fd_names` (from `getfd`).
pub(crate) fn tap_netdev(id: &str, fd_names: &[String]) -> Value {
    match fd_names {
        [one] => json!({ "type": "tap", "id": id, "fd": one }),
        many => json!({ "type": "tap", "id": id, "fds": many.join(":") }),
    }
}

/// `set-action shutdown=...`: what QEMU does when the guest powers off (`pause` while a reboot waits for it).
pub(crate) async fn set_shutdown_action(qmp: &QmpClient, action: ShutdownAction) -> Result<(), Error> {
    let command = qapi_qmp::set_action { shutdown: Some(action), panic: None, reboot: None, watchdog: None };
    qmp.execute(command).await.map(drop)
}

/// The lifecycle commands without arguments, by the name they have in QMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simple {
    /// `cont`: run the vCPUs.
    Cont,
    /// `stop`: stop the vCPUs.
    Stop,
    /// `system_reset`.
    SystemReset,
    /// `system_powerdown`: the ACPI power button.
    SystemPowerdown,
    /// `quit`: QEMU exits.
    Quit,
}

impl Simple {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Simple::Cont => "cont",
            Simple::Stop => "stop",
            Simple::SystemReset => "system_reset",
            Simple::SystemPowerdown => "system_powerdown",
            Simple::Quit => "quit",
        }
    }
}

/// Sends `command`, waiting at most `timeout` (the client's command timeout if `None`).
pub(crate) async fn simple(
    qmp: &QmpClient,
    command: Simple,
    timeout: Option<std::time::Duration>,
) -> Result<(), Error> {
    macro_rules! run {
        ($command:expr) => {
            match timeout {
                Some(timeout) => qmp.execute_timeout($command, timeout).await.map(drop),
                None => qmp.execute($command).await.map(drop),
            }
        };
    }
    match command {
        Simple::Cont => run!(qapi_qmp::cont {}),
        Simple::Stop => run!(qapi_qmp::stop {}),
        Simple::SystemReset => run!(qapi_qmp::system_reset {}),
        Simple::SystemPowerdown => run!(qapi_qmp::system_powerdown {}),
        Simple::Quit => run!(qapi_qmp::quit {}),
    }
}

/// `migrate-set-capabilities`: each capability on or off, on the side it is sent to.
pub(crate) async fn set_migration_capabilities(
    qmp: &QmpClient,
    capabilities: &[(qapi_qmp::MigrationCapability, bool)],
) -> Result<(), Error> {
    let capabilities = capabilities
        .iter()
        .map(|&(capability, state)| qapi_qmp::MigrationCapabilityStatus { capability, state })
        .collect();
    qmp.execute(qapi_qmp::migrate_set_capabilities { capabilities }).await.map(drop)
}

/// `migrate-set-parameters`: every member of 9.1's `MigrateSetParameters` that `parameters` sets exists in 7.2
/// too for the ones `vmm` uses (bandwidth, downtime limit, multifd channels, xbzrle cache size).
pub(crate) async fn set_migration_parameters(
    qmp: &QmpClient,
    parameters: qapi_qmp::MigrateSetParameters,
) -> Result<(), Error> {
    qmp.execute(qapi_qmp::migrate_set_parameters(parameters)).await.map(drop)
}

/// `query-migrate`. 9.1's `MigrationStats` requires nothing 7.2 does not send (7.2 adds `skipped`, and `disk`
/// and `compression` beside `ram`, which decoding ignores).
pub(crate) async fn query_migrate(qmp: &QmpClient) -> Result<qapi_qmp::MigrationInfo, Error> {
    qmp.execute(qapi_qmp::query_migrate {}).await
}

/// `migrate` to `uri` (`tcp:HOST:PORT` or `unix:PATH`): 7.2 takes `uri` only, not 9.1's `channels`.
pub(crate) async fn migrate(qmp: &QmpClient, uri: &str) -> Result<(), Error> {
    let command = qapi_qmp::migrate { uri: Some(uri.to_owned()), channels: None, detach: None, resume: None };
    qmp.execute(command).await.map(drop)
}

/// `migrate-incoming` on `uri`, for a QEMU started with `-incoming defer` (7.2 has no `exit-on-error`: a failed
/// incoming migration ends the QEMU).
pub(crate) async fn migrate_incoming(qmp: &QmpClient, uri: &str) -> Result<(), Error> {
    let command = qapi_qmp::migrate_incoming { uri: Some(uri.to_owned()), channels: None, exit_on_error: None };
    qmp.execute(command).await.map(drop)
}

/// `migrate_cancel`: an outgoing precopy migration stops and the source keeps running.
pub(crate) async fn migrate_cancel(qmp: &QmpClient) -> Result<(), Error> {
    qmp.execute(qapi_qmp::migrate_cancel {}).await.map(drop)
}

/// `migrate-start-postcopy`: the source stops, sends the device state, and the target runs while pages follow.
pub(crate) async fn migrate_start_postcopy(qmp: &QmpClient) -> Result<(), Error> {
    qmp.execute(qapi_qmp::migrate_start_postcopy {}).await.map(drop)
}

/// What qx-node makes of a QEMU it finds in some run state after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// A VM in this state, QEMU kept.
    Keep(VmState),
    /// The guest never ran in this QEMU (a start cut short by the restart, an incoming migration that never
    /// finished) or will not again (migrated away): QEMU is stopped and the VM is `stopped`, for this reason.
    Discard(&'static str),
}

/// Maps a run state found at reattach, given the state `recorded` in state.json. Only `running` is running; the
/// states whose vCPUs are stopped with the guest's memory intact are `paused` (stop and reset work; resume works
/// where QEMU allows it, and otherwise fails with QEMU's reason); and the states of a guest that does not live in
/// this QEMU end it. `prelaunch` is a VM started paused when the record says `paused` (that is written before
/// StartVm answers), and otherwise a start cut short.
pub(crate) fn found(state: &RunState, recorded: VmState) -> Found {
    match state {
        RunState::Running => Found::Keep(VmState::Running),
        RunState::Prelaunch if recorded == VmState::Paused => Found::Keep(VmState::Paused),
        RunState::Prelaunch => Found::Discard("the start was cut short by a qx-node restart before the guest ran"),
        RunState::Inmigrate => Found::Discard("an incoming migration never finished; the guest never ran here"),
        RunState::Postmigrate => Found::Discard("the guest was migrated away and does not run here any more"),
        RunState::Paused
        | RunState::IoError
        | RunState::Watchdog
        | RunState::Debug
        | RunState::Suspended
        | RunState::Shutdown
        | RunState::GuestPanicked
        | RunState::InternalError
        | RunState::FinishMigrate
        | RunState::SaveVm
        | RunState::RestoreVm
        | RunState::Colo
        | RunState::Other(_) => Found::Keep(VmState::Paused),
    }
}

#[cfg(test)]
mod tests {
    //! Golden tests: the exact QMP a VM operation sends, recorded by a fake QEMU that answers `{}` to everything.

    use super::*;
    use crate::cmdline::Hardware;
    use crate::device_tree::DeviceTree;
    use crate::spec::VmSpec;
    use qx_qmp::ConnectOptions;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;
    use tokio::sync::mpsc;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A connected client and the commands the fake QEMU receives, in order (without `qmp_capabilities`).
    async fn fake_qemu() -> (QmpClient, mpsc::UnboundedReceiver<Value>) {
        let (client, server) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (read, mut write) = server.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut message: Value = serde_json::from_str(&line).unwrap();
                let id = message.as_object_mut().and_then(|m| m.remove("id")).unwrap_or_default();
                let reply = json!({"return": {}, "id": id});
                write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
                if message["execute"] != "qmp_capabilities" {
                    let _ = tx.send(message);
                }
            }
        });
        let opts = ConnectOptions { connect_timeout: Duration::from_secs(5), command_timeout: Duration::from_secs(5) };
        (QmpClient::from_stream(client, opts).await.unwrap(), rx)
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<Value>) -> Vec<Value> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn spec(yaml: &str) -> VmSpec {
        VmSpec::from_text(yaml).unwrap()
    }

    #[tokio::test]
    async fn warm_start_plugs_disks_and_nics_exactly_as_rendered() {
        let mut spec = spec(concat!(
            "name: web1\nkernel:\n  kernel: /boot/vmlinuz\n",
            "disks:\n  - path: /var/lib/a.qcow2\n    format: qcow2\n  - path: /var/lib/b.raw\n    read_only: true\n",
            "nics:\n  - kind: user\n    mac: \"52:54:00:12:34:56\"\n",
        ));
        spec.fill_device_ids();
        let tree = DeviceTree::new(&spec).unwrap();
        let hw = Hardware::from_spec(&spec, &tree, None);
        let (qmp, mut rx) = fake_qemu().await;
        for plug in hw.disks.iter().chain(&hw.user_nics) {
            plug_device(&qmp, plug).await.unwrap();
        }
        simple(&qmp, Simple::Cont, None).await.unwrap();
        let sent = sent(&mut rx);
        // Every member the command line gets, QMP gets too: nothing dropped by the typed commands.
        let mut expected = Vec::new();
        for plug in hw.disks.iter().chain(&hw.user_nics) {
            for blockdev in &plug.blockdevs {
                expected.push(json!({"execute": "blockdev-add", "arguments": blockdev}));
            }
            if let Some(netdev) = &plug.netdev {
                expected.push(json!({"execute": "netdev_add", "arguments": netdev}));
            }
            expected.push(json!({"execute": "device_add", "arguments": plug.device.to_qmp()}));
        }
        expected.push(json!({"execute": "cont"}));
        let names: Vec<_> = sent.iter().map(|m| m["execute"].as_str().unwrap().to_owned()).collect();
        assert_eq!(
            names,
            [
                "blockdev-add",
                "blockdev-add",
                "device_add",
                "blockdev-add",
                "blockdev-add",
                "device_add",
                "netdev_add",
                "device_add",
                "cont"
            ]
        );
        assert_eq!(sent, expected);
        let format_node = &sent[1]["arguments"];
        assert_eq!(
            (&format_node["driver"], &format_node["cache"], &format_node["read-only"], &format_node["discard"]),
            (&json!("qcow2"), &json!({"direct": true, "no-flush": false}), &json!(false), &json!("unmap"))
        );
        assert_eq!(format_node["file"], sent[0]["arguments"]["node-name"], "the format node sits on the file node");
    }

    #[tokio::test]
    async fn network_nic_netdevs_name_their_fds() {
        let (qmp, mut rx) = fake_qemu().await;
        netdev_add(&qmp, &tap_netdev("net1", &["net1-q0".into()])).await.unwrap();
        netdev_add(&qmp, &tap_netdev("net2", &["net2-q0".into(), "net2-q1".into()])).await.unwrap();
        assert_eq!(
            sent(&mut rx),
            [
                json!({"execute": "netdev_add", "arguments": {"type": "tap", "id": "net1", "fd": "net1-q0"}}),
                json!({"execute": "netdev_add", "arguments": {"type": "tap", "id": "net2", "fds": "net2-q0:net2-q1"}}),
            ]
        );
    }

    #[tokio::test]
    async fn lifecycle_commands_are_what_qemu_expects() {
        let (qmp, mut rx) = fake_qemu().await;
        // pause, resume, stop (power button, then quit), reboot (pause on shutdown, reset, cont, poweroff again).
        simple(&qmp, Simple::Stop, None).await.unwrap();
        simple(&qmp, Simple::Cont, None).await.unwrap();
        simple(&qmp, Simple::SystemPowerdown, None).await.unwrap();
        simple(&qmp, Simple::Quit, Some(Duration::from_secs(1))).await.unwrap();
        set_shutdown_action(&qmp, ShutdownAction::pause).await.unwrap();
        simple(&qmp, Simple::SystemReset, None).await.unwrap();
        set_shutdown_action(&qmp, ShutdownAction::poweroff).await.unwrap();
        assert_eq!(
            sent(&mut rx),
            [
                json!({"execute": "stop"}),
                json!({"execute": "cont"}),
                json!({"execute": "system_powerdown"}),
                json!({"execute": "quit"}),
                json!({"execute": "set-action", "arguments": {"shutdown": "pause"}}),
                json!({"execute": "system_reset"}),
                json!({"execute": "set-action", "arguments": {"shutdown": "poweroff"}}),
            ]
        );
        for command in [Simple::Cont, Simple::Stop, Simple::SystemReset, Simple::SystemPowerdown, Simple::Quit] {
            assert!(!command.name().is_empty());
        }
    }

    #[test]
    fn only_running_is_running_and_migration_states_are_not_paused() {
        for recorded in [VmState::Starting, VmState::Running, VmState::Paused] {
            assert_eq!(found(&RunState::Running, recorded), Found::Keep(VmState::Running));
            for state in
                [RunState::Paused, RunState::IoError, RunState::Watchdog, RunState::GuestPanicked, RunState::Shutdown]
            {
                assert_eq!(found(&state, recorded), Found::Keep(VmState::Paused), "{state}");
            }
            for state in [RunState::Inmigrate, RunState::Postmigrate] {
                assert!(matches!(found(&state, recorded), Found::Discard(_)), "{state}");
            }
        }
    }

    #[test]
    fn prelaunch_is_a_paused_start_only_when_the_record_says_paused() {
        assert_eq!(found(&RunState::Prelaunch, VmState::Paused), Found::Keep(VmState::Paused));
        for recorded in [VmState::Starting, VmState::Running] {
            assert!(matches!(found(&RunState::Prelaunch, recorded), Found::Discard(_)), "{recorded}");
        }
    }
}
