//! Every dialog drawn over the main screen, at 80x24 and 120x40, and at tiny sizes.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::tests::{connected, host, text};
use super::*;
use crate::app::Action;
use crate::host::{ClusterSummary, DiagnosticsReport};
use crate::rpc::{Reply, Request, RpcError};

fn press(app: &mut App, code: KeyCode) -> Action {
    app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn type_text(app: &mut App, text: &str) {
    app.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
    for c in text.chars() {
        press(app, KeyCode::Char(c));
    }
}

/// F2 with the form filled from GetNetworkConfig.
fn network() -> App {
    let mut app = connected();
    assert_eq!(press(&mut app, KeyCode::F(2)), Action::Call(Request::GetNetworkConfig));
    app.on_reply(Reply::NetworkConfig(Ok(host().network.unwrap())));
    app
}

/// F2 with a bad value in every field that has a check; Enter sent nothing.
fn network_all_bad() -> App {
    let mut app = network();
    type_text(&mut app, "eth 0");
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "10.0.0.5");
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "10.0.1.1");
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "5000");
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "192.0.2.53, dns.example");
    assert_eq!(press(&mut app, KeyCode::Enter), Action::None);
    app
}

fn ssh() -> App {
    let mut app = connected();
    press(&mut app, KeyCode::F(3));
    app
}

fn join() -> App {
    let mut app = connected();
    press(&mut app, KeyCode::F(4));
    app
}

fn leave() -> App {
    let mut host = host();
    host.cluster = ClusterSummary {
        state: crate::host::Membership::Member,
        control_plane_url: "https://cp.lab:8443".into(),
        cluster_name: "lab".into(),
        ..ClusterSummary::default()
    };
    let mut app = connected();
    app.snapshot.as_mut().unwrap().host = Some(host);
    press(&mut app, KeyCode::F(4));
    app
}

fn confirm(key: u8) -> App {
    let mut app = connected();
    press(&mut app, KeyCode::F(key));
    app
}

fn power_warning() -> App {
    let mut app = connected();
    press(&mut app, KeyCode::F(10));
    press(&mut app, KeyCode::Right);
    assert_eq!(press(&mut app, KeyCode::Enter), Action::None);
    app
}

fn report() -> DiagnosticsReport {
    DiagnosticsReport {
        log_lines: (1..=40)
            .map(|i| format!("2026-11-22T04:{:02}:00Z  INFO qx_agent: heartbeat accepted node_id=n-42 seq={i}", i % 60))
            .collect(),
        hardware: vec![
            "CPU: AMD EPYC 7302P 16-Core Processor x 32".into(),
            "Memory: 64.0 GiB".into(),
            "Disk /: 120.3 GiB free of 447.1 GiB".into(),
            "NIC eth0: up, 10000 Mb/s, 3c:ec:ef:01:02:03".into(),
        ],
        accelerator: "kvm".into(),
        accelerator_reason: "/dev/kvm is usable".into(),
        qemu_version: "9.2.0".into(),
    }
}

fn diagnostics() -> App {
    let mut app = connected();
    app.resize(Rect::new(0, 0, 80, 24));
    press(&mut app, KeyCode::F(7));
    app.on_reply(Reply::Diagnostics(Ok(report())));
    app
}

fn network_gateway_outside() -> App {
    let mut app = network();
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "10.0.0.5/24");
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "10.0.1.1");
    assert_eq!(press(&mut app, KeyCode::Enter), Action::None);
    app
}

/// The main screen's rows at 80x24 that a centred dialog leaves alone.
const KEY_BAR_80: [&str; 2] = [
    " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services",
    " F7 Diagnostics  F10 Power  F12 Shell  q Quit",
];

#[test]
fn network_form_at_80x24() {
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  node-a",
        "",
        "  CPU:           AMD EPYC 7302P 16-Core Processor x 32",
        "  Memory:        16.0 GiB used / 64.0 GiB total",
        "  ┌ Configure management network ────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ > Interface       eth0_                                                  │",
        "  │   Mode            ( ) DHCP  (*) static                                   │",
        "  │   Address         192.0.2.10/24  (with prefix, e.g. 192.0.2.10/24)       │",
        "  │   Gateway         192.0.2.1  (optional)                                  │",
        "  │   VLAN            0  (0 = untagged)                                      │",
        "  │   DNS servers     192.0.2.53  (comma separated)                          │",
        "  │                                                                          │",
        "  │ Tab next  Shift-Tab previous  Left/Right choose  Ctrl-U clear            │",
        "  │ Enter apply  Esc cancel                                                  │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
        "",
        "",
        "",
        "",
        KEY_BAR_80[0],
        KEY_BAR_80[1],
    ];
    assert_eq!(text(&network(), 80, 24), expected);
}

