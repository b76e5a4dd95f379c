//! Typed Open vSwitch operations against real ovsdb-server and ovs-vswitchd (userspace datapath), checked with
//! `ovs-vsctl` as an independent reader.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use qx_net::names::{tap_name, MacAddr};
use qx_net::ovsdb::ClientOptions;
use qx_net::tap::{delete_tap, link_exists, Tap, TapConfig};
use qx_net::vswitch::{
    BridgeSpec, DatapathType, Error, ExternalIds, Policing, PortKind, PortSpec, VSwitch, VlanConfig,
};
use uuid::Uuid;

use common::{run, skip_without_ovs, Ovs, OvsEndpoint};

const WAIT: Duration = Duration::from_secs(20);

async fn vswitch(ovs: &Ovs) -> VSwitch {
    let opts = ClientOptions { request_timeout: WAIT, ..ClientOptions::default() };
    VSwitch::connect(ovs.endpoint(), opts).await.unwrap()
}

#[test]
fn tap_port_with_vlan_and_external_ids_gets_an_ofport_and_is_removed() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start();
        let vs = vswitch(&ovs).await;
        let bridge_uuid = vs.ensure_bridge(&BridgeSpec::new("br-qx", DatapathType::Netdev)).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Bridge", "br-qx", "datapath_type"]), "netdev");
        assert_eq!(ovs.vsctl(&["get", "Bridge", "br-qx", "_uuid"]), bridge_uuid.to_string());

        let vm = Uuid::new_v4();
        let name = tap_name(&vm, 0);
        let tap = Tap::create(TapConfig::new(name.clone())).await.unwrap();
        let mac = MacAddr::random_local();
        let spec = PortSpec {
            vlan: VlanConfig::Access { tag: 10 },
            external_ids: ExternalIds {
                vm_id: Some(vm),
                iface_id: Some(format!("lsp-{vm}")),
                attached_mac: Some(mac.to_string()),
                ..ExternalIds::default()
            },
            mtu: Some(1400),
            ..PortSpec::new(name.as_str())
        };
        let added = vs.add_port("br-qx", &spec).await.unwrap();
        assert_eq!(added.name, name.as_str());

        let ofport = vs.wait_ofport(name.as_str(), WAIT).await.unwrap();
        assert!(ofport >= 1, "{ofport}");
        assert_eq!(ovs.vsctl(&["get", "Interface", name.as_str(), "ofport"]), ofport.to_string());
        assert_eq!(ovs.vsctl(&["get", "Port", name.as_str(), "tag"]), "10");
        assert_eq!(ovs.vsctl(&["port-to-br", name.as_str()]), "br-qx");
        assert_eq!(ovs.vsctl(&["get", "Interface", name.as_str(), "external_ids:attached-mac"]), format!("\"{mac}\""));
        assert_eq!(ovs.vsctl(&["get", "Interface", name.as_str(), "external_ids:vm-id"]), format!("\"{vm}\""));
        assert_eq!(ovs.vsctl(&["get", "Interface", name.as_str(), "mtu_request"]), "1400");

        let info = vs.port(name.as_str()).unwrap();
        assert_eq!(info.bridge.as_deref(), Some("br-qx"));
        assert_eq!(info.vlan, VlanConfig::Access { tag: 10 });
        assert_eq!(info.interfaces[0].ofport, Some(i64::from(ofport)));
        assert_eq!(info.interfaces[0].external_ids["iface-id"], format!("lsp-{vm}"));
        assert!(vs.bridge_ports("br-qx").contains(&name.as_str().to_owned()));

        // ovs-vswitchd applied the MTU to the tap itself.
        vs.sync(WAIT).await.unwrap();
        assert!(common::ip(&["link", "show", name.as_str()]).contains("mtu 1400"));

        assert!(vs.remove_port(name.as_str()).await.unwrap());
        assert!(vs.port(name.as_str()).is_none());
        assert_eq!(ovs.vsctl(&["list-ports", "br-qx"]), "");
        assert!(!vs.remove_port(name.as_str()).await.unwrap(), "idempotent");

        drop(tap);
        assert!(!delete_tap(&name).await.unwrap(), "a non-persistent tap goes with its fds");
        assert!(!link_exists(&name).unwrap());
    });
}

