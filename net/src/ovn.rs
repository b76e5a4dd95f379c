//! Typed operations on OVN's northbound database (`OVN_Northbound`) over our own OVSDB client, without
//! `ovn-nbctl`: logical switches with a subnet, OVN's native DHCP and an optional localnet port; logical switch
//! ports with their addresses and port security; port groups and their ACLs; and a monitor that says when
//! `ovn-controller` has bound a port (`up`).
//!
//! - [`spec`]: what callers ask for ([`SwitchSpec`], [`PortSpec`], [`AclSpec`]), validated field by field.
//! - [`security_group`]: security groups ([`SecurityGroup`], [`Rule`]) and the port-group ACLs they render.
//! - [`northbound`]: [`Northbound`], the client. Every change is one transaction guarded by `wait` preconditions,
//!   so concurrent control planes cannot silently overwrite each other; reads come from its monitor's replica.
//!
//! Not here: the chassis side (the VM's OVS interface with `external_ids:iface-id` is [`crate::vswitch`]'s), the
//! southbound database, and starting OVN.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use qx_net::ovn::{DhcpSpec, Northbound, PortAddress, PortSpec, SwitchSpec};
//! use qx_net::ovsdb::ClientOptions;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let nb = Northbound::connect("unix:/run/ovn/ovnnb_db.sock".parse()?, ClientOptions::default()).await?;
//! let mut switch = SwitchSpec::new("tenant1");
//! switch.subnet = Some("10.10.0.0/24".parse()?);
//! switch.dhcp = Some(DhcpSpec::default());
//! nb.create_switch(&switch).await?;
//! let mut port = PortSpec::new("vm1-nic0", "52:54:00:12:34:56");
//! port.address = PortAddress::Dynamic;
//! nb.add_port("tenant1", &port).await?;
//! // ... plug the VM's tap into br-int with external_ids:iface-id=vm1-nic0, then:
//! nb.wait_port_up("vm1-nic0", Duration::from_secs(10)).await?;
//! println!("address: {:?}", nb.port("vm1-nic0").and_then(|p| p.ipv4));
//! # Ok(())
//! # }
//! ```

pub mod northbound;
pub mod security_group;
pub mod spec;

pub use northbound::{AclInfo, Error, Northbound, PortGroupInfo, PortInfo, SwitchInfo};
pub use security_group::{Direction, Protocol, Rule, SecurityGroup};
pub use spec::{AclAction, AclDirection, AclSpec, DhcpSpec, Ipv4Cidr, LocalnetSpec, PortAddress, PortSpec, SwitchSpec};