#[test]
fn network_form_while_reading_and_in_dhcp_mode() {
    let mut app = connected();
    press(&mut app, KeyCode::F(2));
    let lines = text(&app, 80, 24);
    assert_eq!(lines[15], "  │ Reading the current configuration...                                     │");
    assert_eq!(lines[16], "  │ Esc close (the request goes on)                                          │");
    app.on_reply(Reply::NetworkConfig(Ok(crate::host::NetworkConfig {
        interface: "eth1".into(),
        ..Default::default()
    })));
    let lines = text(&app, 80, 24);
    assert_eq!(lines[9], "  │   Mode            (*) DHCP  ( ) static                                   │");
    assert_eq!(
        lines[10], "  │   Address                                                                │",
        "no hint when off"
    );
    assert_eq!(lines[11], "  │   Gateway                                                                │");
}

/// The bad values of the issue: each message sits under its field, and nothing was sent (checked by the fixture).
#[test]
fn network_form_with_bad_input_at_80x24() {
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  node-a",
        "",
        "  ┌ Configure management network ────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ > Interface       eth 0_                                                 │",
        "  │                   ! \"eth 0\" must not contain '/', ':' or whitespace      │",
        "  │   Mode            ( ) DHCP  (*) static                                   │",
        "  │   Address         10.0.0.5  (with prefix, e.g. 192.0.2.10/24)            │",
        "  │                   ! \"10.0.0.5\" has no prefix length (e.g. /24)           │",
        "  │   Gateway         10.0.1.1  (optional)                                   │",
        "  │   VLAN            5000  (0 = untagged)                                   │",
        "  │                   ! \"5000\" is outside 1..=4094                           │",
        "  │   DNS servers     192.0.2.53, dns.example  (comma separated)             │",
        "  │                   ! \"dns.example\" is not an IP address                   │",
        "  │                                                                          │",
        "  │ Tab next  Shift-Tab previous  Left/Right choose  Ctrl-U clear            │",
        "  │ Enter apply  Esc cancel                                                  │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
        "",
        "",
        KEY_BAR_80[0],
        KEY_BAR_80[1],
    ];
    assert_eq!(text(&network_all_bad(), 80, 24), expected);
}

#[test]
fn network_form_gateway_outside_the_subnet_at_120x40() {
    let lines = text(&network_gateway_outside(), 120, 40);
    let expected = [
        "  Management IP: 192.0┌ Configure management network ────────────────────────────────────────────┐",
        "  Manage at:     grpcs│                                                                          │",
        "  SSH:           disab│   Interface       eth0                                                   │",
        "                      │   Mode            ( ) DHCP  (*) static                                   │",
        "                      │   Address         10.0.0.5/24  (with prefix, e.g. 192.0.2.10/24)         │",
        "                      │ > Gateway         10.0.1.1_  (optional)                                  │",
        "                      │                   ! \"10.0.1.1\" is outside the subnet 10.0.0.0/24         │",
        "                      │   VLAN            0  (0 = untagged)                                      │",
        "                      │   DNS servers     192.0.2.53  (comma separated)                          │",
        "                      │                                                                          │",
        "                      │ Tab next  Shift-Tab previous  Left/Right choose  Ctrl-U clear            │",
        "                      │ Enter apply  Esc cancel                                                  │",
        "                      └──────────────────────────────────────────────────────────────────────────┘",
    ];
    assert_eq!(lines[13..26], expected);
    assert_eq!(
        lines[39],
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services  F7 Diagnostics  F10 Power  F12 Shell  q Quit"
    );
}

