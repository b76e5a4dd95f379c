//! `qx-console`: the Quantix host console, meant for TTY1.
//!
//! The terminal is driven from the main thread; a small tokio runtime polls qx-node and performs the requests key
//! handling returns, so the first frame ("connecting...") is drawn before the first reply arrives and a slow
//! daemon never freezes the keys. The emergency shell (F12) runs on this terminal, between leaving the TUI and
//! coming back to it.

use std::io::stdout;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{ArgAction, Parser};
use qx_console::app::{Action, App, Snapshot};
use qx_console::rpc::{self, Reply, Request};
use qx_console::{poll, view};
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{enable_raw_mode, EnterAlternateScreen};
use ratatui::layout::Rect;
use ratatui::DefaultTerminal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// How long the UI waits for a key before looking for snapshots and replies.
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
    /// Run on this terminal (e.g. /dev/tty1) instead of the inherited one: a session of its own with the terminal
    /// as controlling terminal and stdio, as getty does. For supervisors that start it without one (OpenRC's
    /// supervise-daemon); init's inittab entries need not.
    #[arg(long)]
    tty: Option<PathBuf>,
}

/// What the background tasks hand to the UI thread. Snapshots are boxed: one arrives every 2 s and they are
/// four times the size of a reply.
enum Incoming {
    Snapshot(Box<Snapshot>),
    Reply(Reply),
}

/// The UI's ways to the background tasks.
struct Background {
    incoming: std_mpsc::Receiver<Incoming>,
    refresh: mpsc::UnboundedSender<()>,
    requests: mpsc::UnboundedSender<Request>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(tty) = &args.tty {
        attach_tty(tty)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qx-console-rpc")
        .enable_all()
        .build()
        .context("start the tokio runtime")?;

    // The emergency shell shares this terminal and, unless it does job control, this process group: Ctrl-C, Ctrl-\
    // and Ctrl-Z typed there must not kill or stop the console. Handling the signals (rather than ignoring them)
    // leaves the shell with the default dispositions, since exec resets handled signals.
    {
        let _context = runtime.enter();
        for kind in [SignalKind::interrupt(), SignalKind::quit(), SignalKind::from_raw(sigtstp())] {
            let mut stream = signal(kind).context("handle terminal signals")?;
            runtime.spawn(async move { while stream.recv().await.is_some() {} });
        }
    }

    let (incoming_tx, incoming) = std_mpsc::channel();
    let (refresh, refresh_rx) = mpsc::unbounded_channel();
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let snapshots = incoming_tx.clone();
    runtime.spawn(poll::run(args.socket.clone(), refresh_rx, move |snapshot| {
        snapshots.send(Incoming::Snapshot(Box::new(snapshot))).is_ok()
    }));
    runtime.spawn(rpc::run(args.socket.clone(), requests_rx, move |reply| {
        // The UI has gone when this fails; the reply has nobody to go to.
        let _ = incoming_tx.send(Incoming::Reply(reply));
    }));

    // Installs a panic hook that restores the terminal before the message is printed.
    let mut terminal = ratatui::try_init().context("set up the terminal")?;
    let background = Background { incoming, refresh, requests };
    let result = run(&mut terminal, App::new(args.socket, args.allow_quit), &background);
    ratatui::restore();
    runtime.shutdown_background();
    result
}

/// Makes `path` this process's controlling terminal, stdin, stdout and stderr. Refuses a terminal that is another
/// session's (a getty's, or another console's): two programs reading one keyboard would each get half the keys.
fn attach_tty(path: &Path) -> anyhow::Result<()> {
    use rustix::fs::{Mode, OFlags};
    // A session of our own; a supervisor may have made us a session leader already, which is as good.
    let _ = rustix::process::setsid();
    let tty = rustix::fs::open(path, OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("open {}", path.display()))?;
    rustix::process::ioctl_tiocsctty(&tty)
        .with_context(|| format!("make {} the controlling terminal (does a getty run on it?)", path.display()))?;
    let stdio = || format!("make {} stdin, stdout and stderr", path.display());
    rustix::stdio::dup2_stdin(&tty).with_context(stdio)?;
    rustix::stdio::dup2_stdout(&tty).with_context(stdio)?;
    rustix::stdio::dup2_stderr(&tty).with_context(stdio)?;
    Ok(())
}

/// SIGTSTP's number; tokio names only the signals it expects programs to want.
fn sigtstp() -> i32 {
    rustix::process::Signal::TSTP.as_raw()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn run(terminal: &mut DefaultTerminal, mut app: App, background: &Background) -> anyhow::Result<()> {
    let mut dirty = true;
    loop {
        // Once a second at least, for the SSH timer and heartbeat ages.
        let now = unix_now();
        if now != app.now {
            app.tick(now);
            dirty = true;
        }
        if dirty {
            let size = terminal.size().context("read the terminal size")?;
            app.resize(Rect::new(0, 0, size.width, size.height));
            terminal.draw(|frame| view::render(frame, &app)).context("draw")?;
            dirty = false;
        }
        if event::poll(INPUT_POLL).context("poll the terminal")? {
            match event::read().context("read the terminal")? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    dirty = true;
                    let action = app.on_key(key);
                    if perform(action, terminal, &mut app, background)? {
                        return Ok(());
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
        while let Ok(incoming) = background.incoming.try_recv() {
            dirty = true;
            match incoming {
                Incoming::Snapshot(snapshot) => app.set_snapshot(*snapshot),
                Incoming::Reply(reply) => {
                    let action = app.on_reply(reply);
                    if perform(action, terminal, &mut app, background)? {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Carries out `action`; `true` when the console should quit.
fn perform(
    action: Action,
    terminal: &mut DefaultTerminal,
    app: &mut App,
    background: &Background,
) -> anyhow::Result<bool> {
    // The background tasks only return once the UI is gone, so a closed channel means one of them died.
    match action {
        Action::None => {}
        Action::Quit => return Ok(true),
        Action::Refresh => background.refresh.send(()).map_err(|_| anyhow::anyhow!("the qx-node poller stopped"))?,
        Action::Call(request) => {
            background.requests.send(request).map_err(|_| anyhow::anyhow!("the qx-node request task stopped"))?;
        }
        Action::RunShell(argv) => {
            let how = run_shell(terminal, &argv)?;
            app.shell_done(&how);
        }
    }
    Ok(false)
}

/// Leaves the alternate screen and raw mode, runs `argv` on this terminal and waits for it, then takes the
/// terminal back. Says how the shell ended.
fn run_shell(terminal: &mut DefaultTerminal, argv: &[String]) -> anyhow::Result<String> {
    let Some((program, args)) = argv.split_first() else {
        return Ok("qx-node sent no command".into());
    };
    ratatui::try_restore().context("leave the console screen")?;
    terminal.show_cursor().context("show the cursor")?;
    println!("Quantix emergency shell. Leave it (exit) to return to the console.");
    let how = match Command::new(program).args(args).status() {
        Ok(status) => status.to_string(),
        Err(err) => format!("cannot run {program}: {err}"),
    };
    enable_raw_mode().context("enter raw mode")?;
    execute!(stdout(), EnterAlternateScreen).context("enter the alternate screen")?;
    // Whatever the shell left on the screen must not survive into the next frame's diff.
    terminal.clear().context("clear the terminal")?;
    Ok(how)
}
