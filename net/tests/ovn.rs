//! The OVN northbound client against real OVN (Debian's ovn-central and ovn-host, started by the harness in temp
//! dirs): switches, ports, DHCP, port groups and ACLs, refusals that write nothing, concurrent writers, an NB server
//! restart mid-session, a port coming `up` when ovn-controller binds it, and two chassis in two network namespaces
//! carrying traffic over Geneve on the userspace datapath.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use qx_net::ovn::{
    AclAction, AclDirection, AclSpec, DhcpSpec, Error, LocalnetSpec, Northbound, PortAddress, PortSpec, SwitchSpec,
};
use qx_net::ovsdb::{ClientOptions, Endpoint};
use qx_test_infra::ovn::{skip_without_ovn, Chassis, OvnCentral};

use common::run;

const WAIT: Duration = Duration::from_secs(20);

fn opts() -> ClientOptions {
    ClientOptions { request_timeout: WAIT, ..ClientOptions::default() }
}

async fn connect(central: &OvnCentral) -> Northbound {
    let endpoint: Endpoint = central.nb_endpoint().parse().unwrap();
    Northbound::connect(endpoint, opts()).await.unwrap()
}

fn switch(name: &str, subnet: &str) -> SwitchSpec {
    SwitchSpec { subnet: Some(subnet.parse().unwrap()), dhcp: Some(DhcpSpec::default()), ..SwitchSpec::new(name) }
}

fn port(name: &str, mac_suffix: u8, address: PortAddress) -> PortSpec {
    PortSpec { address, ..PortSpec::new(name, format!("52:54:00:00:01:{mac_suffix:02x}")) }
}

