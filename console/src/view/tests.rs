use qx_proto::node::v1::NodeInfo;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::*;
use crate::app::Reconnect;
use crate::host::{AddressMode, ClusterSummary, NetworkConfig, SshState};

const GIB: u64 = 1 << 30;

/// Unix seconds the tests' clock stands at.
pub(super) const NOW: i64 = 1_700_000_000;

fn node_info() -> NodeInfo {
    NodeInfo {
        node_name: "node-a".into(),
        hostname: "host-a.lab".into(),
        version: "0.1.0".into(),
        cpu_model: "AMD EPYC 7302P 16-Core Processor".into(),
        cpu_count: 32,
        memory_total_bytes: 64 * GIB,
        memory_available_bytes: 48 * GIB,
        qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
        qemu_version: "9.2.0".into(),
        accelerator: "kvm".into(),
        accelerator_reason: "/dev/kvm is usable".into(),
        vms_total: 5,
        vms_running: 2,
        data_dir: "/var/lib/quantix".into(),
        ..NodeInfo::default()
    }
}

pub(super) fn host() -> HostSummary {
    HostSummary {
        management_address: "192.0.2.10/24".into(),
        management_url: "grpcs://192.0.2.10:7443".into(),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            mode: AddressMode::Static,
            address: "192.0.2.10/24".into(),
            gateway: "192.0.2.1".into(),
            vlan: 0,
            dns_servers: vec!["192.0.2.53".into()],
        }),
        ssh: SshState::default(),
        cluster: ClusterSummary { state: Membership::Standalone, ..ClusterSummary::default() },
    }
}

/// A node that answered both GetNodeInfo and GetHostStatus, at [`NOW`].
pub(super) fn connected() -> App {
    with_host(host())
}

fn with_host(host: HostSummary) -> App {
    let mut app = App::new("/run/quantix/node.sock", true);
    app.tick(NOW);
    app.set_snapshot(Snapshot::from_node_info(node_info()).with_host(Ok(host)));
    app
}

fn terminal(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| render(frame, app)).unwrap();
    terminal
}

/// The buffer's text, one string per row, trailing blanks trimmed.
pub(super) fn text(app: &App, width: u16, height: u16) -> Vec<String> {
    let terminal = terminal(app, width, height);
    let buffer = terminal.backend().buffer();
    (0..buffer.area.height)
        .map(|y| {
            let row: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect();
            row.trim_end().to_owned()
        })
        .collect()
}

#[test]
fn connected_at_80x24() {
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  node-a",
        "",
        "  CPU:           AMD EPYC 7302P 16-Core Processor x 32",
        "  Memory:        16.0 GiB used / 64.0 GiB total",
        "  VMs:           2 / 5 running",
        "  Accelerator:   kvm (/dev/kvm is usable)",
        "",
        "",
        "",
        "  Status:        standalone",
        "  Control plane: not joined",
        "  Management IP: 192.0.2.10/24 on eth0 (static)",
        "  Manage at:     grpcs://192.0.2.10:7443",
        "  SSH:           disabled",
        "",
        "",
        "",
        "",
        "",
        "",
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services",
        " F7 Diagnostics  F10 Power  F12 Shell  q Quit",
    ];
    assert_eq!(text(&connected(), 80, 24), expected);
}

#[test]
fn styles_at_80x24() {
    let terminal = terminal(&connected(), 80, 24);
    let buffer = terminal.backend().buffer();
    // The yellow panel spans the full width, black on yellow.
    for (x, y) in [(0, 0), (2, 1), (79, 9)] {
        assert_eq!((buffer[(x, y)].fg, buffer[(x, y)].bg), (Color::Black, Color::Yellow), "({x}, {y})");
    }
    assert!(buffer[(2, 1)].modifier.contains(Modifier::BOLD));
    assert_eq!(buffer[(0, 10)].bg, Color::Black);
    // Key names stand out from their labels.
    assert_eq!(buffer[(1, 22)].fg, Color::Yellow);
    assert_eq!(buffer[(4, 22)].fg, Color::Gray);
}

#[test]
fn connected_at_120x40_fits_the_key_bar_on_one_line() {
    let lines = text(&connected(), 120, 40);
    assert_eq!(lines[1], "  Quantix 0.1.0");
    assert_eq!(lines[2], "  node-a");
    assert_eq!(lines[6], "  VMs:           2 / 5 running");
    assert_eq!(lines[11], "  Status:        standalone");
    assert_eq!(lines[13], "  Management IP: 192.0.2.10/24 on eth0 (static)");
    assert_eq!(lines[15], "  SSH:           disabled");
    assert_eq!(lines[38], "");
    assert_eq!(
        lines[39],
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services  F7 Diagnostics  F10 Power  F12 Shell  q Quit"
    );
}

