//! Storage for Quantix VMs: the io_uring image engine, pools, volumes, qcow2 overlays and cloud-init seeds. Not yet implemented; VM disks name image paths directly until it is.