fn fields(error: &Error) -> Vec<String> {
    match error {
        Error::Invalid(errors) => errors.0.iter().map(|e| e.field.clone()).collect(),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

/// Everything in the NB database that a refused request must leave alone.
fn nb_dump(central: &OvnCentral) -> String {
    ["Logical_Switch", "Logical_Switch_Port", "DHCP_Options", "Port_Group", "ACL"]
        .iter()
        .map(|t| central.nbctl(&["--columns=_uuid", "list", t]))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn switches_ports_dhcp_groups_and_refusals() {
    if skip_without_ovn() {
        return;
    }
    run(async {
        let central = OvnCentral::start();
        let nb = connect(&central).await;

        let mut spec = switch("net1", "10.20.0.0/24");
        spec.dhcp = Some(DhcpSpec {
            router: Some("10.20.0.254".parse().unwrap()),
            dns_servers: vec!["10.20.0.53".parse().unwrap()],
            mtu: Some(1400),
            ..DhcpSpec::default()
        });
        spec.localnet = Some(LocalnetSpec { network: "physnet1".into(), vlan: Some(42) });
        nb.create_switch(&spec).await.unwrap();
        let info = nb.switch("net1").unwrap();
        assert_eq!(info.subnet.unwrap().to_string(), "10.20.0.0/24");
        assert_eq!(info.ports, ["ln-net1"]);
        let dhcp = info.dhcp.expect("DHCP_Options row");
        let options = central.nbctl(&["get", "DHCP_Options", &dhcp.to_string(), "options"]);
        for expected in [
            "router=\"10.20.0.254\"",
            "server_id=\"10.20.0.254\"",
            "lease_time=\"3600\"",
            "mtu=\"1400\"",
            "dns_server=\"{10.20.0.53}\"",
        ] {
            assert!(options.contains(expected), "{expected} missing from {options}");
        }
        assert_eq!(central.nbctl(&["get", "Logical_Switch_Port", "ln-net1", "type"]), "localnet");
        assert_eq!(central.nbctl(&["get", "Logical_Switch_Port", "ln-net1", "tag_request"]), "42");
        nb.create_switch(&switch("net2", "10.30.0.0/24")).await.unwrap();

        // Refusals: each names its field, and nothing is written.
        let before = nb_dump(&central);
        let err = nb.create_switch(&switch("net1", "10.99.0.0/24")).await.unwrap_err();
        assert!(matches!(err, Error::SwitchExists { .. }), "{err}");
        let err = nb.create_switch(&switch("net3", "10.20.0.128/25")).await.unwrap_err();
        assert_eq!(fields(&err), ["subnet"]);
        assert!(err.to_string().contains("overlaps subnet 10.20.0.0/24 of logical switch net1"), "{err}");
        let err =
            nb.create_switch(&SwitchSpec { name: "bad/name".into(), ..switch("x", "10.40.0.0/24") }).await.unwrap_err();
        assert_eq!(fields(&err), ["name"]);
        let err =
            nb.add_port("net1", &port("a", 1, PortAddress::Static("10.21.0.5".parse().unwrap()))).await.unwrap_err();
        assert_eq!(fields(&err), ["address"]);
        assert!(err.to_string().contains("is not a host address of subnet 10.20.0.0/24"), "{err}");
        let err =
            nb.add_port("net1", &port("a", 1, PortAddress::Static("10.20.0.254".parse().unwrap()))).await.unwrap_err();
        assert!(err.to_string().contains("DHCP server"), "{err}");
        let err = nb.add_port("nope", &port("a", 1, PortAddress::Dynamic)).await.unwrap_err();
        assert!(matches!(err, Error::SwitchNotFound { .. }), "{err}");
        let batch = [
            port("b1", 2, PortAddress::Static("10.20.0.10".parse().unwrap())),
            port("b2", 2, PortAddress::Static("10.20.0.10".parse().unwrap())),
        ];
        let err = nb.add_ports("net1", &batch).await.unwrap_err();
        assert_eq!(fields(&err), ["ports[1].mac", "ports[1].address"]);
        let err = nb.add_port("net1", &PortSpec::new("c", "01:00:5e:00:00:01")).await.unwrap_err();
        assert_eq!(fields(&err), ["mac"]);
        assert_eq!(nb_dump(&central), before, "a refused request wrote something");

        // Static and dynamic addresses; DHCP options go to ports with an address.
        let a = port("a", 1, PortAddress::Static("10.20.0.5".parse().unwrap()));
        nb.add_port("net1", &a).await.unwrap();
        let err =
            nb.add_port("net1", &port("a2", 3, PortAddress::Static("10.20.0.5".parse().unwrap()))).await.unwrap_err();
        assert!(err.to_string().contains("is used by port a"), "{err}");
        let err = nb.add_port("net2", &port("a", 9, PortAddress::Dynamic)).await.unwrap_err();
        assert!(matches!(&err, Error::PortExists { switch: Some(s), .. } if s == "net1"), "{err}");
        nb.add_port("net1", &port("d", 4, PortAddress::Dynamic)).await.unwrap();
        // northd fills dynamic_addresses; the monitor brings it.
        let ip = nb.wait_for_port("d", WAIT, |p| p.ipv4).await.expect("northd gave port d a dynamic address");
        let subnet: qx_net::ovn::Ipv4Cidr = "10.20.0.0/24".parse().unwrap();
        assert!(subnet.is_host(ip) && ip != Ipv4Addr::new(10, 20, 0, 5), "{ip}");
        assert_eq!(central.nbctl(&["get", "Logical_Switch_Port", "a", "dhcpv4_options"]), dhcp.to_string());
        assert_eq!(
            central.nbctl(&["get", "Logical_Switch_Port", "a", "port_security"]),
            "[\"52:54:00:00:01:01 10.20.0.5\"]"
        );
        let ports: Vec<String> = nb.switch_ports("net1").into_iter().map(|p| p.name).collect();
        assert_eq!(ports, ["a", "d", "ln-net1"]);

        // Port groups and ACLs, replaced atomically.
        let err = nb.create_port_group("bad-name", &BTreeMap::new()).await.unwrap_err();
        assert_eq!(fields(&err), ["name"]);
        nb.create_port_group("qx_sg_web", &BTreeMap::new()).await.unwrap();
        let err = nb.create_port_group("qx_sg_web", &BTreeMap::new()).await.unwrap_err();
        assert!(matches!(err, Error::PortGroupExists { .. }), "{err}");
        nb.add_to_port_group("qx_sg_web", &["a", "d"]).await.unwrap();
        let err = nb.add_to_port_group("qx_sg_web", &["ghost"]).await.unwrap_err();
        assert!(matches!(err, Error::PortNotFound { .. }), "{err}");
        let acl = |priority, m: &str, action| AclSpec {
            direction: AclDirection::ToLport,
            priority,
            match_: m.into(),
            action,
            external_ids: BTreeMap::new(),
        };
        let acls = [
            acl(1001, "outport == @qx_sg_web && icmp4", AclAction::AllowRelated),
            acl(1000, "outport == @qx_sg_web && ip4", AclAction::Drop),
        ];
        nb.set_port_group_acls("qx_sg_web", &acls).await.unwrap();
        let group = nb.port_group("qx_sg_web").unwrap();
        assert_eq!(group.ports, ["a", "d"]);
        assert_eq!(group.acls.iter().map(|a| a.spec.clone()).collect::<Vec<_>>(), acls);
        assert_eq!(
            central.nbctl(&["--bare", "--columns=match", "list", "ACL"]).lines().filter(|l| !l.is_empty()).count(),
            2
        );
        let bad = [acl(40000, "", AclAction::Drop)];
        let err = nb.set_port_group_acls("qx_sg_web", &bad).await.unwrap_err();
        assert_eq!(fields(&err), ["acls[0].priority", "acls[0].match"]);
        nb.set_port_group_acls("qx_sg_web", &acls[1..]).await.unwrap();
        assert_eq!(nb.port_group("qx_sg_web").unwrap().acls.len(), 1);
        assert_eq!(
            central.nbctl(&["--bare", "--columns=match", "list", "ACL"]).lines().filter(|l| !l.is_empty()).count(),
            1,
            "old ACLs are gone"
        );
        nb.remove_from_port_group("qx_sg_web", &["d"]).await.unwrap();
        assert_eq!(nb.port_group("qx_sg_web").unwrap().ports, ["a"]);

        // A port joins its port groups in the transaction that creates it; a missing group writes nothing.
        let before = nb_dump(&central);
        let grouped = |group: &str| PortSpec { port_groups: vec![group.into()], ..port("g", 5, PortAddress::Dynamic) };
        let err = nb.add_port("net1", &grouped("qx_sg_none")).await.unwrap_err();
        assert!(matches!(&err, Error::PortGroupNotFound { name } if name == "qx_sg_none"), "{err}");
        assert_eq!(nb_dump(&central), before, "a refused request wrote something");
        nb.add_port("net1", &grouped("qx_sg_web")).await.unwrap();
        assert_eq!(nb.port_group("qx_sg_web").unwrap().ports, ["a", "g"]);

        // Requested chassis, port removal, switch deletion with its DHCP_Options.
        nb.set_requested_chassis("a", Some("hv2")).await.unwrap();
        assert_eq!(nb.port("a").unwrap().requested_chassis.as_deref(), Some("hv2"));
        nb.set_requested_chassis("a", None).await.unwrap();
        assert_eq!(nb.port("a").unwrap().requested_chassis, None);
        assert!(nb.remove_port("d").await.unwrap());
        assert!(!nb.remove_port("d").await.unwrap());
        assert!(nb.delete_port_group("qx_sg_web").await.unwrap());
        assert!(nb.delete_switch("net1").await.unwrap());
        assert!(nb.switch("net1").is_none());
        assert_eq!(central.nbctl(&["--bare", "--columns=cidr", "list", "DHCP_Options"]), "10.30.0.0/24");
        assert_eq!(central.nbctl(&["--bare", "--columns=name", "list", "Logical_Switch_Port"]), "");
    });
}

#[test]
fn concurrent_writers_never_overwrite_each_other() {
    if skip_without_ovn() {
        return;
    }
    run(async {
        let central = OvnCentral::start();
        let (one, two) = (connect(&central).await, connect(&central).await);
        one.create_switch(&switch("shared", "10.50.0.0/24")).await.unwrap();
        two.monitor().wait_for(WAIT, |r| r.find("Logical_Switch", "name", "shared").map(drop)).await.unwrap();

        // Same static address from two control planes at once: exactly one wins.
        let same = PortAddress::Static("10.50.0.7".parse().unwrap());
        let (px, py) = (port("x", 1, same), port("y", 2, same));
        let (x, y) = tokio::join!(one.add_port("shared", &px), two.add_port("shared", &py));
        assert!(x.is_ok() != y.is_ok(), "exactly one may get 10.50.0.7: {x:?} {y:?}");
        let loser = x.err().or(y.err()).unwrap();
        assert!(loser.to_string().contains("10.50.0.7") && loser.to_string().contains("is used by port"), "{loser}");

        // Twenty ports from two writers interleaved: none is lost.
        let adds = (0..20u8).map(|i| {
            let nb = if i % 2 == 0 { one.clone() } else { two.clone() };
            async move { nb.add_port("shared", &port(&format!("p{i}"), 10 + i, PortAddress::Dynamic)).await }
        });
        for result in futures_join_all(adds).await {
            result.unwrap();
        }
        let names = central.nbctl(&["--bare", "--columns=name", "list", "Logical_Switch_Port"]);
        assert_eq!(names.lines().filter(|l| !l.is_empty()).count(), 21, "{names}");

        // Overlapping subnets created at once: one is refused.
        let (o1, o2) = (switch("o1", "10.60.0.0/16"), switch("o2", "10.60.1.0/24"));
        let (a, b) = tokio::join!(one.create_switch(&o1), two.create_switch(&o2));
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    });
}

/// Joins futures without a dependency on the `futures` crate.
async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("task panicked"));
    }
    out
}