#[test]
fn network_form_shows_qx_node_refusals_on_fields_and_under_the_form() {
    let mut app = network();
    assert!(matches!(press(&mut app, KeyCode::Enter), Action::Call(Request::SetNetworkConfig(_))));
    let lines = text(&app, 80, 24);
    assert_eq!(lines[15], "  │ Applying...                                                              │");
    let refusal = "interface: \"eth0\" has no such device on this host; dns_servers: \"192.0.2.53\" has more than 3 \
                   servers; node: unknown problem";
    app.on_reply(Reply::NetworkSet(Err(RpcError::new(tonic::Code::InvalidArgument, refusal))));
    let expected = [
        "  │ > Interface       eth0_                                                  │",
        "  │                   ! \"eth0\" has no such device on this host               │",
        "  │   Mode            ( ) DHCP  (*) static                                   │",
        "  │   Address         192.0.2.10/24  (with prefix, e.g. 192.0.2.10/24)       │",
        "  │   Gateway         192.0.2.1  (optional)                                  │",
        "  │   VLAN            0  (0 = untagged)                                      │",
        "  │   DNS servers     192.0.2.53  (comma separated)                          │",
        "  │                   ! \"192.0.2.53\" has more than 3 servers                 │",
        "  │                                                                          │",
        "  │ qx-node refused the configuration: node: unknown problem                 │",
    ];
    // Two error rows make the box two rows taller; it stays centred.
    assert_eq!(text(&app, 80, 24)[6..16], expected);
}

#[test]
fn ssh_dialog_at_80x24() {
    let expected = [
        "  ┌ SSH ─────────────────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ SSH is disabled.                                                         │",
        "  │                                                                          │",
        "  │ > SSH             (*) enable  ( ) disable                                │",
        "  │   Turn off after  30  (minutes, 0 = no timer)                            │",
        "  │                                                                          │",
        "  │ Tab next  Shift-Tab previous  Left/Right choose  Ctrl-U clear            │",
        "  │ Enter apply  Esc cancel                                                  │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    let mut app = ssh();
    assert_eq!(text(&app, 80, 24)[7..17], expected);
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "a week");
    assert_eq!(press(&mut app, KeyCode::Enter), Action::None);
    let lines = text(&app, 80, 24);
    assert_eq!(lines[11], "  │ > Turn off after  a week_  (minutes, 0 = no timer)                       │");
    assert_eq!(lines[12], "  │                   ! \"a week\" is not a number of minutes                  │");
}

#[test]
fn ssh_dialog_of_an_enabled_ssh_offers_to_disable() {
    let mut app = connected();
    let now = app.now;
    app.snapshot.as_mut().unwrap().host.as_mut().unwrap().ssh =
        crate::host::SshState { enabled: true, disable_at_unix: now + 12 * 60 };
    assert_eq!(text(&app, 80, 24)[15], "  SSH:           enabled, turns off in 12 min");
    press(&mut app, KeyCode::F(3));
    let lines = text(&app, 80, 24);
    assert_eq!(lines[9], "  │ SSH is enabled, turns off in 12 min.                                     │");
    assert_eq!(lines[11], "  │ > SSH             ( ) enable  (*) disable                                │");
    assert_eq!(lines[12], "  │   Turn off after  30                                                     │");
}

