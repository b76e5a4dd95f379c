//! Starting a VM: the checks before anything is created (accelerator, networks, volumes), the cold start (a new
//! QEMU with the devices on its command line), the warm start (a pre-launched QEMU taken from the pool, its devices
//! hotplugged), the QEMU spawn and QMP handshake they share, and the warm pool's refill task.

use std::fs::{self, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use qx_common::blocking;
use qx_qmp::QmpClient;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{now_unix_ms, qmp_options, validated, BoxError, Entry, Runtime, VmError, VmInfo, VmManager};
use crate::accel::Accel;
use crate::cmdline::{qemu_args, Hardware, LaunchLayout, NetworkNic};
use crate::console::{ConsoleError, SerialConsole};
use crate::device_tree::DeviceTree;
use crate::guest_agent::{agent_options, GuestAgent};
use crate::machine::HOST_CPU;
use crate::network::network_nics;
use crate::persist::{read_tail, VmDir};
use crate::process::{read_pidfile, QemuProcess};
use crate::qmp_ops::{self, plug_device, Simple};
use crate::spec::{AccelChoice, ValidationErrors, VmSpec};
use crate::state::VmState;
use crate::warm::{launch_key, Warm};

/// Fd numbers QEMU finds its pre-bound sockets at.
const QMP_FD: i32 = 3;
const SERIAL_FD: i32 = 4;
const QGA_FD: i32 = 5;
/// How much of `qemu.log` a failed start quotes.
const START_LOG_TAIL: u64 = 2048;
/// How long the warm pool waits after a failed launch, and how often it looks for QEMUs that died.
const WARM_RETRY: Duration = Duration::from_secs(10);

/// How a VM starts ([`VmManager::start_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Leave the vCPUs stopped once every device is plugged (libvirt's `--paused`): the VM is `paused`, QEMU is
    /// in `prelaunch` and the guest has not run an instruction; a resume runs it.
    pub paused: bool,
}

impl VmManager {
    /// Spawns QEMU and runs the guest. Valid when stopped or crashed; a failed start leaves the VM as it was.
    pub async fn start(&self, name: &str) -> Result<VmInfo, VmError> {
        self.start_with(name, StartOptions::default()).await
    }

    /// [`VmManager::start`] with options: `paused` leaves the VM `paused` before its first instruction. Valid when
    /// stopped or crashed; a failed start leaves the VM as it was.
    pub async fn start_with(&self, name: &str, options: StartOptions) -> Result<VmInfo, VmError> {
        let paused = options.paused;
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let previous = entry.require("start", "stopped", &[VmState::Stopped, VmState::Crashed])?;
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        // Two QEMUs on the same disks would corrupt them: never start next to one qx-node could not take back.
        let (pidfile, host, uuid) = (entry.dir.pidfile(), self.inner.config.host.clone(), spec.uuid());
        let orphan =
            blocking(move || read_pidfile(&pidfile).filter(|pid| crate::process::is_qemu_of(&host, *pid, uuid))).await;
        if let Some(pid) = orphan {
            return Err(VmError::Orphan { name: name.to_owned(), pid });
        }
        let spec = validated(spec).await?;
        let accel = self.resolve_accel(&spec)?;
        self.check_networks(&spec).await?;
        let spec = self.resolve_volumes(name, spec).await?;
        let starting = self.set_state(&entry, VmState::Starting, "start requested");
        let launched = match self.inner.warm.take(&spec, &devices, accel) {
            Some(warm) => match self.launch_warm(&entry, &spec, &devices, warm, starting, paused).await {
                Ok(runtime) => Ok(runtime),
                Err(e) => {
                    warn!(vm = %name, error = %e, "warm start failed; starting cold");
                    // The warm attempt may have ended before `starting` was written.
                    self.set_state(&entry, VmState::Starting, "start requested").await;
                    self.launch(&entry, &spec, &devices, accel, paused).await
                }
            },
            None => {
                starting.await;
                self.launch(&entry, &spec, &devices, accel, paused).await
            }
        };
        match launched {
            Ok(runtime) => {
                {
                    let mut status = entry.status();
                    status.record.pid = Some(runtime.process.pid());
                    status.record.started_at_unix = Some(now_unix_ms() / 1000);
                    status.record.accel = Some(accel);
                    status.runtime = Some(Arc::clone(&runtime));
                }
                info!(vm = %name, pid = runtime.process.pid(), %accel, paused, "started");
                if paused {
                    // Written before the answer: a restarted daemon keeps a QEMU in `prelaunch` only when
                    // state.json says the start finished paused (otherwise the start was cut short).
                    self.set_state(&entry, VmState::Paused, "started paused").await;
                } else {
                    self.set_state_deferred(&entry, VmState::Running, "started");
                }
                self.supervise(Arc::clone(&entry), runtime);
                Ok(entry.info())
            }
            Err(e) => {
                warn!(vm = %name, error = %e, "start failed");
                self.set_state(&entry, previous, &format!("start failed: {e}")).await;
                Err(e)
            }
        }
    }

