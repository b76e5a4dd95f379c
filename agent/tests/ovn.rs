//! Node networks of kind `ovn` end to end: qx-node drives a real OVN (northbound and southbound ovsdb-servers,
//! ovn-northd, and a chassis with its own ovsdb-server, ovs-vswitchd on the userspace datapath and ovn-controller,
//! all started by the harness in this test's network namespace). Test-guest VMs get their addresses from OVN's
//! native DHCP (busybox udhcpc) and reach each other on one logical switch, and not across two.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::ovn::{skip_without_ovn, Chassis, OvnCentral};
use qx_test_infra::ovs::isolate_network;
use qx_test_infra::{test_guest, Daemon};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

fn ovn_network(name: &str, subnet: &str) -> pb::Network {
    pb::Network { name: name.into(), kind: "ovn".into(), subnet: subnet.into(), ..Default::default() }
}

/// A test-guest VM with one NIC on `network`, configured by nothing: it asks DHCP.
async fn create_on(client: &mut Client, name: &str, network: &str) {
    let nics = format!("nics:\n  - kind: network\n    network: {network}\n");
    let spec_text = test_guest().spec_yaml(name, &nics);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
}

/// The VM's first NIC as qx-node reports it.
async fn nic(client: &mut Client, name: &str) -> pb::NicStatus {
    get(client, name).await.runtime.unwrap_or_default().nics.into_iter().next().expect("a NIC status")
}

/// Asks for the VM's first NIC every 100 ms until ovn-controller has bound its logical port and OVN has given it
/// an address, at most `WAIT`.
async fn bound_nic(client: &mut Client, name: &str) -> pb::NicStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = nic(client, name).await;
        if status.up && !status.ipv4.is_empty() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}'s logical port never came up with an address: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types a line into the guest's shell without waiting for anything.
async fn type_line(console: &mut Console, line: &str) {
    let data = format!("{line}\n").into_bytes();
    console.input.send(pb::ConsoleInput { data, ..Default::default() }).await.unwrap();
}

