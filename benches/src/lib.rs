//! Benchmarks that put Quantix beside its comparisons in one run: VM start latency against raw QEMU and libvirt, image copies, OVSDB port churn. Not yet implemented.