    /// `spec` with every volume disk given its file and format; refuses missing volumes and volumes a running VM
    /// writes to (or that this one would write to while another runs), naming the disk.
    pub(super) async fn resolve_volumes(&self, name: &str, mut spec: VmSpec) -> Result<VmSpec, VmError> {
        let mut problems = Vec::new();
        let mut in_use = Vec::new();
        for i in 0..spec.disks.len() {
            let Some(volume) = spec.disks[i].volume.clone() else { continue };
            let field = format!("disks[{i}].volume");
            let read_only = spec.disks[i].read_only;
            let users: Vec<String> = self
                .vms_read()
                .values()
                .filter(|other| other.name != name && other.state().is_active())
                .filter(|other| {
                    let status = other.status();
                    let disks = &status.spec.disks;
                    disks.iter().any(|d| d.volume.as_ref() == Some(&volume) && !(d.read_only && read_only))
                })
                .map(|other| other.name.clone())
                .collect();
            if !users.is_empty() {
                in_use.push((field, volume, format!("is in use by running VM {}", users.join(", "))));
                continue;
            }
            let Some(backend) = &self.inner.backends.volumes else {
                problems.push((field, volume, "cannot be used: this node has no storage pools".to_owned()));
                continue;
            };
            match backend.resolve(&volume).await {
                Ok((path, format)) => {
                    spec.disks[i].path = Some(path);
                    spec.disks[i].format = format;
                }
                Err(problem) => problems.push((field, volume, problem)),
            }
        }
        let errors = |list: Vec<(String, String, String)>| {
            let list =
                list.into_iter().map(|(field, value, problem)| crate::spec::FieldError { field, value, problem });
            ValidationErrors(list.collect())
        };
        if !problems.is_empty() {
            return Err(errors(problems).into());
        }
        if !in_use.is_empty() {
            return Err(VmError::VolumesInUse(errors(in_use)));
        }
        Ok(spec)
    }

    /// Refuses, before anything is created, a VM whose networks are missing or unreachable.
    pub(super) async fn check_networks(&self, spec: &VmSpec) -> Result<(), VmError> {
        let Some(first) = network_nics(spec).next() else { return Ok(()) };
        match &self.inner.backends.network {
            Some(backend) => backend.check(spec).await.map_err(VmError::from),
            None => {
                let network = spec.nics[first].network.clone().unwrap_or_default();
                let field = format!("nics[{first}].network");
                Err(ValidationErrors::one(field, network, "cannot be attached: this node has no switch configured")
                    .into())
            }
        }
    }

