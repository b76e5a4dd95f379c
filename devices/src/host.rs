//! Host paths under one configurable root, so tests can fake `/sys`, `/dev` and `/proc` in a temp dir: the type
//! lives in `qx-common`, shared with `qx-vmm` and the other crates.

pub use qx_common::HostRoot;
