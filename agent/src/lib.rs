//! The Quantix node daemon (`qx-node`) and its command-line client (`qxctl`).
//!
//! [`node::Node`] is the domain: configuration, host facts and the VMs (through `qx-vmm`). The gRPC service in
//! [`grpc`] is a thin front end over it; [`server`] puts it on a unix socket (and TCP when configured);
//! [`client::connect`] is how qxctl, qx-console and tests reach it. Nothing here spawns QEMU or speaks QMP:
//! that is `qx-vmm`'s work.
//!
//! ```no_run
//! use qx_proto::node::v1::GetNodeInfoRequest;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut node = qx_agent::client::connect("/run/quantix/node.sock").await?;
//! let info = node.get_node_info(GetNodeInfoRequest {}).await?.into_inner();
//! println!("{} runs QEMU {} with {}", info.node_name, info.qemu_version, info.accelerator);
//! # Ok(()) }
//! ```

mod authority;
pub mod authz;
pub mod certs;
pub mod client;
pub mod config;
mod convert;
pub mod grpc;
pub mod grpc_guest;
pub mod grpc_host;
pub mod grpc_migration;
pub mod grpc_security_group;
pub mod grpc_snapshot;
pub mod grpc_update;
pub mod host;
pub mod metrics;
pub mod migration;
pub mod network;
pub mod node;
pub mod paths;
pub mod security_groups;
pub mod server;
pub mod status;
pub mod ui;
pub mod volumes;