#[test]
fn nb_restart_loses_and_doubles_nothing() {
    if skip_without_ovn() {
        return;
    }
    run(async {
        let mut central = OvnCentral::start();
        let nb = connect(&central).await;
        nb.create_switch(&switch("s", "10.70.0.0/24")).await.unwrap();
        for i in 0..5u8 {
            nb.add_port("s", &port(&format!("before{i}"), i, PortAddress::Dynamic)).await.unwrap();
        }
        let mut state = nb.client().state();
        central.kill_nb();
        state.wait_for(|s| !matches!(s, qx_net::ovsdb::ConnectionState::Connected { .. })).await.unwrap();
        assert!(!nb.monitor().is_synced());

        // A write issued while the NB server is down waits for it and lands once.
        let pending = tokio::spawn({
            let nb = nb.clone();
            async move { nb.add_port("s", &port("during", 50, PortAddress::Static("10.70.0.50".parse().unwrap()))).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        central.restart_nb();
        pending.await.unwrap().unwrap();
        nb.monitor().wait_synced(WAIT).await.unwrap();
        nb.add_port("s", &port("after", 60, PortAddress::Dynamic)).await.unwrap();

        let mut expected: Vec<String> = (0..5).map(|i| format!("before{i}")).collect();
        expected.extend(["after".to_owned(), "during".to_owned()]);
        expected.sort();
        let replica: Vec<String> = nb.switch_ports("s").into_iter().map(|p| p.name).collect();
        assert_eq!(replica, expected, "the monitor came back with every port once");
        let mut listed: Vec<String> = central
            .nbctl(&["--bare", "--columns=name", "list", "Logical_Switch_Port"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        listed.sort();
        assert_eq!(listed, expected, "the database has every port once");
    });
}

/// Plugs an OVS internal port for logical port `name` into `br-int` of `chassis`, with the port's MAC and an IP,
/// in the chassis's network namespace.
fn plug_internal(chassis: &Chassis, iface: &str, logical_port: &str, mac: &str, cidr: &str) {
    chassis.vsctl(&[
        "add-port",
        "br-int",
        iface,
        "--",
        "set",
        "Interface",
        iface,
        "type=internal",
        &format!("external_ids:iface-id={logical_port}"),
    ]);
    let ns = chassis.netns().expect("chassis in its own namespace");
    ns.ip(&["link", "set", iface, "address", mac]);
    ns.ip(&["addr", "add", cidr, "dev", iface]);
    ns.ip(&["link", "set", iface, "up"]);
}

#[test]
fn two_chassis_over_geneve_bind_ports_and_carry_traffic() {
    if skip_without_ovn() {
        return;
    }
    run(async {
        let central = OvnCentral::start();
        let (a, b) = Chassis::pair(&central, "gen");
        let nb = connect(&central).await;
        nb.create_switch(&switch("overlay", "10.80.0.0/24")).await.unwrap();
        let pa = PortSpec {
            requested_chassis: Some(a.name().into()),
            ..port("lp-a", 1, PortAddress::Static("10.80.0.11".parse().unwrap()))
        };
        let pb = PortSpec {
            requested_chassis: Some(b.name().into()),
            ..port("lp-b", 2, PortAddress::Static("10.80.0.12".parse().unwrap()))
        };
        nb.add_ports("overlay", &[pa.clone(), pb.clone()]).await.unwrap();
        let err = nb.wait_port_up("lp-a", Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, Error::UpTimeout { .. }), "not bound before it is plugged: {err}");

        plug_internal(&a, "vif-a", "lp-a", &pa.mac, "10.80.0.11/24");
        plug_internal(&b, "vif-b", "lp-b", &pb.mac, "10.80.0.12/24");
        nb.wait_port_up("lp-a", WAIT).await.unwrap();
        nb.wait_port_up("lp-b", WAIT).await.unwrap();
        assert_eq!(central.bound_chassis("lp-a").as_deref(), Some(a.name()));
        assert_eq!(central.bound_chassis("lp-b").as_deref(), Some(b.name()));

        let ns = a.netns().unwrap();
        let mut ping = ns.command("ping");
        ping.args(["-c", "3", "-W", "2", "-I", "vif-a", "10.80.0.12"]);
        let out = tokio::task::spawn_blocking(move || ping.output().unwrap()).await.unwrap();
        assert!(
            out.status.success(),
            "ping across the Geneve tunnel failed:\n{}\n{}\nlogs: {} and {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            a.ovs().dir().display(),
            b.ovs().dir().display()
        );
    });
}