/// Runs busybox udhcpc on eth0 with a script that configures the lease, and returns eth0's IPv4 address.
async fn dhcp(console: &mut Console) -> String {
    // busybox exports the lease as $ip and $mask (prefix length) to the script.
    type_line(
        console,
        r#"printf '%s\n' '#!/bin/sh' '[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface"' 'exit 0' >/tmp/dhcp.sh; chmod +x /tmp/dhcp.sh"#,
    )
    .await;
    let out = console
        .sh("ip link set eth0 up; timeout 25 udhcpc -i eth0 -n -q -t 8 -T 2 -s /tmp/dhcp.sh >/dev/null 2>&1; ip -4 -o addr show eth0")
        .await;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// Pings `address` from the guest and returns the "N packets received" summary.
async fn ping(console: &mut Console, address: &str) -> String {
    console.sh(&format!("ping -c 3 -W 2 {address} | grep -o '[0-9]* packets received'")).await
}

fn logical_ports(central: &OvnCentral) -> Vec<String> {
    let names = central.nbctl(&["--bare", "--columns=name", "list", "Logical_Switch_Port"]);
    names.lines().filter(|l| !l.trim().is_empty()).map(|l| l.trim().to_owned()).collect()
}

/// qx-node's config for a node on `chassis`: its Open vSwitch (userspace datapath) and `central`'s northbound.
fn node_config(central: &OvnCentral, chassis: &Chassis) -> String {
    format!(
        "ovs:\n  socket: {}\n  datapath_type: netdev\novn:\n  northbound: {}\n  chassis: {}\n",
        chassis.ovs().db_socket().display(),
        central.nb_endpoint(),
        chassis.name()
    )
}

#[test]
fn vms_on_one_logical_switch_get_dhcp_addresses_and_reach_each_other_but_not_another_switch() {
    if skip_without_ovn() {
        return;
    }
    // Taps, br-int, ovs-vswitchd and ovn-controller live in this test's own namespace; the daemon inherits it.
    isolate_network();
    let central = OvnCentral::start();
    let chassis = Chassis::start(&central, "qx-hv1");
    test_guest();
    let config = node_config(&central, &chassis);
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;

        // Bad input is refused by field, and nothing reaches the northbound database.
        let before = central.nbctl(&["--bare", "--columns=_uuid", "list", "Logical_Switch"]);
        for (bad, field) in [
            (pb::Network { subnet: String::new(), ..ovn_network("n", "") }, "subnet"),
            (ovn_network("n", "10.91.0.1/24"), "subnet"),
            (ovn_network("n", "10.91.0.0/31"), "subnet"),
            (pb::Network { kind: "vxlan".into(), ..ovn_network("n", "10.91.0.0/24") }, "kind"),
            (pb::Network { bridge: "br0".into(), ..ovn_network("n", "10.91.0.0/24") }, "bridge"),
            (pb::Network { vlan: Some(10), ..ovn_network("n", "10.91.0.0/24") }, "vlan"),
            (pb::Network { gateway: "10.1.0.1".into(), ..ovn_network("n", "10.91.0.0/24") }, "gateway"),
            (pb::Network { dns_servers: vec!["x".into()], ..ovn_network("n", "10.91.0.0/24") }, "dns_servers[0]"),
            (pb::Network { logical_switch: "bad switch".into(), ..ovn_network("n", "10.91.0.0/24") }, "logical_switch"),
        ] {
            let status = client.create_network(bad).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(field), "{field} not named: {}", status.message());
        }
        client.create_network(ovn_network("net1", "10.91.0.0/24")).await.unwrap();
        let overlapping = pb::Network { logical_switch: "other".into(), ..ovn_network("net3", "10.91.0.128/25") };
        let status = client.create_network(overlapping).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("overlaps subnet 10.91.0.0/24"), "{}", status.message());
        client.create_network(ovn_network("net2", "10.92.0.0/24")).await.unwrap();
        let switches = central.nbctl(&["--bare", "--columns=name", "list", "Logical_Switch"]);
        let mut switches: Vec<&str> = switches.lines().filter(|l| !l.is_empty()).collect();
        switches.sort();
        assert_eq!(switches, ["net1", "net2"], "before: {before:?}");
        let listed = client.list_networks(pb::ListNetworksRequest {}).await.unwrap().into_inner().networks;
        let listed: Vec<_> = listed.iter().map(|n| (n.name.as_str(), n.kind.as_str(), n.subnet.as_str())).collect();
        assert_eq!(listed, [("net1", "ovn", "10.91.0.0/24"), ("net2", "ovn", "10.92.0.0/24")]);

        create_on(&mut client, "a", "net1").await;
        create_on(&mut client, "b", "net1").await;
        create_on(&mut client, "c", "net2").await;
        for name in ["a", "b", "c"] {
            start(&mut client, name).await;
        }
        let mut a = boot(&mut client, "a").await;
        let mut b = boot(&mut client, "b").await;
        let mut c = boot(&mut client, "c").await;

        // Each NIC is a logical port named by its iface-id, bound by this node's ovn-controller.
        let mut addresses = Vec::new();
        for name in ["a", "b", "c"] {
            let status = bound_nic(&mut client, name).await;
            assert!(logical_ports(&central).contains(&status.iface_id), "{status:?}");
            assert_eq!(central.bound_chassis(&status.iface_id).as_deref(), Some(chassis.name()));
            let iface_id = chassis.vsctl(&["get", "Interface", &status.tap, "external_ids:iface-id"]);
            assert_eq!(iface_id.trim_matches('"'), status.iface_id);
            addresses.push(status.ipv4);
        }

        // The guests ask OVN's DHCP and get exactly the addresses OVN allocated to their ports.
        for (console, expected) in [(&mut a, &addresses[0]), (&mut b, &addresses[1]), (&mut c, &addresses[2])] {
            let leased = dhcp(console).await;
            assert_eq!(&leased, expected, "DHCP lease\n{}", console.seen);
        }
        assert!(addresses[0].starts_with("10.91.0.") && addresses[2].starts_with("10.92.0."), "{addresses:?}");

        let a_to_b = ping(&mut a, &addresses[1]).await;
        assert!(!a_to_b.is_empty() && !a_to_b.starts_with("0 "), "a -> b on net1: {a_to_b:?}\n{}", a.seen);
        // c takes an address of net1's subnet as well: only the logical switch stands between it and a.
        type_line(&mut c, "ip addr add 10.91.0.200/24 dev eth0").await;
        let c_to_a = ping(&mut c, &addresses[0]).await;
        assert_eq!(c_to_a, "0 packets received", "c on net2 must not reach a on net1\n{}", c.seen);

        let status = client.delete_network(pb::NetworkRef { name: "net1".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "a network in use stays: {status:?}");

        // Stopping a VM removes its logical port with its OVS port and tap.
        let b_port = nic(&mut client, "b").await.iface_id;
        let request = pb::StopVmRequest { name: "b".into(), force: true, timeout_seconds: 0 };
        client.stop_vm(request).await.unwrap();
        assert!(!logical_ports(&central).contains(&b_port), "logical port removed at stop");
        for name in ["a", "c"] {
            let request = pb::StopVmRequest { name: name.into(), force: true, timeout_seconds: 0 };
            client.stop_vm(request).await.unwrap();
        }
        assert_eq!(logical_ports(&central), Vec::<String>::new(), "no stray logical ports");
        for name in ["a", "b", "c"] {
            client.delete_vm(pb::VmRef { name: name.into() }).await.unwrap();
        }
        client.delete_network(pb::NetworkRef { name: "net2".into() }).await.unwrap();
        let switches = central.nbctl(&["--bare", "--columns=name", "list", "Logical_Switch"]);
        assert_eq!(switches.trim(), "net1", "an unused switch goes with its network");
    });
}