#[test]
fn no_quit_key_when_quitting_is_not_allowed() {
    let mut app = connected();
    app.allow_quit = false;
    let lines = text(&app, 120, 40);
    assert_eq!(
        lines[39],
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services  F7 Diagnostics  F10 Power  F12 Shell"
    );
}

#[test]
fn connecting_before_the_first_answer() {
    let app = App::new("/run/quantix/node.sock", true);
    let lines = text(&app, 80, 24);
    assert_eq!(lines[1], format!("  Quantix {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(lines[2], "  qx-node: connecting...");
    assert_eq!(lines[4], "  Socket: /run/quantix/node.sock");
    assert!(!lines.iter().any(|line| line.contains("VMs:")), "{lines:#?}");
}

#[test]
fn unreachable_daemon_shows_the_reason_instead_of_numbers() {
    let mut app = connected();
    app.set_snapshot(Snapshot::unreachable(
        "cannot connect to qx-node at /run/quantix/node.sock: transport error: Connection refused (os error 111)",
    ));
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  qx-node is not reachable",
        "",
        "  Socket: /run/quantix/node.sock",
        "  Reason: cannot connect to qx-node at /run/quantix/node.sock: transport",
        "  error: Connection refused (os error 111)",
        "",
        "",
        "",
        "",
        "  Retrying every 2 s; press F5 to retry now.",
        "",
    ];
    let lines = text(&app, 80, 24);
    assert_eq!(lines[..expected.len()], expected);
    assert!(!lines.iter().any(|line| line.contains("VMs:") || line.contains("Status:")), "{lines:#?}");
}

#[test]
fn a_cluster_member_with_vlan_and_an_ssh_timer() {
    let mut host = host();
    host.cluster = ClusterSummary {
        state: Membership::Member,
        control_plane_url: "https://cp.lab:8443".into(),
        node_id: "n-42".into(),
        cluster_name: "lab".into(),
        last_heartbeat_unix: NOW - 4,
        last_error: String::new(),
    };
    host.management_url = "https://cp.lab:8443".into();
    host.network.as_mut().unwrap().vlan = 42;
    host.ssh = SshState { enabled: true, disable_at_unix: NOW + 29 * 60 + 30 };
    let expected = [
        "  Status:        member of cluster \"lab\"",
        "  Control plane: https://cp.lab:8443 (heartbeat 4 s ago)",
        "  Management IP: 192.0.2.10/24 on eth0 (static, VLAN 42)",
        "  Manage at:     https://cp.lab:8443",
        "  SSH:           enabled, turns off in 30 min",
    ];
    assert_eq!(text(&with_host(host.clone()), 80, 24)[11..16], expected);

    host.cluster.state = Membership::Disconnected;
    host.cluster.last_error = "control plane unreachable".into();
    host.ssh = SshState { enabled: true, disable_at_unix: 0 };
    host.management_address = String::new();
    host.network.as_mut().unwrap().mode = AddressMode::Dhcp;
    let expected = [
        "  Status:        member of cluster \"lab\", disconnected",
        "  Control plane: https://cp.lab:8443 (heartbeat failed: control plane",
        "  unreachable)",
        "  Management IP: no address on eth0 (DHCP, VLAN 42)",
        "  Manage at:     https://cp.lab:8443",
        "  SSH:           enabled (no timer)",
    ];
    assert_eq!(text(&with_host(host), 80, 24)[11..17], expected);
}

#[test]
fn a_daemon_without_host_status_says_why() {
    let mut app = App::new("/run/quantix/node.sock", true);
    let reason = "GetHostStatus failed: Unimplemented: Operation is not implemented or not supported";
    app.set_snapshot(Snapshot::from_node_info(node_info()).with_host(Err(reason.into())));
    let expected = [
        "  Status:        unknown",
        "  Host status:   GetHostStatus failed: Unimplemented: Operation is not",
        "  implemented or not supported",
        "",
    ];
    let lines = text(&app, 80, 24);
    assert_eq!(lines[6], "  VMs:           2 / 5 running", "the node's numbers still show");
    assert_eq!(lines[11..15], expected);
}

#[test]
fn restarting_services_shows_reconnecting() {
    let mut app = connected();
    app.reconnecting = Some(Reconnect { since: NOW, lost: false });
    assert_eq!(text(&app, 80, 24)[21], " Services are restarting; reconnecting to qx-node...");
    app.set_snapshot(Snapshot::unreachable("cannot connect to qx-node at /run/quantix/node.sock: Connection refused"));
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  qx-node: reconnecting...",
        "",
        "  Socket: /run/quantix/node.sock",
        "  Services are restarting; VMs keep running.",
    ];
    let lines = text(&app, 80, 24);
    assert_eq!(lines[..6], expected);
    assert_eq!(lines[21], " Services are restarting; reconnecting to qx-node...");
}

