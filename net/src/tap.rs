//! Tap devices for VM NICs, created by the daemon and handed to QEMU as file descriptors.
//!
//! [`Tap::create`] opens `/dev/net/tun` once per queue and attaches each fd to the tap with `TUNSETIFF`
//! (`IFF_TAP | IFF_NO_PI`, plus `IFF_VNET_HDR` for virtio offloads and `IFF_MULTI_QUEUE` for more than one queue).
//! The first attach uses `IFF_TUN_EXCL`, so an existing device of that name is an error
//! ([`Error::TapExists`]) rather than silently shared. The link is then brought up (QEMU does not do it for a tap
//! it is given) and its MTU set.
//!
//! The queue fds go to QEMU over QMP: `getfd` once per queue under the names [`Tap::fd_names`] gives, then
//! `netdev_add` with [`Tap::netdev_add_arguments`]. QEMU then needs neither `CAP_NET_ADMIN` nor access to
//! `/dev/net/tun`. A tap that is not persistent (the default) lives as long as some process holds one of its fds:
//! once QEMU has its copies, drop the [`Tap`], and the kernel removes the device when QEMU exits. [`delete_tap`]
//! removes it at once (with rtnetlink, even while QEMU still holds it), and is harmless when it is already gone.
//!
//! The ioctls are in [`ioctl`], the rtnetlink request in [`netlink`]. Both act in the calling thread's network
//! namespace.

mod ioctl;
mod netlink;

use std::ffi::c_int;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde_json::{json, Value as Json};
use tracing::{debug, info};

use crate::names::{check_mtu, IfName, Problems, ValidationErrors};

/// The tun/tap control device.
pub const DEFAULT_TUN_DEVICE: &str = "/dev/net/tun";
/// The most queues a tap may have (`MAX_TAP_QUEUES` in the kernel).
pub const MAX_QUEUES: u16 = 256;

/// What [`Tap::create`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    /// The interface name, usually [`tap_name`](crate::names::tap_name).
    pub name: IfName,
    /// Queues, one fd each; more than one makes a multiqueue tap (pair it with `mq=on` on virtio-net). Default: 1.
    pub queues: u16,
    /// `IFF_VNET_HDR`: frames carry a virtio-net header, which lets QEMU/vhost pass offloads (TSO, checksum).
    /// Default: true.
    pub vnet_hdr: bool,
    /// MTU to set; the kernel default (1500) when `None`.
    pub mtu: Option<u32>,
    /// Whether the device outlives its fds (`TUNSETPERSIST`); then only [`delete_tap`] removes it. Default: false.
    pub persist: bool,
    /// Bring the link up. Default: true.
    pub up: bool,
    /// The tun control device; tests point it elsewhere. Default: `/dev/net/tun`.
    pub tun_device: PathBuf,
}

impl TapConfig {
    /// One queue, `vnet_hdr`, not persistent, up, kernel MTU.
    pub fn new(name: IfName) -> Self {
        Self {
            name,
            queues: 1,
            vnet_hdr: true,
            mtu: None,
            persist: false,
            up: true,
            tun_device: PathBuf::from(DEFAULT_TUN_DEVICE),
        }
    }

    /// Sets the number of queues.
    pub fn queues(mut self, queues: u16) -> Self {
        self.queues = queues;
        self
    }

    /// Every problem with the config, with the field and value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        if self.queues == 0 || self.queues > MAX_QUEUES {
            p.add("queues", self.queues, format!("is outside 1..={MAX_QUEUES}"));
        }
        if let Some(mtu) = self.mtu {
            p.check("mtu", mtu, check_mtu(mtu));
        }
        p.into_result()
    }
}