#[test]
fn internal_ports_trunks_policing_and_updates() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start();
        let vs = vswitch(&ovs).await;
        let mut bridge = BridgeSpec::new("br-int", DatapathType::Netdev);
        bridge.external_ids.insert("owner".into(), "qx".into());
        vs.ensure_bridge(&bridge).await.unwrap();

        let specs: Vec<PortSpec> = (0..5)
            .map(|i| PortSpec {
                kind: PortKind::Internal,
                vlan: if i == 0 { VlanConfig::Trunk { trunks: vec![100, 200, 300] } } else { VlanConfig::None },
                ingress_policing: (i == 1).then_some(Policing { rate_kbps: 10_000, burst_kb: 1_000 }),
                ..PortSpec::new(format!("int{i}"))
            })
            .collect();
        let refs = vs.add_ports("br-int", &specs).await.unwrap();
        assert_eq!(refs.len(), 5);
        assert!(refs.iter().all(|r| !r.port.is_nil() && !r.interface.is_nil()));
        for spec in &specs {
            vs.wait_ofport(&spec.name, WAIT).await.unwrap();
        }
        assert_eq!(ovs.vsctl(&["get", "Port", "int0", "trunks"]), "[100, 200, 300]");
        assert_eq!(ovs.vsctl(&["get", "Port", "int0", "vlan_mode"]), "trunk");
        assert_eq!(ovs.vsctl(&["get", "Interface", "int1", "ingress_policing_rate"]), "10000");
        assert_eq!(ovs.vsctl(&["get", "Interface", "int1", "type"]), "internal");
        assert_eq!(ovs.vsctl(&["list-ports", "br-int"]).lines().count(), 5);

        vs.set_port_vlan("int2", &VlanConfig::Access { tag: 42 }).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Port", "int2", "tag"]), "42");
        vs.set_port_vlan("int0", &VlanConfig::None).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Port", "int0", "trunks"]), "[]");
        vs.set_mtu("int3", Some(1280)).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Interface", "int3", "mtu_request"]), "1280");
        vs.set_mtu("int3", None).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Interface", "int3", "mtu_request"]), "[]");
        vs.set_ingress_policing("int1", None).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Interface", "int1", "ingress_policing_rate"]), "0");
        let ids = ExternalIds {
            iface_id: Some("lsp-int4".into()),
            extra: BTreeMap::from([("note".into(), "x".into())]),
            ..ExternalIds::default()
        };
        vs.set_external_ids("int4", &ids).await.unwrap();
        assert_eq!(ovs.vsctl(&["get", "Interface", "int4", "external_ids:iface-id"]), "lsp-int4");
        let err = vs.set_port_vlan("nope", &VlanConfig::Access { tag: 5 }).await.unwrap_err();
        assert!(matches!(err, Error::PortNotFound { .. }), "{err}");

        // ensure_bridge is idempotent, and brings the datapath type and ids to the spec.
        let uuid = vs.ensure_bridge(&bridge).await.unwrap();
        assert_eq!(vs.ensure_bridge(&bridge).await.unwrap(), uuid);
        bridge.external_ids.insert("owner".into(), "someone-else".into());
        assert_eq!(vs.ensure_bridge(&bridge).await.unwrap(), uuid);
        assert_eq!(ovs.vsctl(&["get", "Bridge", "br-int", "external_ids:owner"]), "someone-else");

        assert!(vs.delete_bridge("br-int").await.unwrap());
        assert_eq!(ovs.vsctl(&["list-br"]), "");
        assert_eq!(ovs.vsctl(&["--columns=name", "list", "Interface"]), "", "ports and interfaces went with it");
        assert!(!vs.delete_bridge("br-int").await.unwrap());
    });
}