#[test]
fn an_unreachable_northbound_is_reported_and_the_node_runs_on() {
    if skip_without_ovn() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix:{}", dir.path().join("nowhere.sock").display());
    let config = format!("ovn:\n  northbound: {endpoint}\n");
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "info", Some(&config));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;
        let status = client.create_network(ovn_network("net1", "10.93.0.0/24")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&format!("not reachable at {endpoint}")), "{}", status.message());
        // The daemon serves on: VMs without OVN networks work.
        create(&mut client, "plain").await;
        assert!(client.list_networks(pb::ListNetworksRequest {}).await.unwrap().into_inner().networks.is_empty());
    });
    let logged = qx_test_infra::wait_until(Duration::from_secs(10), || {
        let log = std::fs::read_to_string(daemon.log()).unwrap_or_default();
        log.contains("OVN is configured but not reachable").then_some(())
    });
    assert!(
        logged.is_some(),
        "qx-node did not say OVN is unreachable:\n{}",
        std::fs::read_to_string(daemon.log()).unwrap_or_default()
    );
}

#[test]
fn a_northbound_restart_mid_session_loses_and_doubles_no_logical_port() {
    if skip_without_ovn() {
        return;
    }
    isolate_network();
    let mut central = OvnCentral::start();
    let chassis = Chassis::start(&central, "qx-hv2");
    test_guest();
    let config = node_config(&central, &chassis);
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "info", Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;
        client.create_network(ovn_network("net1", "10.94.0.0/24")).await.unwrap();
        create_on(&mut client, "a", "net1").await;
        create_on(&mut client, "b", "net1").await;
        start(&mut client, "a").await;
        let a = bound_nic(&mut client, "a").await;

        // The NB server goes away and comes back on the same database; qx-node's client reconnects and its
        // monitor resyncs, so the next NIC's logical port is written once and a's is still there, once.
        central.kill_nb();
        tokio::time::sleep(Duration::from_millis(500)).await;
        central.restart_nb();
        start(&mut client, "b").await;
        let b = bound_nic(&mut client, "b").await;
        let mut ports = logical_ports(&central);
        ports.sort();
        let mut expected = vec![a.iface_id.clone(), b.iface_id.clone()];
        expected.sort();
        assert_eq!(ports, expected, "every logical port once");
        assert_ne!(a.ipv4, b.ipv4);
        assert!(nic(&mut client, "a").await.up, "a stays bound");

        for name in ["a", "b"] {
            let request = pb::StopVmRequest { name: name.into(), force: true, timeout_seconds: 0 };
            client.stop_vm(request).await.unwrap();
        }
        assert_eq!(logical_ports(&central), Vec::<String>::new(), "no stray logical ports");
    });
}

type Groups = qx_proto::node::v1::security_group_service_client::SecurityGroupServiceClient<tonic::transport::Channel>;

fn rule(direction: &str, protocol: &str) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule { direction: direction.into(), protocol: protocol.into(), ..Default::default() }
}

/// The ACL rows of the NB database as `direction,priority,match,action`, sorted.
fn acl_rows(central: &OvnCentral) -> Vec<String> {
    let out = central.nbctl(&["--bare", "--columns=direction,priority,match,action", "list", "ACL"]);
    let mut rows: Vec<String> = out
        .split("\n\n")
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.lines().map(|l| l.trim().trim_matches('"')).collect::<Vec<_>>().join(","))
        .collect();
    rows.sort();
    rows
}