    /// Plugs NIC `nic` into QEMU: the backend's tap fds over `getfd`, a tap netdev, then the device.
    pub(super) async fn plug_network_nic(
        &self,
        qmp: &QmpClient,
        spec: &VmSpec,
        nic: &NetworkNic,
    ) -> Result<(), String> {
        let backend = self.inner.backends.network.as_ref().ok_or("no network backend")?;
        let fds = backend.attach(spec, &nic.slot).await?;
        let mut names = Vec::with_capacity(fds.len());
        for (queue, fd) in fds.iter().enumerate() {
            let name = format!("{}-q{queue}", nic.slot.netdev);
            qmp.getfd(&name, std::os::fd::AsFd::as_fd(fd)).await.map_err(|e| format!("getfd {name}: {e}"))?;
            names.push(name);
        }
        let netdev = qmp_ops::tap_netdev(&nic.slot.netdev, &names);
        qmp_ops::netdev_add(qmp, &netdev).await.map_err(|e| format!("netdev_add {}: {e}", nic.slot.netdev))?;
        qmp_ops::device_add(qmp, &nic.device).await.map_err(|e| format!("device_add {}: {e}", nic.device.id))?;
        Ok(())
    }

    /// Removes the host side of every network NIC of the VM; idempotent.
    pub(super) async fn detach_networks(&self, entry: &Entry) {
        let Some(backend) = &self.inner.backends.network else { return };
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        for slot in &devices.nics {
            if spec.nic(&slot.id).is_some_and(|nic| nic.kind == crate::spec::NicKind::Network) {
                backend.detach(&spec, slot).await;
            }
        }
    }

    pub(super) fn resolve_accel(&self, spec: &VmSpec) -> Result<Accel, VmError> {
        let probe = &self.inner.config.accel;
        let accel = self.accel_choice(spec)?;
        if spec.cpu.as_deref() == Some(HOST_CPU) && accel != Accel::Kvm {
            let problem =
                format!("needs KVM (the host CPU passed through), and this VM runs under {accel}: {}", probe.reason);
            return Err(ValidationErrors::one("cpu", HOST_CPU, problem).into());
        }
        Ok(accel)
    }

    fn accel_choice(&self, spec: &VmSpec) -> Result<Accel, VmError> {
        let probe = &self.inner.config.accel;
        match spec.accelerator {
            AccelChoice::Auto => Ok(probe.accel),
            AccelChoice::Tcg => Ok(Accel::Tcg),
            AccelChoice::Kvm if probe.accel == Accel::Kvm => Ok(Accel::Kvm),
            AccelChoice::Kvm => Err(ValidationErrors::one(
                "accelerator",
                "kvm",
                format!("is not usable on this node: {}", probe.reason),
            )
            .into()),
        }
    }

