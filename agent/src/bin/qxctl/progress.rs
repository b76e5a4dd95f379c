//! A progress bar on stderr for imports and copies: redrawn in place on a terminal, a line every few seconds
//! otherwise (logs, CI), and nothing with `--json` so that stdout stays machine-readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a non-terminal gets a progress line.
const LINE_INTERVAL: Duration = Duration::from_secs(5);
const WIDTH: usize = 30;

pub struct ProgressBar {
    label: String,
    terminal: bool,
    quiet: bool,
    started: Instant,
    last_line: Option<Instant>,
    drawn: bool,
}

impl ProgressBar {
    pub fn new(label: impl Into<String>, quiet: bool) -> Self {
        Self {
            label: label.into(),
            terminal: std::io::stderr().is_terminal(),
            quiet,
            started: Instant::now(),
            last_line: None,
            drawn: false,
        }
    }

    /// Replaces the text in front of the bar (a migration names its phase there).
    pub fn set_label(&mut self, label: impl Into<String>) {
        self.label = label.into();
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        let text = render(&self.label, done, total, self.started.elapsed());
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{text}\x1b[K");
            self.drawn = true;
        } else if self.last_line.is_none_or(|at| at.elapsed() >= LINE_INTERVAL) {
            let _ = writeln!(err, "{text}");
            self.last_line = Some(Instant::now());
        }
        let _ = err.flush();
    }

    /// Ends the bar's line so that what follows starts on a fresh one.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `label [######------]  45%  460/1024 MiB  92 MiB/s`
fn render(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let fraction = if total == 0 { 1.0 } else { (done as f64 / total as f64).clamp(0.0, 1.0) };
    let filled = (fraction * WIDTH as f64).round() as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001) / f64::from(1 << 20);
    format!(
        "{label} [{}{}] {:>3.0}%  {}/{} MiB  {rate:.0} MiB/s",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        fraction * 100.0,
        done >> 20,
        total >> 20,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fraction_and_rate() {
        let text = render("import", 512 << 20, 1024 << 20, Duration::from_secs(2));
        assert_eq!(text, format!("import [{}{}]  50%  512/1024 MiB  256 MiB/s", "#".repeat(15), "-".repeat(15)));
        // Nothing to do is done; more than the total never overflows the bar.
        assert!(render("x", 0, 0, Duration::ZERO).contains("100%"));
        assert!(render("x", 9, 4, Duration::from_secs(1)).contains("100%"));
    }
}