#[test]
fn conflicts_and_hostile_input_are_refused_clearly() {
    if skip_without_ovs() {
        return;
    }
    run(async {
        let ovs = Ovs::start();
        let vs = vswitch(&ovs).await;
        vs.ensure_bridge(&BridgeSpec::new("br0", DatapathType::Netdev)).await.unwrap();

        // Refused before reaching OVS, every problem named.
        let hostile = PortSpec { vlan: VlanConfig::Access { tag: 4095 }, ..PortSpec::new("tap0 ; rm -rf /") };
        let err = vs.add_port("br0", &hostile).await.unwrap_err();
        let Error::Invalid(problems) = &err else { panic!("{err}") };
        assert_eq!(problems.0.len(), 2, "{err}");
        assert_eq!(problems.first_field(), "port.name");
        assert!(err.to_string().contains(r#"port.vlan.tag: "4095" is outside 1..=4094"#), "{err}");
        let err = vs.ensure_bridge(&BridgeSpec::new("br/x", DatapathType::Netdev)).await.unwrap_err();
        assert!(err.to_string().contains(r#"bridge.name: "br/x""#), "{err}");
        let trunks = PortSpec { vlan: VlanConfig::Trunk { trunks: vec![10, 5000] }, ..PortSpec::new("p1") };
        let err = vs.add_port("br0", &trunks).await.unwrap_err();
        assert!(err.to_string().contains(r#"port.vlan.trunks[1]: "5000" is outside 1..=4094"#), "{err}");

        // Conflicts found by the transaction's preconditions.
        let mac = "52:54:00:00:00:01";
        let with_mac = |name: &str, mac: &str| PortSpec {
            kind: PortKind::Internal,
            external_ids: ExternalIds { attached_mac: Some(mac.into()), ..ExternalIds::default() },
            ..PortSpec::new(name)
        };
        let err = vs.add_port("br-missing", &with_mac("p1", mac)).await.unwrap_err();
        assert_eq!(err.to_string(), "bridge br-missing does not exist");
        vs.add_port("br0", &with_mac("p1", mac)).await.unwrap();
        let err = vs.add_port("br0", &with_mac("p1", "52:54:00:00:00:02")).await.unwrap_err();
        assert_eq!(err.to_string(), "port p1 already exists on bridge br0");
        let err = vs.add_port("br0", &with_mac("p2", "52:54:00:00:00:01")).await.unwrap_err();
        assert_eq!(err.to_string(), "attached-mac 52:54:00:00:00:01 of port p2 is already used by interface p1");
        // Case does not hide a duplicate.
        let err = vs.add_port("br0", &with_mac("p2", "52:54:00:00:00:01".to_uppercase().as_str())).await.unwrap_err();
        assert!(matches!(err, Error::MacInUse { .. }), "{err}");
        // Within one batch too, before the transaction.
        let err = vs
            .add_ports("br0", &[with_mac("p3", "52:54:00:00:00:03"), with_mac("p4", "52:54:00:00:00:03")])
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"ports[1].external_ids.attached_mac: "52:54:00:00:00:03" is used by another port"#),
            "{err}"
        );
        // Nothing of a failed batch is left behind.
        let err = vs
            .add_ports("br0", &[with_mac("p5", "52:54:00:00:00:05"), with_mac("p1", "52:54:00:00:00:06")])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PortExists { .. }), "{err}");
        assert!(vs.port("p5").is_none());
        assert_eq!(ovs.vsctl(&["list-ports", "br0"]), "p1");

        // A system port whose device does not exist: ovs-vswitchd's error comes back through the monitor.
        vs.add_port("br0", &PortSpec::new("qxmissing0")).await.unwrap();
        let err = vs.wait_ofport("qxmissing0", WAIT).await.unwrap_err();
        assert!(matches!(&err, Error::PortFailed { error, .. } if error.contains("qxmissing0")), "{err}");
    });
}