/// What went wrong creating or deleting a tap, named by the operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config is invalid.
    #[error("invalid tap config: {0}")]
    Invalid(#[from] ValidationErrors),

    /// `/dev/net/tun` could not be opened.
    #[error("opening {path} for tap {name}")]
    TunOpen {
        /// The tap.
        name: IfName,
        /// The tun device path.
        path: PathBuf,
        /// The open error.
        #[source]
        source: io::Error,
    },

    /// A device with this name exists already (another VM's tap, or one left over from a crash: see
    /// [`delete_tap`]).
    #[error("tap {name} already exists")]
    TapExists {
        /// The name.
        name: IfName,
    },

    /// `TUNSETIFF` failed.
    #[error("creating tap {name} (queue {queue})")]
    TapCreate {
        /// The tap.
        name: IfName,
        /// Which queue.
        queue: u16,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },

    /// `TUNSETPERSIST` failed.
    #[error("making tap {name} persistent")]
    TapPersist {
        /// The tap.
        name: IfName,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },

    /// Setting the MTU failed.
    #[error("setting MTU {mtu} on tap {name}")]
    TapMtu {
        /// The tap.
        name: IfName,
        /// The MTU.
        mtu: u32,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },

    /// Bringing the link up failed.
    #[error("bringing tap {name} up")]
    TapUp {
        /// The tap.
        name: IfName,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },

    /// Looking the device up failed.
    #[error("looking up interface {name}")]
    TapLookup {
        /// The device.
        name: IfName,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },

    /// [`delete_tap`] was asked to delete a device that is not a tap.
    #[error("interface {name} is not a tap (driver {driver:?}); not deleting it")]
    NotATap {
        /// The device.
        name: IfName,
        /// Its driver.
        driver: String,
    },

    /// `RTM_DELLINK` failed.
    #[error("deleting tap {name}")]
    TapDelete {
        /// The tap.
        name: IfName,
        /// The netlink error.
        #[source]
        source: io::Error,
    },

    /// The blocking task doing the work panicked or was cancelled.
    #[error("tap task for {name} did not complete")]
    Task {
        /// The tap.
        name: IfName,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A tap device and the fds of its queues.
///
/// Dropping it closes the fds; a non-persistent tap disappears when no process holds any of them any more.
#[derive(Debug)]
pub struct Tap {
    name: IfName,
    ifindex: u32,
    vnet_hdr: bool,
    persist: bool,
    queues: Vec<OwnedFd>,
}

impl Tap {
    /// Creates the tap on a blocking thread (the ioctls are quick, but this keeps the runtime's rule).
    pub async fn create(config: TapConfig) -> Result<Tap, Error> {
        let name = config.name.clone();
        tokio::task::spawn_blocking(move || Tap::create_blocking(&config))
            .await
            .map_err(|source| Error::Task { name, source })?
    }

    /// Creates the tap on the calling thread. See the [module documentation](self).
    pub fn create_blocking(config: &TapConfig) -> Result<Tap, Error> {
        config.validate()?;
        let name = &config.name;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if config.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if config.queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut queues = Vec::with_capacity(config.queues.into());
        for queue in 0..config.queues {
            let tun = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&config.tun_device)
                .map_err(|source| Error::TunOpen { name: name.clone(), path: config.tun_device.clone(), source })?;
            let tun = OwnedFd::from(tun);
            let queue_flags: c_int = if queue == 0 { flags | libc::IFF_TUN_EXCL } else { flags };
            match ioctl::tun_set_iff(tun.as_fd(), name.as_str(), queue_flags) {
                Ok(got) if got == name.as_str() => {}
                Ok(got) => {
                    return Err(Error::TapCreate {
                        name: name.clone(),
                        queue,
                        source: io::Error::other(format!("the kernel named it {got:?}")),
                    })
                }
                Err(e) if queue == 0 && e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(Error::TapExists { name: name.clone() })
                }
                Err(source) => return Err(Error::TapCreate { name: name.clone(), queue, source }),
            }
            queues.push(tun);
        }
        let tap = Tap { name: name.clone(), ifindex: 0, vnet_hdr: config.vnet_hdr, persist: config.persist, queues };
        // From here on, a failure must not leave a persistent device behind: persist is set last.
        let ifindex =
            ioctl::if_index(name.as_str()).map_err(|source| Error::TapLookup { name: name.clone(), source })?;
        if let Some(mtu) = config.mtu {
            ioctl::set_mtu(name.as_str(), mtu).map_err(|source| Error::TapMtu { name: name.clone(), mtu, source })?;
        }
        if config.up {
            ioctl::set_up(name.as_str()).map_err(|source| Error::TapUp { name: name.clone(), source })?;
        }
        if config.persist {
            ioctl::tun_set_persist(tap.queues[0].as_fd(), true)
                .map_err(|source| Error::TapPersist { name: name.clone(), source })?;
        }
        info!(tap = %name, ifindex, queues = config.queues, vnet_hdr = config.vnet_hdr, persist = config.persist, "tap created");
        Ok(Tap { ifindex, ..tap })
    }

    /// The interface name.
    pub fn name(&self) -> &IfName {
        &self.name
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Whether frames carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Whether the device outlives its fds.
    pub fn persist(&self) -> bool {
        self.persist
    }

    /// The queue fds, one per queue, to pass to QEMU (`getfd` borrows them).
    pub fn queues(&self) -> &[OwnedFd] {
        &self.queues
    }

    /// Gives up the queue fds, e.g. to keep them across a QEMU restart.
    pub fn into_queues(self) -> Vec<OwnedFd> {
        self.queues
    }

    /// The names to `getfd` the queue fds under for netdev `netdev_id`: `<netdev_id>-q<i>`.
    pub fn fd_names(&self, netdev_id: &str) -> Vec<String> {
        (0..self.queues.len()).map(|i| format!("{netdev_id}-q{i}")).collect()
    }

    /// The `netdev_add` arguments for a tap netdev `netdev_id` whose queue fds QEMU holds under `fd_names`
    /// (`fd` for one queue, `fds` for several). QEMU probes `vnet_hdr` from the fd. Add `"vhost": true` (QEMU
    /// opens `/dev/vhost-net` itself) or `"vhostfds"` to use vhost-net.
    pub fn netdev_add_arguments(&self, netdev_id: &str, fd_names: &[String]) -> Json {
        if let [name] = fd_names {
            json!({"type": "tap", "id": netdev_id, "fd": name})
        } else {
            json!({"type": "tap", "id": netdev_id, "fds": fd_names.join(":")})
        }
    }
}

/// Whether a network interface `name` exists in the calling thread's network namespace.
pub fn link_exists(name: &IfName) -> Result<bool, Error> {
    match ioctl::if_index(name.as_str()) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(source) => Err(Error::TapLookup { name: name.clone(), source }),
    }
}