/// An OVS internal port `probe0` on br-int bound as logical port `probe` (`ip`, in a /24) of `switch`, in this
/// test's namespace: the other end of the VM's connections.
fn plug_probe(central: &OvnCentral, chassis: &Chassis, switch: &str, ip: &str) {
    // The VMs' taps are in this namespace too: only probe0 may answer ARP for its address, or a guest would send
    // its replies to a tap's MAC, which OVN does not know.
    std::fs::write("/proc/sys/net/ipv4/conf/all/arp_ignore", "1").expect("set arp_ignore in the test's namespace");
    let mac = "0a:00:00:95:00:c8";
    central.nbctl(&["lsp-add", switch, "probe", "--", "lsp-set-addresses", "probe", &format!("{mac} {ip}")]);
    chassis.vsctl(&[
        "add-port",
        "br-int",
        "probe0",
        "--",
        "set",
        "Interface",
        "probe0",
        "type=internal",
        "external_ids:iface-id=probe",
    ]);
    for args in [
        &["link", "set", "probe0", "address", mac][..],
        &["addr", "add", &format!("{ip}/24"), "dev", "probe0"],
        &["link", "set", "probe0", "up"],
    ] {
        let status = std::process::Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    let up = qx_test_infra::wait_until(WAIT, || {
        (central.nbctl(&["get", "Logical_Switch_Port", "probe", "up"]) == "true").then_some(())
    });
    assert!(up.is_some(), "the probe port was never bound");
}

/// Whether a ping from the probe port reaches `address`.
fn probe_pings(address: &str) -> bool {
    let out = std::process::Command::new("ping").args(["-c", "1", "-W", "1", "-I", "probe0", address]).output();
    out.is_ok_and(|o| o.status.success())
}

/// Whether a TCP connection from the probe port to `address:port` is accepted within a second.
fn probe_connects(address: &str, port: u16) -> bool {
    let target = std::net::SocketAddr::new(address.parse().unwrap(), port);
    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
}

/// Waits (at most 15 s, while ovn-controller installs the flows) until `probe` says `want`.
fn eventually(want: bool, mut probe: impl FnMut() -> bool) -> bool {
    qx_test_infra::wait_until(Duration::from_secs(15), || (probe() == want).then_some(())).is_some()
}

#[test]
fn security_groups_filter_a_running_vm_and_rule_changes_apply_at_once() {
    if skip_without_ovn() {
        return;
    }
    isolate_network();
    let central = OvnCentral::start();
    let chassis = Chassis::start(&central, "qx-hv3");
    test_guest();
    let config = node_config(&central, &chassis);
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "info", Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;
        let mut groups = Groups::new(qx_agent::client::channel(daemon.socket()).await.unwrap());
        client.create_network(ovn_network("net1", "10.95.0.0/24")).await.unwrap();

        // Bad input is refused by field, and nothing reaches the northbound database.
        let tcp = |min, max| pb::SecurityGroupRule { port_min: min, port_max: max, ..rule("ingress", "tcp") };
        let cidr = |text: &str| pb::SecurityGroupRule { remote_cidr: text.into(), ..rule("ingress", "icmp") };
        let from = |group: &str| pb::SecurityGroupRule { remote_group: group.into(), ..rule("ingress", "any") };
        for (group, fields) in [
            (pb::SecurityGroup { name: "bad-name".into(), ..Default::default() }, &["name"][..]),
            (
                pb::SecurityGroup { name: "web".into(), rules: vec![cidr("10.0.0.1/8")], ..Default::default() },
                &["rules[0].remote_cidr"],
            ),
            (
                pb::SecurityGroup {
                    name: "web".into(),
                    rules: vec![tcp(Some(0), None), tcp(Some(90), Some(80))],
                    ..Default::default()
                },
                &["rules[0].port_min", "rules[1].port_max"],
            ),
            (
                pb::SecurityGroup { name: "web".into(), rules: vec![from("ghost")], ..Default::default() },
                &["rules[0].remote_group"],
            ),
        ] {
            let status = groups.create_security_group(group).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            for field in fields {
                assert!(status.message().contains(field), "{field} not named: {}", status.message());
            }
        }
        assert_eq!(central.nbctl(&["--bare", "--columns=name", "list", "Port_Group"]), "", "nothing written");

        let web = pb::SecurityGroup { name: "web".into(), description: "the web tier".into(), ..Default::default() };
        groups.create_security_group(web.clone()).await.unwrap();
        assert_eq!(groups.create_security_group(web).await.unwrap_err().code(), Code::AlreadyExists);
        assert_eq!(central.nbctl(&["--bare", "--columns=name", "list", "Port_Group"]), "qx_sg_web");

        // A NIC naming a group the node does not have is refused at start, by field.
        let nics = "nics:\n  - kind: network\n    network: net1\n    security_groups: [ghost]\n";
        let spec_text = test_guest().spec_yaml("x", nics);
        client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.unwrap();
        let status = client.start_vm(pb::StartVmRequest { name: "x".into(), paused: false }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("nics[0].security_groups[0]: \"ghost\" does not exist"),
            "{}",
            status.message()
        );
        client.delete_vm(pb::VmRef { name: "x".into() }).await.unwrap();

        let nics = "nics:\n  - kind: network\n    network: net1\n    security_groups: [web]\n";
        let spec_text = test_guest().spec_yaml("a", nics);
        client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.unwrap();
        start(&mut client, "a").await;
        let mut a = boot(&mut client, "a").await;
        let status = bound_nic(&mut client, "a").await;
        let port_uuid = central.nbctl(&["get", "Logical_Switch_Port", &status.iface_id, "_uuid"]);
        assert_eq!(central.nbctl(&["get", "Port_Group", "qx_sg_web", "ports"]), format!("[{port_uuid}]"));
        // On the userspace datapath OVS's conntrack (3.1) takes the partially checksummed TCP of a virtio NIC with
        // checksum offload for invalid and drops it (the kernel datapath does not): the guest computes its own.
        let reloaded = a
            .sh("rmmod virtio_net && insmod /lib/modules/$(uname -r)/kernel/drivers/net/virtio_net.ko csum=0; echo rc=$?")
            .await;
        assert!(reloaded.contains("rc=0"), "reloading virtio_net: {reloaded}");
        // OVN's DHCP passes the default drop.
        assert_eq!(dhcp(&mut a).await, status.ipv4, "DHCP lease\n{}", a.seen);
        a.sh("httpd -p 8080 -h /tmp </dev/null >/dev/null 2>&1; echo started").await;
        plug_probe(&central, &chassis, "net1", "10.95.0.200");
        let ip = status.ipv4.clone();

        // Nothing is allowed in yet; each rule opens its traffic on the running VM, and only that.
        assert!(!probe_pings(&ip), "ping passed the default drop");
        assert!(!probe_connects(&ip, 8080), "TCP passed the default drop");
        let icmp = pb::AddSecurityGroupRuleRequest { group: "web".into(), rule: Some(cidr("10.95.0.0/24")) };
        let group = groups.add_security_group_rule(icmp).await.unwrap().into_inner();
        assert_eq!(group.rules.iter().map(|r| r.id).collect::<Vec<_>>(), [1]);
        assert!(eventually(true, || probe_pings(&ip)), "ping still dropped after the ICMP rule");
        assert!(!probe_connects(&ip, 8080), "the ICMP rule let TCP in");
        let qxctl = std::process::Command::new(env!("CARGO_BIN_EXE_qxctl"))
            .arg("--socket")
            .arg(daemon.socket())
            .args(["sg", "rule", "add", "web", "ingress", "--protocol", "tcp", "--port", "8080"])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&qxctl.stdout);
        assert!(qxctl.status.success(), "{}", String::from_utf8_lossy(&qxctl.stderr));
        assert!(listed.contains("2  ingress tcp 8080 from anywhere"), "{listed}");
        assert!(eventually(true, || probe_connects(&ip, 8080)), "TCP still dropped after the TCP rule");

        // The NB database holds exactly the group's rendering.
        assert_eq!(
            acl_rows(&central),
            [
                "from-lport,1000,inport == @qx_sg_web && ip,drop",
                "from-lport,1001,inport == @qx_sg_web && ip4 && udp && udp.src == 68 && udp.dst == 67,allow",
                "to-lport,1000,outport == @qx_sg_web && ip,drop",
                "to-lport,1001,outport == @qx_sg_web && ip4 && ip4.src == 10.95.0.0/24 && icmp4,allow-related",
                "to-lport,1001,outport == @qx_sg_web && ip4 && tcp && tcp.dst == 8080,allow-related",
            ]
        );

        let request = pb::SecurityGroupRuleRef { group: "web".into(), id: 2 };
        groups.delete_security_group_rule(request.clone()).await.unwrap();
        assert!(eventually(false, || probe_connects(&ip, 8080)), "TCP still allowed after its rule went");
        assert!(probe_pings(&ip), "deleting the TCP rule stopped ICMP");
        assert_eq!(groups.delete_security_group_rule(request).await.unwrap_err().code(), Code::NotFound);

        let status = groups.delete_security_group(pb::SecurityGroupRef { name: "web".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("VMs [\"a\"]"), "{}", status.message());
        let request = pb::StopVmRequest { name: "a".into(), force: true, timeout_seconds: 0 };
        client.stop_vm(request).await.unwrap();
        client.delete_vm(pb::VmRef { name: "a".into() }).await.unwrap();
        groups.delete_security_group(pb::SecurityGroupRef { name: "web".into() }).await.unwrap();
        assert_eq!(central.nbctl(&["--bare", "--columns=name", "list", "Port_Group"]), "");
        assert_eq!(acl_rows(&central), Vec::<String>::new(), "the group's ACLs went with it");
        let listed = groups.list_security_groups(pb::ListSecurityGroupsRequest {}).await.unwrap().into_inner();
        assert!(listed.security_groups.is_empty());
    });
}