#[test]
fn join_dialog_at_80x24() {
    let expected = [
        "  ┌ Join cluster ────────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ Register this node with a Quantix control plane, using a join token      │",
        "  │ issued by it.                                                            │",
        "  │                                                                          │",
        "  │ > Control plane   _                                                      │",
        "  │   Join token                                                             │",
        "  │                                                                          │",
        "  │ Tab next  Shift-Tab previous  Ctrl-U clear  Enter join  Esc cancel       │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    let mut app = join();
    assert_eq!(text(&app, 80, 24)[7..17], expected);

    // An empty token: the message under it, nothing sent.
    type_text(&mut app, "http://127.0.0.1:4000");
    assert_eq!(press(&mut app, KeyCode::Enter), Action::None);
    let expected = [
        "  │   Control plane   http://127.0.0.1:4000                                  │",
        "  │ > Join token      _                                                      │",
        "  │                   ! must not be empty (the join token the control plane  │",
        "  │                   ! issued)                                              │",
    ];
    assert_eq!(text(&app, 80, 24)[11..15], expected);

    // The token is masked; a refusal is shown with its reason.
    type_text(&mut app, "s3cret");
    assert!(matches!(press(&mut app, KeyCode::Enter), Action::Call(Request::JoinCluster { .. })));
    let reason = "the control plane at http://127.0.0.1:4000 refused the join token: unknown token";
    app.on_reply(Reply::Joined(Err(RpcError::new(tonic::Code::PermissionDenied, reason))));
    let expected = [
        "  │ > Join token      ******_                                                │",
        "  │                                                                          │",
        "  │ Joining failed: the control plane at http://127.0.0.1:4000 refused the   │",
        "  │ join token: unknown token                                                │",
    ];
    assert_eq!(text(&app, 80, 24)[12..16], expected);
}

#[test]
fn leave_dialog_at_80x24() {
    let expected = [
        "  ┌ Leave cluster ───────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ This node is a member of cluster \"lab\" at https://cp.lab:8443.           │",
        "  │ Leave it? Heartbeats stop and the node becomes standalone; VMs keep      │",
        "  │ running.                                                                 │",
        "  │                                                                          │",
        "  │ Enter leave  Esc cancel                                                  │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    assert_eq!(text(&leave(), 80, 24)[8..16], expected);
}

#[test]
fn restart_dialog_and_its_failure_at_80x24() {
    let expected = [
        "  ┌ Restart services ────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ Restart the Quantix services (qx-node) on this host?                     │",
        "  │ Running VMs keep running; the console reconnects by itself.              │",
        "  │                                                                          │",
        "  │ Enter restart  Esc cancel                                                │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    let mut app = confirm(6);
    let lines = text(&app, 80, 24);
    assert_eq!(lines[8..15], expected);
    assert_eq!(lines[15], "  SSH:           disabled", "the main screen shows around the dialog");
    assert_eq!(press(&mut app, KeyCode::Enter), Action::Call(Request::RestartServices));
    app.on_reply(Reply::Restarted(Err(RpcError::new(tonic::Code::Unavailable, "cannot connect to qx-node"))));
    let lines = text(&app, 80, 24);
    assert_eq!(lines[13], "  │ Restarting failed: cannot connect to qx-node                             │");
    assert_eq!(lines[14], "  │ Enter restart  Esc cancel                                                │");
}

#[test]
fn shell_dialog_at_80x24() {
    let expected = [
        "  ┌ Emergency shell ─────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ Open a root shell on this console?                                       │",
        "  │ Use it only when the console and qxctl cannot fix the problem; opening   │",
        "  │ it is logged.                                                            │",
        "  │ Leave the shell (exit) to come back to the console.                      │",
        "  │                                                                          │",
        "  │ Enter open the shell  Esc cancel                                         │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    assert_eq!(text(&confirm(12), 80, 24)[7..16], expected);
}

#[test]
fn power_dialog_and_its_running_vms_warning_at_80x24() {
    let expected = [
        "  ┌ Power ───────────────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ Reboot or shut down this host?                                           │",
        "  │ 2 VMs are running; you will be asked to confirm.                         │",
        "  │                                                                          │",
        "  │ > Action          (*) reboot  ( ) shut down                              │",
        "  │                                                                          │",
        "  │ Left/Right choose  Enter continue  Esc cancel                            │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    assert_eq!(text(&confirm(10), 80, 24)[7..16], expected);
    let expected = [
        "  ┌ Power ───────────────────────────────────────────────────────────────────┐",
        "  │                                                                          │",
        "  │ 2 VMs are running. They stop when the host goes down.                    │",
        "  │ Press Enter to shut down anyway, Esc to cancel.                          │",
        "  │                                                                          │",
        "  │ Enter shut down  Esc cancel                                              │",
        "  └──────────────────────────────────────────────────────────────────────────┘",
    ];
    assert_eq!(text(&power_warning(), 80, 24)[8..15], expected);
}

#[test]
fn diagnostics_at_80x24_scrolled_and_panned() {
    let mut app = diagnostics();
    let lines = text(&app, 80, 24);
    let expected_top = [
        "┌ Diagnostics: lines 1-21 of 50 ───────────────────────────────────────────────┐",
        "│ Accelerator: kvm (/dev/kvm is usable)                                        │",
        "│ QEMU: 9.2.0                                                                  │",
        "│                                                                              │",
        "│ Hardware                                                                     │",
        "│   CPU: AMD EPYC 7302P 16-Core Processor x 32                                 │",
        "│   Memory: 64.0 GiB                                                           │",
        "│   Disk /: 120.3 GiB free of 447.1 GiB                                        │",
        "│   NIC eth0: up, 10000 Mb/s, 3c:ec:ef:01:02:03                                │",
        "│                                                                              │",
        "│ Recent qx-node log (40 lines)                                                │",
        "│   2026-11-22T04:01:00Z  INFO qx_agent: heartbeat accepted node_id=n-42 seq=1 │",
    ];
    assert_eq!(lines[..12], expected_top);
    assert_eq!(lines[22], "│ Up/Down scroll  PgUp/PgDn page  Home/End ends  Left/Right pan  F5 reload     │");
    assert_eq!(lines[23], "└──────────────────────────────────────────────────────────────────────────────┘");

    press(&mut app, KeyCode::End);
    let lines = text(&app, 80, 24);
    assert_eq!(lines[0], "┌ Diagnostics: lines 30-50 of 50 ──────────────────────────────────────────────┐");
    assert_eq!(lines[21], "│   2026-11-22T04:40:00Z  INFO qx_agent: heartbeat accepted node_id=n-42 seq=4 │");
    press(&mut app, KeyCode::Right);
    press(&mut app, KeyCode::Right);
    assert_eq!(
        text(&app, 80, 24)[21],
        "│ eartbeat accepted node_id=n-42 seq=40                                        │"
    );
}

#[test]
fn diagnostics_at_120x40_and_while_loading() {
    let lines = text(&diagnostics(), 120, 40);
    assert_eq!(lines[0], format!("┌ Diagnostics: lines 1-37 of 50 {}┐", "─".repeat(87)));
    assert_eq!(
        lines[20],
        format!("│   2026-11-22T04:10:00Z  INFO qx_agent: heartbeat accepted node_id=n-42 seq=10{}│", " ".repeat(40))
    );
    assert_eq!(
        lines[38],
        format!(
            "│ Up/Down scroll  PgUp/PgDn page  Home/End ends  Left/Right pan  F5 reload  Esc close{}│",
            " ".repeat(34)
        )
    );
    let mut app = connected();
    press(&mut app, KeyCode::F(7));
    let lines = text(&app, 80, 24);
    assert_eq!(lines[0], format!("┌ Diagnostics {}┐", "─".repeat(65)));
    assert_eq!(lines[1], format!("│ Loading...{}│", " ".repeat(67)));
}

#[test]
fn dialog_styles() {
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    terminal.draw(|frame| render(frame, &network_all_bad())).unwrap();
    let buffer = terminal.backend().buffer();
    // The frame is yellow on black, the focus marker yellow, errors light red, hints dim.
    assert_eq!((buffer[(2, 4)].fg, buffer[(2, 4)].bg), (Color::Yellow, Color::Black));
    assert_eq!(buffer[(4, 6)].symbol(), ">");
    assert_eq!(buffer[(4, 6)].fg, Color::Yellow);
    assert_eq!(buffer[(22, 6)].fg, Color::White, "the value");
    assert_eq!(buffer[(22, 7)].symbol(), "!");
    assert_eq!(buffer[(22, 7)].fg, Color::LightRed);
    assert_eq!(buffer[(33, 9)].fg, Color::DarkGray, "the address's hint");
}

#[test]
fn dialogs_at_tiny_sizes_never_panic() {
    let apps = [
        network(),
        network_all_bad(),
        ssh(),
        join(),
        leave(),
        confirm(6),
        confirm(10),
        confirm(12),
        power_warning(),
        diagnostics(),
    ];
    assert_eq!(text(&apps[0], 10, 3), ["┌ Configu┐", "│        │", "└────────┘"]);
    assert_eq!(text(&apps[9], 10, 3), ["┌ Diagnos┐", "│ Up/Dow │", "└────────┘"]);
    assert_eq!(text(&apps[0], 1, 1), [""]);
    assert_eq!(text(&apps[0], 0, 0), Vec::<String>::new());
    for app in &apps {
        for (width, height) in [(0, 0), (1, 1), (10, 3), (4, 2), (3, 40), (200, 2), (80, 24), (300, 100)] {
            text(app, width, height);
        }
        for width in 0..=50 {
            for height in 0..=26 {
                text(app, width, height);
            }
        }
    }
}
