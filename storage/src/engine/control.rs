//! Progress and cancellation for long operations, shared between the caller (a tokio task that streams progress to
//! a client, or cancels) and the engine thread doing the work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How far an operation has got, in bytes of the target's virtual size (holes count as done once passed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

impl Progress {
    /// `done / total` in 0.0..=1.0; an operation on nothing is complete.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
}

/// A cancellation flag; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The caller's handle on one long operation: pass `&OpControl` to the operation, keep a clone to watch progress
/// ([`OpControl::subscribe`]) or to cancel ([`OpControl::cancel`]) from another task. Clones share both.
///
/// ```
/// # async fn demo(engine: qx_storage::Engine) -> Result<(), qx_storage::EngineError> {
/// let ctl = qx_storage::OpControl::new();
/// let mut progress = ctl.subscribe();
/// tokio::spawn(async move {
///     while progress.changed().await.is_ok() {
///         let p = *progress.borrow();
///         println!("{} of {} bytes", p.done, p.total);
///     }
/// });
/// engine.sha256("/var/lib/quantix/images/debian.qcow2", &ctl).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct OpControl {
    progress: Arc<watch::Sender<Progress>>,
    cancel: Cancel,
    /// Bytes per second of data the operation may move; 0: no limit.
    speed: Arc<AtomicU64>,
}

impl Default for OpControl {
    fn default() -> Self {
        Self::new()
    }
}

impl OpControl {
    pub fn new() -> Self {
        Self {
            progress: Arc::new(watch::Sender::new(Progress::default())),
            cancel: Cancel::new(),
            speed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Limits the operation to `bytes_per_second` of data moved (as QEMU's block jobs' `speed`), e.g. so that a
    /// clone does not starve running VMs of the disk; 0 lifts the limit. Takes effect at the operation's next
    /// chunk, also while it runs.
    pub fn set_speed_limit(&self, bytes_per_second: u64) {
        self.speed.store(bytes_per_second, Ordering::Relaxed);
    }

    /// A receiver that sees every progress update from now on.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The latest progress.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Asks the operation to stop. It stops at its next block boundary, removes what it had written and returns a
    /// `Cancelled` error.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The cancellation flag alone, e.g. to hand to another operation.
    pub fn cancel_token(&self) -> Cancel {
        self.cancel.clone()
    }

    /// Records progress; watchers wake only when it changed. Pool implementations outside this crate (and tests)
    /// report through this too.
    pub fn report(&self, done: u64, total: u64) {
        self.progress.send_if_modified(|p| {
            let new = Progress { done, total };
            let changed = *p != new;
            *p = new;
            changed
        });
    }
}

/// What a job on the engine thread checks and reports to: the caller's control, plus a flag set when the caller's
/// future is dropped (dropping the future cancels the operation).
#[derive(Debug, Clone)]
pub(crate) struct JobCtl {
    pub ctl: OpControl,
    pub dropped: Cancel,
    pub started: Instant,
}

impl JobCtl {
    pub fn new(ctl: OpControl, dropped: Cancel) -> Self {
        Self { ctl, dropped, started: Instant::now() }
    }

    pub fn cancelled(&self) -> bool {
        self.ctl.is_cancelled() || self.dropped.is_cancelled()
    }

    /// Waits, if a speed limit is set, until moving `moved` bytes since the start keeps to it. Returns early on
    /// cancel; the caller checks for that next.
    pub fn throttle(&self, moved: u64) {
        loop {
            let speed = self.ctl.speed.load(Ordering::Relaxed);
            if speed == 0 || self.cancelled() {
                return;
            }
            let due = Duration::from_secs_f64(moved as f64 / speed as f64);
            let Some(wait) = due.checked_sub(self.started.elapsed()).filter(|w| !w.is_zero()) else { return };
            std::thread::sleep(wait.min(Duration::from_millis(20)));
        }
    }

    pub fn report(&self, done: u64, total: u64) {
        self.ctl.report(done, total);
    }

    /// The bytes the next call of a kernel copy may move: `max`, or under a speed limit about a tenth of a second's
    /// worth (at least 1 MiB), so that a limited copy moves smoothly and its cancel is prompt.
    pub fn chunk(&self, max: u64) -> u64 {
        match self.ctl.speed.load(Ordering::Relaxed) {
            0 => max,
            speed => (speed / 10).clamp(1 << 20, max.max(1 << 20)) & !4095,
        }
    }
}

/// Sets its flag when dropped, unless disarmed.
pub(crate) struct CancelOnDrop(pub Option<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_cancel_and_progress() {
        let a = OpControl::new();
        let b = a.clone();
        let rx = a.subscribe();
        b.report(5, 10);
        assert_eq!(*rx.borrow(), Progress { done: 5, total: 10 });
        assert_eq!(a.progress().fraction(), 0.5);
        assert!(!a.is_cancelled());
        b.cancel();
        assert!(a.is_cancelled());
        assert_eq!(Progress::default().fraction(), 1.0);
    }

    #[test]
    fn throttle_keeps_to_the_speed_limit_and_yields_to_cancel() {
        let ctl = OpControl::new();
        let job = JobCtl::new(ctl.clone(), Cancel::new());
        job.throttle(u64::MAX);
        ctl.set_speed_limit(10 << 20);
        let t = Instant::now();
        job.throttle(1 << 20);
        assert!(t.elapsed() >= Duration::from_millis(90), "{:?}", t.elapsed());
        ctl.cancel();
        let t = Instant::now();
        job.throttle(u64::MAX / 2);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn cancel_on_drop_fires_unless_disarmed() {
        let c = Cancel::new();
        drop(CancelOnDrop(Some(c.clone())));
        assert!(c.is_cancelled());
        let d = Cancel::new();
        let mut g = CancelOnDrop(Some(d.clone()));
        g.0 = None;
        drop(g);
        assert!(!d.is_cancelled());
    }
}
