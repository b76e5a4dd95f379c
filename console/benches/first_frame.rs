//! How long qx-console takes to draw its first frame, against a qx-node that accepts its connection and never
//! answers (the frame must not wait for the daemon). The console runs in a tmux pane, as in its end-to-end tests;
//! tmux's own start (a pane that prints one word) is measured in the same run, interleaved, and subtracted.
//!
//! `cargo bench -p qx-console --bench first_frame` (needs tmux; scripts/install-deps.sh installs it).
//! `QX_BENCH_RUNS` sets the number of runs (default 10).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A tmux server on a private socket in `dir`, killed (by its PID too) when dropped.
struct Tmux {
    socket: PathBuf,
    pid: Option<i32>,
}

impl Tmux {
    fn start(dir: &Path, argv: &[String]) -> Self {
        let config = dir.join("tmux.conf");
        std::fs::write(&config, "set -g status off\nset -g remain-on-exit on\n").unwrap();
        let mut tmux = Self { socket: dir.join("tmux.sock"), pid: None };
        let mut args = vec!["-f".to_owned(), config.display().to_string()];
        args.extend(["new-session", "-d", "-s", "bench", "-x", "100", "-y", "30"].map(str::to_owned));
        args.extend(argv.iter().cloned());
        let out = tmux.run(&args);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        let pid = tmux.run(&["display-message", "-p", "#{pid}"].map(str::to_owned));
        tmux.pid = String::from_utf8_lossy(&pid.stdout).trim().parse().ok();
        tmux
    }

    fn run(&self, args: &[String]) -> std::process::Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("run tmux (scripts/install-deps.sh installs it)")
    }

    /// Polls the pane every 2 ms until it shows `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let out = self.run(&["capture-pane", "-p", "-t", "bench"].map(str::to_owned));
            if String::from_utf8_lossy(&out.stdout).contains(needle) {
                return;
            }
            assert!(Instant::now() < deadline, "the pane never showed {needle:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server".to_owned()]);
        if let Some(pid) = self.pid.filter(|pid| qx_test_infra::pid_alive(*pid)) {
            qx_test_infra::kill_pid(pid);
        }
    }
}

/// From `tmux new-session` to `needle` on the screen.
fn time_to(argv: &[String], needle: &str) -> Duration {
    let dir = tempfile::Builder::new().prefix("qx-first-frame-").tempdir().unwrap();
    let started = Instant::now();
    let tmux = Tmux::start(dir.path(), argv);
    tmux.wait_for(needle);
    let elapsed = started.elapsed();
    drop(tmux);
    elapsed
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("QX_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10).max(1);
    // The hung daemon: accepts, holds every connection, never answers.
    let dir = tempfile::Builder::new().prefix("qx-first-frame-hung-").tempdir().unwrap();
    let socket = dir.path().join("hung.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let console =
        [env!("CARGO_BIN_EXE_qx-console"), "--socket", &socket.display().to_string(), "--allow-quit", "false"]
            .map(str::to_owned)
            .to_vec();
    let baseline = ["sh", "-c", "echo QX-PANE-UP; exec sleep 60"].map(str::to_owned).to_vec();
    let (mut frames, mut panes) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    // One untimed round of each warms the page cache.
    time_to(&console, "qx-node: connecting...");
    time_to(&baseline, "QX-PANE-UP");
    for run in 0..runs {
        // Alternate which goes first, so neither always follows the other's teardown.
        if run % 2 == 0 {
            frames.push(time_to(&console, "qx-node: connecting..."));
            panes.push(time_to(&baseline, "QX-PANE-UP"));
        } else {
            panes.push(time_to(&baseline, "QX-PANE-UP"));
            frames.push(time_to(&console, "qx-node: connecting..."));
        }
    }
    let (frame, pane) = (median(&mut frames), median(&mut panes));
    println!("first_frame: {runs} runs, against a qx-node that never answers");
    println!(
        "  qx-console first frame, from tmux new-session  median {:7.1} ms  (min {:.1}, max {:.1})",
        ms(frame),
        ms(frames[0]),
        ms(frames[runs - 1])
    );
    println!(
        "  tmux pane printing one word, from new-session  median {:7.1} ms  (min {:.1}, max {:.1})",
        ms(pane),
        ms(panes[0]),
        ms(panes[runs - 1])
    );
    println!("  qx-console's own share (difference of medians) {:7.1} ms", ms(frame.saturating_sub(pane)));
}
