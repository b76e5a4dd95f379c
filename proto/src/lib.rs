//! The Quantix node API: `.proto` files under `proto/` and the code tonic generates from them.
//!
//! This crate holds wire types only. Domain types live in `qx-vmm` and friends; the `agent` crate's service layer
//! converts between the two, so no other crate depends on this one.
//!
//! ```no_run
//! use qx_proto::node::v1::{node_service_client::NodeServiceClient, ListVmsRequest};
//! # async fn demo(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
//! let vms = NodeServiceClient::new(channel).list_vms(ListVmsRequest {}).await?.into_inner().vms;
//! # Ok(()) }
//! ```

/// Every message and service of the files above, encoded as a `FileDescriptorSet`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/quantix_descriptor.bin"));

/// `quantix.node.v1`.
pub mod node {
    /// Version 1 of the node API.
    pub mod v1 {
        tonic::include_proto!("quantix.node.v1");
    }
}

/// `quantix.controlplane.v1`: the API a control plane serves and qx-node calls.
pub mod controlplane {
    /// Version 1 of the control-plane API.
    pub mod v1 {
        tonic::include_proto!("quantix.controlplane.v1");
    }
}
