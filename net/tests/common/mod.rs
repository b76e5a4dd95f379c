//! What the qx-net integration tests and the `ovsdb_ports` benchmark share: the Open vSwitch harness of
//! `qx-test-infra`, a runtime in a private network namespace, and endpoints in qx-net's terms.

#![allow(dead_code)]

use std::future::Future;

use qx_net::ovsdb::Endpoint;
pub use qx_test_infra::ovs::*;

/// Runs `test` on a fresh multi-threaded tokio runtime inside a private network namespace.
pub fn run<F: Future>(test: F) -> F::Output {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "qx_net=info".into()))
        .with_test_writer()
        .try_init();
    isolate_network();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test)
}

/// The harness's servers as qx-net endpoints.
pub trait OvsEndpoint {
    /// `unix:<socket>`.
    fn endpoint(&self) -> Endpoint;
    /// `tcp:127.0.0.1:<port>`, for a server started with `start_db_with_tcp`.
    fn tcp_endpoint(&self) -> Endpoint;
}

impl OvsEndpoint for Ovs {
    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.db_socket())
    }

    fn tcp_endpoint(&self) -> Endpoint {
        Endpoint::Tcp(format!("127.0.0.1:{}", self.tcp_port()))
    }
}