#[test]
fn notice_and_refreshing_lines() {
    let mut app = connected();
    app.notice = Some("Network configuration applied: eth0, static 192.0.2.10/24".into());
    assert_eq!(text(&app, 80, 24)[21], " Network configuration applied: eth0, static 192.0.2.10/24");
    app.refreshing = true;
    assert_eq!(text(&app, 80, 24)[21], " Refreshing...");
}

#[test]
fn tiny_sizes_degrade_without_panicking() {
    let app = connected();
    assert_eq!(text(&app, 10, 3), ["Quantix 0.", "node-a", ""]);
    assert_eq!(text(&app, 1, 1), ["Q"]);
    assert_eq!(text(&app, 0, 0), Vec::<String>::new());
    assert_eq!(text(&app, 80, 0), Vec::<String>::new());
    assert_eq!(text(&app, 0, 24).len(), 24);
    let unreachable = {
        let mut app = App::new("/s", true);
        app.set_snapshot(Snapshot::unreachable("refused"));
        app
    };
    let connecting = App::new("/s", false);
    for app in [&app, &unreachable, &connecting] {
        for width in 0..=90 {
            for height in 0..=30 {
                terminal(app, width, height);
            }
        }
    }
}

#[test]
fn small_terminal_keeps_the_key_bar() {
    // 40x10: the key bar wraps to four lines and keeps them; the yellow panel gets the rest, the body nothing.
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  node-a",
        "",
        "  CPU:           AMD EPYC 7302P",
        "",
        " F2 Network  F3 SSH  F4 Join cluster",
        " F5 Refresh  F6 Restart services",
        " F7 Diagnostics  F10 Power  F12 Shell",
        " q Quit",
    ];
    assert_eq!(text(&connected(), 40, 10), expected);
}

#[test]
fn draw_respects_an_offset_area() {
    let app = connected();
    let mut buf = Buffer::empty(Rect::new(0, 0, 100, 30));
    draw(&app, Rect::new(10, 3, 80, 24), &mut buf);
    let row: String = (10..30).map(|x| buf[(x, 4)].symbol()).collect();
    assert_eq!(row, "  Quantix 0.1.0     ");
    assert_eq!(buf[(9, 4)].symbol(), " ");
    assert_eq!(buf[(9, 4)].bg, Color::Reset);
}

#[test]
fn the_systems_and_the_last_update_are_shown() {
    use qx_proto::node::v1::{SystemSlot, SystemStatus, UpdateOutcome, UpdateRecord};
    let system = SystemStatus {
        active: Some(SystemSlot { slot: "b".into(), version: "1.1".into() }),
        last_update: Some(UpdateRecord {
            version: "1.2".into(),
            slot: "a".into(),
            outcome: UpdateOutcome::RolledBack.into(),
            ..UpdateRecord::default()
        }),
        ..SystemStatus::default()
    };
    let mut app = App::new("/run/quantix/node.sock", true);
    app.tick(NOW);
    let info = NodeInfo { system: Some(system), ..node_info() };
    app.set_snapshot(Snapshot::from_node_info(info).with_host(Ok(host())));
    let screen = text(&app, 100, 40).join("\n");
    assert!(screen.contains("System:") && screen.contains("B 1.1, no fallback"), "{screen}");
    assert!(screen.contains("1.2 on A: FAILED, rolled back"), "{screen}");

    // Off the image (no A/B systems) there is no such line.
    let off = NodeInfo {
        system: Some(SystemStatus { unavailable: "not booted from the image".into(), ..SystemStatus::default() }),
        ..node_info()
    };
    app.set_snapshot(Snapshot::from_node_info(off).with_host(Ok(host())));
    assert!(!text(&app, 100, 40).join("\n").contains("System:"));
}
