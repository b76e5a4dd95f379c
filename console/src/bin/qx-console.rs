//! `qx-console`: the Quantix host console, meant for TTY1.
//!
//! The terminal is driven from the main thread; a small tokio runtime polls qx-node in the background, so the first
//! frame ("connecting...") is drawn before the first reply arrives and a slow daemon never freezes the keys.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, Parser};
use qx_console::app::{Action, App};
use qx_console::{poll, view};
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::DefaultTerminal;
use tokio::sync::mpsc;

/// How long the UI waits for a key before looking for a new snapshot.
const INPUT_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Parser)]
#[command(version, about = "The Quantix host console (TTY1)")]
struct Args {
    /// qx-node's gRPC socket.
    #[arg(long, env = "QX_SOCKET", default_value = "/run/quantix/node.sock")]
    socket: PathBuf,
    /// Let q, Esc and Ctrl-C leave the console; `--allow-quit false` for the real TTY1 console.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    allow_quit: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qx-console-poll")
        .enable_all()
        .build()
        .context("start the tokio runtime")?;

    let (snapshot_tx, snapshot_rx) = std_mpsc::channel();
    let (refresh_tx, refresh_rx) = mpsc::unbounded_channel();
    runtime.spawn(poll::run(args.socket.clone(), refresh_rx, move |snapshot| snapshot_tx.send(snapshot).is_ok()));

    // Installs a panic hook that restores the terminal before the message is printed.
    let mut terminal = ratatui::try_init().context("set up the terminal")?;
    let result = run(&mut terminal, App::new(args.socket, args.allow_quit), &snapshot_rx, &refresh_tx);
    ratatui::restore();
    runtime.shutdown_background();
    result
}

fn run(
    terminal: &mut DefaultTerminal,
    mut app: App,
    snapshots: &std_mpsc::Receiver<qx_console::app::Snapshot>,
    refresh: &mpsc::UnboundedSender<()>,
) -> anyhow::Result<()> {
    let mut dirty = true;
    loop {
        if dirty {
            terminal.draw(|frame| view::render(frame, &app)).context("draw")?;
            dirty = false;
        }
        if event::poll(INPUT_POLL).context("poll the terminal")? {
            match event::read().context("read the terminal")? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    dirty = true;
                    match app.on_key(key) {
                        Action::Quit => return Ok(()),
                        Action::Refresh => {
                            // The poller only returns once the UI is gone, so this means it died.
                            refresh.send(()).map_err(|_| anyhow::anyhow!("the qx-node poller stopped"))?;
                        }
                        Action::None => {}
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
        while let Ok(snapshot) = snapshots.try_recv() {
            app.set_snapshot(snapshot);
            dirty = true;
        }
    }
}
