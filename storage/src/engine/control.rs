//! Progress and cancellation for long operations, shared between the caller (a tokio task that streams progress to
//! a client, or cancels) and the engine thread doing the work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl Default for OpControl {
    fn default() -> Self {
        Self::new()
    }
}

impl OpControl {
    pub fn new() -> Self {
        Self { progress: Arc::new(watch::Sender::new(Progress::default())), cancel: Cancel::new() }
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
}

impl JobCtl {
    pub fn cancelled(&self) -> bool {
        self.ctl.is_cancelled() || self.dropped.is_cancelled()
    }

    pub fn report(&self, done: u64, total: u64) {
        self.ctl.report(done, total);
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
