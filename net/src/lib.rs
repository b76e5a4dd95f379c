//! Host networking for Quantix VMs, without `ovs-vsctl` or `ip` subprocesses: our own OVSDB client, Open vSwitch
//! bridges and ports on top of it, and tap devices created here and handed to QEMU as file descriptors.
//!
//! - [`ovsdb`]: an async OVSDB (RFC 7047) client: transactions, monitors that survive reconnects, echo, cancel.
//! - [`vswitch`]: typed operations on the `Open_vSwitch` database: ensure a bridge, add and remove ports with a
//!   VLAN tag or trunks, `external_ids` (`vm-id`, `iface-id`, `attached-mac`), MTU, ingress policing, and waiting
//!   for `ofport` through a monitor.
//! - [`tap`]: tap devices (`TUNSETIFF`, `vnet_hdr`, multiqueue) whose queue fds go to QEMU over QMP (`getfd` +
//!   `netdev_add`), so QEMU needs no network privileges.
//! - [`ovn`]: typed operations on OVN's northbound database: logical switches, ports, DHCP, port groups, ACLs.
//! - [`names`]: stable tap names and MAC addresses, and validation that refuses hostile names, VLANs and MACs with
//!   the field and the value.
//!
//! It does not talk to QEMU (the `vmm` crate passes the fds over its QMP client), does not configure host IP
//! addresses, routes or firewalls (OVN ACLs are the VMs' firewall), and does not start Open vSwitch or OVN.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use qx_net::names::{tap_name, MacAddr};
//! use qx_net::ovsdb::{ClientOptions, Endpoint};
//! use qx_net::tap::{Tap, TapConfig};
//! use qx_net::vswitch::{BridgeSpec, DatapathType, ExternalIds, PortSpec, VlanConfig, VSwitch};
//!
//! # async fn example(vm: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
//! let endpoint: Endpoint = "unix:/run/openvswitch/db.sock".parse()?;
//! let vswitch = VSwitch::connect(endpoint, ClientOptions::default()).await?;
//! vswitch.ensure_bridge(&BridgeSpec::new("br-vm", DatapathType::System)).await?;
//!
//! // NIC 0 of `vm`: a tap named after the VM, plugged into VLAN 10.
//! let name = tap_name(&vm, 0);
//! let tap = Tap::create(TapConfig::new(name.clone())).await?;
//! let mut port = PortSpec::new(name.as_str());
//! port.vlan = VlanConfig::Access { tag: 10 };
//! port.external_ids = ExternalIds {
//!     vm_id: Some(vm),
//!     attached_mac: Some(MacAddr::random_local().to_string()),
//!     ..ExternalIds::default()
//! };
//! vswitch.add_port("br-vm", &port).await?;
//! let ofport = vswitch.wait_ofport(name.as_str(), Duration::from_secs(5)).await?;
//! println!("{name} is OpenFlow port {ofport}; queue fds for QEMU: {}", tap.queues().len());
//! # Ok(())
//! # }
//! ```

pub mod names;
pub mod ovn;
pub mod ovsdb;
pub mod tap;
pub mod vswitch;
