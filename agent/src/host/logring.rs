//! The daemon's recent log lines, kept in memory for the console's diagnostics screen: a `tracing` fmt layer
//! that writes into a ring of the last [`CAPACITY`] lines instead of a file.
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//! tracing_subscriber::registry().with(qx_agent::host::logring::layer(qx_agent::host::logring::global())).init();
//! ```

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// How many lines the ring keeps.
pub const CAPACITY: usize = 500;

#[derive(Debug, Default)]
pub struct LogRing {
    lines: Mutex<VecDeque<String>>,
}

impl LogRing {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn push(&self, text: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            if lines.len() == CAPACITY {
                lines.pop_front();
            }
            lines.push_back(line.to_owned());
        }
    }

    /// The last `n` lines, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().skip(lines.len().saturating_sub(n)).cloned().collect()
    }
}

/// The daemon's ring: the one its subscriber writes into and the host backend reads.
pub fn global() -> Arc<LogRing> {
    static RING: OnceLock<Arc<LogRing>> = OnceLock::new();
    Arc::clone(RING.get_or_init(LogRing::new))
}

/// A fmt layer writing plain (uncoloured) lines into `ring`, formatted as the daemon's stderr is.
pub fn layer<S>(ring: Arc<LogRing>) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer().with_writer(RingWriters(ring)).with_ansi(false).with_target(false)
}

struct RingWriters(Arc<LogRing>);

impl<'a> MakeWriter<'a> for RingWriters {
    type Writer = RingWriter;

    fn make_writer(&'a self) -> RingWriter {
        RingWriter { ring: Arc::clone(&self.0), buffer: Vec::new() }
    }
}

/// Collects one event's text; the fmt layer drops it after each event, and the lines go into the ring then.
pub struct RingWriter {
    ring: Arc<LogRing>,
    buffer: Vec<u8>,
}

impl io::Write for RingWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for RingWriter {
    fn drop(&mut self) {
        if !self.buffer.is_empty() {
            self.ring.push(&String::from_utf8_lossy(&self.buffer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn keeps_the_last_lines_with_span_context() {
        let ring = LogRing::new();
        let subscriber = tracing_subscriber::registry().with(layer(Arc::clone(&ring)));
        tracing::subscriber::with_default(subscriber, || {
            let _span = tracing::info_span!("SetSsh", enabled = true).entered();
            for i in 0..CAPACITY + 10 {
                tracing::info!(i, "line");
            }
            tracing::warn!("multi\nline");
        });
        let lines = ring.recent(CAPACITY + 100);
        assert_eq!(lines.len(), CAPACITY);
        assert!(lines[0].ends_with("line i=12"), "{}", lines[0]);
        assert!(lines[0].contains("SetSsh{enabled=true}"), "{}", lines[0]);
        assert!(lines[CAPACITY - 2].contains("WARN") && lines[CAPACITY - 2].ends_with("multi"), "{lines:?}");
        assert_eq!(lines[CAPACITY - 1], "line");
        assert_eq!(ring.recent(2).len(), 2);
        assert!(!lines.iter().any(|l| l.contains('\x1b')), "no colour codes");
    }
}