/// A test-guest VM with one NIC on `network` at the static address `ip`.
async fn create_static(client: &mut Client, name: &str, network: &str, ip: &str) {
    let nics = format!("nics:\n  - kind: network\n    network: {network}\n    ipv4: {ip}\n");
    let spec_text = test_guest().spec_yaml(name, &nics);
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
}

#[test]
fn a_static_address_is_the_ports_address_its_dhcp_lease_and_its_port_security() {
    if skip_without_ovn() {
        return;
    }
    isolate_network();
    let central = OvnCentral::start();
    let chassis = Chassis::start(&central, "qx-hv4");
    test_guest();
    let config = node_config(&central, &chassis);
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "info", Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;
        client.create_network(ovn_network("net1", "10.96.0.0/24")).await.unwrap();
        create_static(&mut client, "s", "net1", "10.96.0.50").await;
        start(&mut client, "s").await;
        let status = bound_nic(&mut client, "s").await;
        assert_eq!(status.ipv4, "10.96.0.50");
        let mac = get(&mut client, "s").await.spec.unwrap().nics[0].mac.clone();
        let expected = format!("[\"{mac} 10.96.0.50\"]");
        assert_eq!(central.nbctl(&["get", "Logical_Switch_Port", &status.iface_id, "addresses"]), expected);
        assert_eq!(central.nbctl(&["get", "Logical_Switch_Port", &status.iface_id, "port_security"]), expected);

        // Addresses outside the subnet, the DHCP server's, and one taken on the switch are refused at start by
        // field, before anything is written.
        let ports_before = logical_ports(&central);
        for (ip, problem) in [
            ("10.97.0.5", "is not a host address of subnet 10.96.0.0/24"),
            ("10.96.0.255", "is not a host address of subnet 10.96.0.0/24"),
            ("10.96.0.1", "is the address of the subnet's DHCP server"),
            ("10.96.0.50", &format!("is used by port {} on logical switch net1", status.iface_id)),
        ] {
            create_static(&mut client, "bad", "net1", ip).await;
            let refused = client.start_vm(pb::StartVmRequest { name: "bad".into(), paused: false }).await.unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument, "{ip}: {refused:?}");
            let text = format!("nics[0].ipv4: \"{ip}\" {problem}");
            assert!(refused.message().contains(&text), "{text} not in {}", refused.message());
            client.delete_vm(pb::VmRef { name: "bad".into() }).await.unwrap();
        }
        assert_eq!(logical_ports(&central), ports_before, "a refused start wrote a logical port");

        // OVN's DHCP hands out the static address; port security lets the guest send from it only.
        let mut s = boot(&mut client, "s").await;
        assert_eq!(dhcp(&mut s).await, "10.96.0.50", "DHCP lease\n{}", s.seen);
        plug_probe(&central, &chassis, "net1", "10.96.0.200");
        assert!(eventually(true, || probe_pings("10.96.0.50")), "the probe does not reach the static address");
        let own = ping(&mut s, "10.96.0.200").await;
        assert!(!own.is_empty() && !own.starts_with("0 "), "from 10.96.0.50: {own:?}\n{}", s.seen);
        s.sh("ip addr add 10.96.0.51/24 dev eth0").await;
        let spoofed = s.sh("ping -c 2 -W 1 -I 10.96.0.51 10.96.0.200 | grep -o '[0-9]* packets received'").await;
        assert_eq!(spoofed, "0 packets received", "port security let another source address out\n{}", s.seen);

        let request = pb::StopVmRequest { name: "s".into(), force: true, timeout_seconds: 0 };
        client.stop_vm(request).await.unwrap();
        assert!(!logical_ports(&central).contains(&status.iface_id), "the logical port goes at stop");
    });
}
