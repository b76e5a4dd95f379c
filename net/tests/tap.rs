//! Tap devices through the real /dev/net/tun, each test in a network namespace of its own; `ip -d link` is the
//! independent reader.

mod common;

use std::os::fd::AsFd;

use qx_net::names::{tap_name, IfName};
use qx_net::tap::{delete_tap, link_exists, Error, Tap, TapConfig};
use uuid::Uuid;

use common::{ip, run, skip_without_root};

fn details(name: &IfName) -> String {
    ip(&["-d", "link", "show", "dev", name.as_str()])
}

#[test]
fn single_queue_tap_is_created_up_with_vnet_hdr_and_goes_with_its_fd() {
    if skip_without_root() {
        return;
    }
    run(async {
        let name = tap_name(&Uuid::new_v4(), 0);
        let mut config = TapConfig::new(name.clone());
        config.mtu = Some(1450);
        let tap = Tap::create(config).await.unwrap();
        assert_eq!(tap.name(), &name);
        assert_eq!(tap.queues().len(), 1);
        assert!(tap.ifindex() > 0);
        assert!(link_exists(&name).unwrap());
        let shown = details(&name);
        assert!(shown.contains("tun type tap"), "{shown}");
        assert!(shown.contains("vnet_hdr on"), "{shown}");
        assert!(shown.contains("persist off"), "{shown}");
        assert!(shown.contains("mtu 1450"), "{shown}");
        assert!(shown.contains(",UP"), "{shown}");
        assert_eq!(tap.fd_names("net0"), ["net0-q0"]);

        drop(tap);
        assert!(!link_exists(&name).unwrap(), "non-persistent tap removed with its last fd");
    });
}

#[test]
fn multiqueue_tap_has_one_fd_per_queue() {
    if skip_without_root() {
        return;
    }
    run(async {
        let name = IfName::new("qxmq0").unwrap();
        let tap = Tap::create(TapConfig::new(name.clone()).queues(4)).await.unwrap();
        assert_eq!(tap.queues().len(), 4);
        let shown = details(&name);
        assert!(shown.contains("multi_queue"), "{shown}");
        assert_eq!(tap.fd_names("net1"), ["net1-q0", "net1-q1", "net1-q2", "net1-q3"]);
        assert_eq!(tap.netdev_add_arguments("net1", &tap.fd_names("net1"))["fds"], "net1-q0:net1-q1:net1-q2:net1-q3");
        // Each fd is its own queue: distinct open files.
        let inodes: std::collections::BTreeSet<_> =
            tap.queues().iter().map(|fd| rustix::fs::fstat(fd.as_fd()).unwrap().st_ino).collect();
        assert_eq!(inodes.len(), 1, "same device");
        let fds: std::collections::BTreeSet<_> = tap.queues().iter().map(|fd| format!("{fd:?}")).collect();
        assert_eq!(fds.len(), 4);
    });
}

#[test]
fn an_existing_name_is_refused_not_shared() {
    if skip_without_root() {
        return;
    }
    run(async {
        let name = IfName::new("qxtaken0").unwrap();
        let mut config = TapConfig::new(name.clone());
        config.persist = true;
        let first = Tap::create(config.clone()).await.unwrap();
        let err = Tap::create(TapConfig::new(name.clone())).await.unwrap_err();
        assert!(matches!(err, Error::TapExists { .. }), "{err}");
        assert_eq!(err.to_string(), "tap qxtaken0 already exists");
        // Not even a persistent tap nobody holds: a leftover must be deleted explicitly.
        drop(first);
        assert!(link_exists(&name).unwrap());
        let err = Tap::create(TapConfig::new(name.clone())).await.unwrap_err();
        assert!(matches!(err, Error::TapExists { .. }), "{err}");
        assert!(delete_tap(&name).await.unwrap());
        assert!(!link_exists(&name).unwrap());
        assert!(!delete_tap(&name).await.unwrap(), "deleting twice is fine");
        Tap::create(TapConfig::new(name)).await.unwrap();
    });
}

#[test]
fn delete_works_while_another_holder_keeps_the_fd() {
    if skip_without_root() {
        return;
    }
    run(async {
        let name = IfName::new("qxheld0").unwrap();
        let tap = Tap::create(TapConfig::new(name.clone())).await.unwrap();
        // Stands for QEMU: a process that still holds the queue fd.
        let held = tap.into_queues();
        assert!(delete_tap(&name).await.unwrap());
        assert!(!link_exists(&name).unwrap());
        drop(held);
    });
}

#[test]
fn deleting_a_device_that_is_not_a_tap_is_refused() {
    if skip_without_root() {
        return;
    }
    run(async {
        let lo = IfName::new("lo").unwrap();
        let err = delete_tap(&lo).await.unwrap_err();
        assert!(matches!(err, Error::NotATap { .. }), "{err}");
        assert!(link_exists(&lo).unwrap());
        ip(&["link", "add", "qxveth0", "type", "veth", "peer", "name", "qxveth1"]);
        let veth = IfName::new("qxveth0").unwrap();
        assert!(link_exists(&veth).unwrap());
        let err = delete_tap(&veth).await.unwrap_err();
        assert_eq!(err.to_string(), r#"interface qxveth0 is not a tap (driver "veth"); not deleting it"#);
        assert!(link_exists(&veth).unwrap());
    });
}
