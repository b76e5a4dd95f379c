//! Node networks end to end: qx-node drives a real ovsdb-server and ovs-vswitchd (userspace datapath) in a private
//! network namespace, plugs test-guest VMs into a bridge through taps it creates, and the guests ping each other.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::ovs::{isolate_network, skip_without_ovs, Ovs};
use qx_test_infra::{test_guest, Daemon};
use tonic::Code;

fn network(name: &str, vlan: u32) -> pb::Network {
    pb::Network { name: name.into(), bridge: "qxbr0".into(), vlan: Some(vlan), ..Default::default() }
}

/// A test-guest VM on `network` whose eth0 gets `address` from the kernel command line.
async fn create_on(client: &mut Client, name: &str, network: &str, address: &str, vcpus: u32) {
    let guest = test_guest();
    let spec_text = format!(
        "name: {name}\nvcpus: {vcpus}\nmemory_mib: 256\nkernel:\n  kernel: {}\n  initrd: {}\n  cmdline: \"{} qx.ip={address}/24\"\n\
         nics:\n  - kind: network\n    network: {network}\n",
        guest.kernel.display(),
        guest.initrd.display(),
        guest.cmdline
    );
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
}

/// Pings `address` from the guest behind `console` and returns the summary line.
async fn ping(console: &mut Console, address: &str) -> String {
    let before = console.seen.len();
    let command = format!("ping -c 3 -W 2 {address} | grep -o '[0-9]* packets received'; echo ping-$((1+1))-done\n");
    console.input.send(pb::ConsoleInput { data: command.into_bytes(), ..Default::default() }).await.unwrap();
    console.expect_count("ping-2-done", console.seen.matches("ping-2-done").count() + 1, Duration::from_secs(60)).await;
    let output = &console.seen[before..];
    output.lines().find(|l| l.contains("packets received") && !l.contains("grep")).unwrap_or_default().trim().to_owned()
}

/// Asks `ip` from this thread, so in this test's network namespace (sysfs shows the host's).
fn tap_exists(tap: &str) -> bool {
    let program = qx_test_infra::ovs::find_program("ip").expect("ip (iproute2)");
    std::process::Command::new(program).args(["link", "show", tap]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn vms_on_one_vlan_reach_each_other_but_not_across_vlans() {
    if skip_without_ovs() {
        return;
    }
    // Taps, bridges and ovs-vswitchd live in this test's own namespace; the daemon and its QEMUs inherit it.
    isolate_network();
    let ovs = Ovs::start();
    test_guest();
    let config = format!("ovs:\n  socket: {}\n  datapath_type: netdev\n", ovs.db_socket().display());
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;

        for (bad, field) in [
            (network("v", 4095), "vlan"),
            (network("v", 0), "vlan"),
            (network("v", 70000), "vlan"),
            (pb::Network { mtu: Some(10), ..network("v", 10) }, "mtu"),
            (network("bad name", 10), "name"),
            (pb::Network { bridge: "br/0".into(), ..network("v", 10) }, "bridge"),
        ] {
            let status = client.create_network(bad).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(field), "{field} not named: {}", status.message());
        }
        client.create_network(network("v10", 10)).await.unwrap();
        client.create_network(network("v20", 20)).await.unwrap();
        assert_eq!(client.create_network(network("v10", 10)).await.unwrap_err().code(), Code::AlreadyExists);
        let listed = client.list_networks(pb::ListNetworksRequest {}).await.unwrap().into_inner().networks;
        let listed: Vec<_> = listed.iter().map(|n| (n.name.as_str(), n.vlan)).collect();
        assert_eq!(listed, [("v10", Some(10)), ("v20", Some(20))]);

        // A missing network is refused before QEMU exists, leaving nothing behind.
        create_on(&mut client, "lost", "nope", "10.9.0.9", 1).await;
        let status = client.start_vm(pb::StartVmRequest { name: "lost".into(), paused: false }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("nics[0].network"), "{}", status.message());
        assert!(daemon.qemu_pids().is_empty());

        create_on(&mut client, "a", "v10", "10.9.0.1", 1).await;
        // Two vCPUs: b's tap has two queues and its NIC multiqueue on.
        create_on(&mut client, "b", "v10", "10.9.0.2", 2).await;
        create_on(&mut client, "c", "v20", "10.9.0.3", 1).await;
        // d is c's peer on VLAN 20: the positive control that c's NIC works at all.
        create_on(&mut client, "d", "v20", "10.9.0.4", 1).await;
        for name in ["a", "b", "c", "d"] {
            start(&mut client, name).await;
        }
        let mut a = boot(&mut client, "a").await;
        boot(&mut client, "b").await;
        let mut c = boot(&mut client, "c").await;
        boot(&mut client, "d").await;

        let same_vlan = ping(&mut a, "10.9.0.2").await;
        assert!(!same_vlan.is_empty() && !same_vlan.starts_with("0 "), "a -> b on VLAN 10: {same_vlan:?}\n{}", a.seen);
        let other_vlan = ping(&mut a, "10.9.0.3").await;
        assert_eq!(other_vlan, "0 packets received", "a -> c across VLANs");
        // c is on VLAN 20 and reaches its peer there, so the silence above is the VLANs', not a broken NIC's.
        let c_tap = get(&mut client, "c").await.runtime.unwrap().nics.into_iter().next().expect("c's NIC").tap;
        assert_eq!(ovs.vsctl(&["get", "Port", &c_tap, "tag"]), "20");
        let c_to_d = ping(&mut c, "10.9.0.4").await;
        assert!(!c_to_d.is_empty() && !c_to_d.starts_with("0 "), "c -> d on VLAN 20: {c_to_d:?}\n{}", c.seen);

        let b = get(&mut client, "b").await;
        let nic = b.runtime.unwrap().nics.into_iter().next().expect("b's NIC status");
        assert!(nic.ofport > 0, "{nic:?}");
        assert!(tap_exists(&nic.tap));
        assert!(ovs.vsctl(&["list-ports", "qxbr0"]).lines().any(|p| p == nic.tap));
        assert_eq!(ovs.vsctl(&["get", "Port", &nic.tap, "tag"]), "10");
        // The OVS interface is named for OVN by the NIC's id, not its position.
        let uuid = b.spec.as_ref().unwrap().uuid.clone();
        assert_eq!((nic.id.as_str(), nic.iface_id.clone()), ("nic0", format!("{uuid}-nic0")));
        let iface_id = ovs.vsctl(&["get", "Interface", &nic.tap, "external_ids:iface-id"]);
        assert_eq!(iface_id.trim_matches('"'), nic.iface_id);

        let status = client.delete_network(pb::NetworkRef { name: "v10".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "a network in use stays: {status:?}");

        let request = pb::StopVmRequest { name: "b".into(), force: true, timeout_seconds: 0 };
        client.stop_vm(request).await.unwrap();
        assert!(!ovs.vsctl(&["list-ports", "qxbr0"]).lines().any(|p| p == nic.tap), "port removed at stop");
        assert!(!tap_exists(&nic.tap), "tap removed at stop");

        for name in ["a", "c", "d"] {
            let request = pb::StopVmRequest { name: name.into(), force: true, timeout_seconds: 0 };
            client.stop_vm(request).await.unwrap();
        }
        assert_eq!(ovs.vsctl(&["list-ports", "qxbr0"]), "", "no stray ports");
    });
}