/// Deletes tap `name` (rtnetlink `RTM_DELLINK`), even while QEMU still holds its fds. Returns `false` if there was
/// no such device. Refuses ([`Error::NotATap`]) to delete a device that is not a tap.
pub async fn delete_tap(name: &IfName) -> Result<bool, Error> {
    let owned = name.clone();
    tokio::task::spawn_blocking(move || delete_tap_blocking(&owned))
        .await
        .map_err(|source| Error::Task { name: name.clone(), source })?
}

/// [`delete_tap`] on the calling thread.
pub fn delete_tap_blocking(name: &IfName) -> Result<bool, Error> {
    let index = match ioctl::if_index(name.as_str()) {
        Ok(index) => index,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(false),
        Err(source) => return Err(Error::TapLookup { name: name.clone(), source }),
    };
    let driver = ioctl::driver(name.as_str()).unwrap_or_default();
    if driver != "tun" {
        return Err(Error::NotATap { name: name.clone(), driver });
    }
    match netlink::delete_link(index) {
        Ok(()) => {
            info!(tap = %name, "tap deleted");
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            debug!(tap = %name, "tap vanished before it could be deleted");
            Ok(false)
        }
        Err(source) => Err(Error::TapDelete { name: name.clone(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> IfName {
        IfName::new(s).unwrap()
    }

    #[test]
    fn config_is_validated_with_fields() {
        let mut config = TapConfig::new(name("qxt0"));
        assert!(config.validate().is_ok());
        config.queues = 0;
        config.mtu = Some(10);
        let err = config.validate().unwrap_err();
        assert_eq!(err.to_string(), r#"queues: "0" is outside 1..=256; mtu: "10" is outside 68..=65535"#);
    }

    #[test]
    fn missing_tun_device_is_reported_with_its_path() {
        let mut config = TapConfig::new(name("qxt0"));
        config.tun_device = "/nonexistent/dev/net/tun".into();
        let err = Tap::create_blocking(&config).unwrap_err();
        assert!(matches!(&err, Error::TunOpen { path, .. } if path.starts_with("/nonexistent")), "{err:?}");
        assert_eq!(err.to_string(), "opening /nonexistent/dev/net/tun for tap qxt0");
    }

    #[test]
    fn netdev_arguments() {
        let tap = Tap { name: name("qxt0"), ifindex: 1, vnet_hdr: true, persist: false, queues: Vec::new() };
        assert_eq!(
            tap.netdev_add_arguments("net0", &["net0-q0".into()]),
            json!({"type": "tap", "id": "net0", "fd": "net0-q0"})
        );
        assert_eq!(
            tap.netdev_add_arguments("net0", &["net0-q0".into(), "net0-q1".into()]),
            json!({"type": "tap", "id": "net0", "fds": "net0-q0:net0-q1"})
        );
    }

    #[test]
    fn deleting_what_is_not_a_tap_is_refused() {
        let err = delete_tap_blocking(&name("lo")).unwrap_err();
        assert!(matches!(err, Error::NotATap { .. }), "{err:?}");
        assert!(!delete_tap_blocking(&name("qxnonexist0")).unwrap());
        assert!(link_exists(&name("lo")).unwrap());
    }
}