    /// Cold start: a new QEMU with the VM's disks and NICs on its command line.
    async fn launch(
        &self,
        entry: &Arc<Entry>,
        spec: &VmSpec,
        devices: &DeviceTree,
        accel: Accel,
        paused: bool,
    ) -> Result<Arc<Runtime>, VmError> {
        let dir = entry.dir.clone();
        let start_error = |stage: &'static str| {
            let name = entry.name.clone();
            move |source: BoxError| VmError::Start { name, stage, log: String::new(), source }
        };
        let seed = write_seed(&dir, spec).await.map_err(start_error("writing the cloud-init seed"))?;
        let qemu = self.spawn_qemu(&dir, spec, devices, accel, seed, false, false).await.map_err(|failure| {
            let (stage, log, source) = failure;
            VmError::Start { name: entry.name.clone(), stage, log, source }
        })?;
        let ready = std::future::ready(Ok(()));
        self.run_guest(entry, (spec, devices), qemu, &dir.serial_socket(), false, paused, ready).await
    }

    /// Warm start: the VM takes a pre-launched QEMU. Its devices are plugged while `starting` is written (the
    /// disk write is off the critical path); only once that is on disk do the QEMU's sockets, pidfile and log move
    /// into the VM's directory, so a daemon that dies halfway either finds the QEMU there (and adopts it) or
    /// finds it still in the pool's directory (and stops it at start).
    async fn launch_warm(
        &self,
        entry: &Arc<Entry>,
        spec: &VmSpec,
        devices: &DeviceTree,
        warm: Warm,
        starting: impl std::future::Future<Output = ()>,
        paused: bool,
    ) -> Result<Arc<Runtime>, VmError> {
        let (from, to) = (warm.dir.clone(), entry.dir.clone());
        let rotated = {
            let to = to.clone();
            blocking(move || {
                to.remove_runtime_files();
                rotate_console_log(&to)
            })
            .await
        };
        if let Err(source) = rotated {
            crate::warm::discard(warm);
            let (name, stage, log) = (entry.name.clone(), "taking a warm QEMU", String::new());
            return Err(VmError::Start { name, stage, log, source: source.into() });
        }
        let moved = {
            let from = from.clone();
            async move {
                starting.await;
                blocking(move || -> std::io::Result<()> {
                    for (a, b) in [
                        (from.qmp_socket(), to.qmp_socket()),
                        (from.serial_socket(), to.serial_socket()),
                        (from.qga_socket(), to.qga_socket()),
                        (from.pidfile(), to.pidfile()),
                        (from.qemu_log(), to.qemu_log()),
                    ] {
                        fs::rename(a, b)?;
                    }
                    fs::remove_dir_all(from.path())
                })
                .await
                .map_err(BoxError::from)
            }
        };
        let serial = from.serial_socket();
        let qemu = (warm.process, warm.qmp);
        let started = self.run_guest(entry, (spec, devices), qemu, &serial, true, paused, moved).await;
        if started.is_err() {
            let _ = blocking(move || fs::remove_dir_all(from.path())).await;
        }
        started
    }

    /// Binds the sockets in `dir`, spawns QEMU and negotiates QMP. On failure QEMU is gone and the error carries
    /// the stage, the tail of QEMU's log and the cause. `incoming`: QEMU waits for a live migration's stream
    /// (`-incoming defer`, then `migrate-incoming`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn spawn_qemu(
        &self,
        dir: &VmDir,
        spec: &VmSpec,
        devices: &DeviceTree,
        accel: Accel,
        seed: Option<PathBuf>,
        hotplug: bool,
        incoming: bool,
    ) -> Result<(QemuProcess, QmpClient), (&'static str, String, BoxError)> {
        let uefi = {
            let (host, dir, spec) = (self.inner.config.host.clone(), dir.clone(), spec.clone());
            blocking(move || crate::firmware::uefi_args(&host, &dir, &spec)).await
        };
        let uefi = uefi.map_err(|e| ("preparing the UEFI firmware", String::new(), e.into()))?;
        let serial = spec.serial;
        let prepared = {
            let dir = dir.clone();
            blocking(move || prepare_sockets(&dir, serial)).await
        };
        let (fds, log) = prepared.map_err(|e| ("preparing sockets", String::new(), e.into()))?;
        let (swtpm, tpm) = match spec.tpm {
            true => {
                let (swtpm, args) =
                    crate::tpm::start(dir).await.map_err(|e| ("starting swtpm", String::new(), e.into()))?;
                (Some(swtpm), Some(args))
            }
            false => (None, None),
        };
        // swtpm leaves by itself only once a QEMU has connected and gone: without one, it is ended here.
        let end_swtpm = |swtpm: Option<QemuProcess>| async move {
            if let Some(swtpm) = swtpm {
                let _ = swtpm.kill();
                swtpm.exited().await;
            }
        };
        let serial_fd = serial.then_some(SERIAL_FD);
        let pidfile = dir.pidfile();
        let layout = LaunchLayout { qmp_fd: QMP_FD, serial_fd, qga_fd: QGA_FD, pidfile, seed, hotplug, uefi, tpm };
        let mut args = qemu_args(spec, devices, accel, &layout);
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        debug!(vm = %spec.name, ?args, "spawning QEMU");
        let process = match QemuProcess::spawn(&self.inner.config.qemu_binary, &args, fds, log) {
            Ok(process) => process,
            Err(e) => {
                end_swtpm(swtpm).await;
                return Err(("spawning QEMU", String::new(), e.into()));
            }
        };
        let qmp = tokio::select! {
            qmp = QmpClient::connect(dir.qmp_socket(), qmp_options()) => qmp.map_err(|e| ("QMP handshake", e.into())),
            how = process.exited() => {
                let how = how.unwrap_or_else(|| "exited".into());
                Err(("QEMU startup", format!("QEMU {how} before answering QMP").into()))
            }
        };
        match qmp {
            Ok(qmp) => {
                if let Some(swtpm) = swtpm {
                    crate::tpm::reap(swtpm);
                }
                Ok((process, qmp))
            }
            Err((stage, source)) => {
                let _ = process.kill();
                process.exited().await;
                end_swtpm(swtpm).await;
                let dir = dir.clone();
                let log = blocking(move || {
                    dir.remove_runtime_files();
                    String::from_utf8_lossy(&read_tail(&dir.qemu_log(), START_LOG_TAIL)).trim().to_owned()
                })
                .await;
                Err((stage, log, source))
            }
        }
    }

    /// Takes a QEMU that waits before its first instruction to a running guest: the console, the devices QEMU
    /// was not launched with (`hotplug`: disks and user NICs; always: network NICs), then `cont` (unless
    /// `paused`: QEMU stays in `prelaunch`). On failure QEMU is stopped and the VM's runtime files and taps are
    /// gone.
    ///
    /// `alongside` runs while the devices are plugged and must succeed before `cont`; `serial` is the serial
    /// socket to attach the console to (logged to the VM's `console.log`).
    #[allow(clippy::too_many_arguments)]
    async fn run_guest(
        &self,
        entry: &Arc<Entry>,
        (spec, devices): (&VmSpec, &DeviceTree),
        (process, qmp): (QemuProcess, QmpClient),
        serial: &Path,
        hotplug: bool,
        paused: bool,
        alongside: impl std::future::Future<Output = Result<(), BoxError>>,
    ) -> Result<Arc<Runtime>, VmError> {
        let dir = entry.dir.clone();
        let plugged = async {
            let console = if spec.serial {
                let console = SerialConsole::attach(serial, &dir.console_log()).await;
                Some(console.map_err(|e: ConsoleError| ("serial console", e.into()))?)
            } else {
                None
            };
            let hw = Hardware::from_spec(spec, devices, None);
            if hotplug {
                for plug in hw.disks.iter().chain(&hw.user_nics) {
                    plug_device(&qmp, plug).await.map_err(|e| ("plugging disks and NICs", e.into()))?;
                }
            }
            for nic in &hw.network_nics {
                self.plug_network_nic(&qmp, spec, nic).await.map_err(|e| ("plugging a network NIC", e.into()))?;
            }
            crate::placement::apply(&qmp, process.pid(), &self.inner.config.host, &spec.placement)
                .await
                .map_err(|e| ("pinning vCPUs", e.into()))?;
            if hotplug && spec.kernel.is_none() {
                // The firmware reads the boot order from fw_cfg, which QEMU rebuilds from the plugged devices'
                // bootindex at reset; the guest has not run yet, so this reset is invisible to it.
                qmp_ops::simple(&qmp, Simple::SystemReset, None)
                    .await
                    .map_err(|e| ("updating the boot order", e.into()))?;
            }
            Ok::<_, (&'static str, BoxError)>(console)
        };
        let prepared = async {
            let (console, alongside) = tokio::join!(plugged, alongside);
            let console = console?;
            alongside.map_err(|e| ("taking a warm QEMU", e))?;
            if !paused {
                qmp_ops::simple(&qmp, Simple::Cont, None).await.map_err(|e| ("resuming vCPUs", e.into()))?;
            }
            Ok::<_, (&'static str, BoxError)>(console)
        };
        match prepared.await {
            Ok(console) => Ok(Arc::new(Runtime {
                process,
                qmp,
                console,
                agent: GuestAgent::new(entry.dir.qga_socket(), agent_options()),
                stop_requested: AtomicBool::new(false),
                guest_shutdown: AtomicBool::new(false),
            })),
            Err((stage, source)) => {
                let _ = process.kill();
                process.exited().await;
                self.detach_networks(entry).await;
                let log_path = dir.qemu_log();
                let log = blocking(move || {
                    dir.remove_runtime_files();
                    String::from_utf8_lossy(&read_tail(&log_path, START_LOG_TAIL)).trim().to_owned()
                })
                .await;
                Err(VmError::Start { name: entry.name.clone(), stage, log, source })
            }
        }
    }

    /// Keeps the warm pool at its configured size, one QEMU at a time, for the life of the manager.
    pub(super) async fn refill_warm_pool(self) {
        let pool = &self.inner.warm;
        let (Some(accel), root) = (pool.accel, self.inner.config.data_dir.join("warm")) else { return };
        loop {
            while let Some(shape) = pool.wanting() {
                let uuid = Uuid::new_v4();
                let mut spec = pool.shapes[shape].spec(uuid);
                spec.pin_shape(&self.inner.caps);
                let devices = DeviceTree::new(&spec).expect("a warm shape has no devices to place");
                let dir = VmDir::new(&root, &uuid.to_string());
                if let Err(e) = blocking({
                    let path = dir.path().to_owned();
                    move || fs::create_dir_all(path)
                })
                .await
                {
                    warn!(error = %e, "cannot create a warm-pool directory; retrying later");
                    tokio::time::sleep(WARM_RETRY).await;
                    continue;
                }
                match self.spawn_qemu(&dir, &spec, &devices, accel, None, true, false).await {
                    Ok((process, qmp)) => {
                        debug!(shape, pid = process.pid(), "warm QEMU ready");
                        let key = launch_key(&spec, &devices, accel);
                        pool.add(Warm { shape, uuid, dir, process, qmp, key, reserved_for: None });
                    }
                    Err((stage, log, source)) => {
                        warn!(shape, stage, %log, error = %source, "cannot launch a warm QEMU; retrying later");
                        let _ = blocking(move || fs::remove_dir_all(dir.path())).await;
                        tokio::time::sleep(WARM_RETRY).await;
                    }
                }
            }
            // Woken when a QEMU is taken or reserved; the timeout notices QEMUs that died.
            let _ = tokio::time::timeout(WARM_RETRY, pool.wake.notified()).await;
        }
    }

    /// Stops the warm pool's idle QEMUs (VMs keep running); for a daemon that exits.
    pub async fn drain_warm_pool(&self) {
        self.inner.warm.drain().await;
    }

    /// Ready and reserved QEMUs in the warm pool.
    pub fn warm_pool_counts(&self) -> (usize, usize) {
        self.inner.warm.counts()
    }
}

/// Writes the cloud-init seed of `spec` into `dir` when it has one.
pub(super) async fn write_seed(dir: &VmDir, spec: &VmSpec) -> Result<Option<PathBuf>, BoxError> {
    let Some(config) = spec.seed_config() else { return Ok(None) };
    let path = dir.seed_image();
    qx_storage::cloudinit::write_seed(&config, &path).await?;
    Ok(Some(path))
}

/// Each run starts a fresh console log, so console history shows this boot; the last run's stays as `.1`.
fn rotate_console_log(dir: &VmDir) -> std::io::Result<()> {
    let console_log = dir.console_log();
    if console_log.exists() {
        fs::rename(&console_log, console_log.with_extension("log.1"))?;
    }
    Ok(())
}

/// Binds the QMP and serial sockets QEMU will serve (so they exist before QEMU runs, and connecting needs no
/// polling), opens `qemu.log`, and rotates `console.log`.
fn prepare_sockets(dir: &VmDir, serial: bool) -> std::io::Result<(Vec<(OwnedFd, i32)>, fs::File)> {
    dir.remove_runtime_files();
    rotate_console_log(dir)?;
    let bind = |path: &Path| -> std::io::Result<OwnedFd> {
        let listener = UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        Ok(listener.into())
    };
    let mut fds = vec![(bind(&dir.qmp_socket())?, QMP_FD)];
    if serial {
        fds.push((bind(&dir.serial_socket())?, SERIAL_FD));
    }
    fds.push((bind(&dir.qga_socket())?, QGA_FD));
    let log = OpenOptions::new().create(true).write(true).truncate(true).open(dir.qemu_log())?;
    Ok((fds, log))
}
