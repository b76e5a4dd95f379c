//! The serial console: QEMU serves it on a unix socket; qx-node reads it into a bounded history and a bounded log
//! file, fans it out to live viewers, and writes their input back.
//!
//! QEMU drops output while nobody is connected instead of blocking the guest, so a daemon restart costs at most the
//! output printed while it was down; the guest never notices.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::broadcast;

use crate::persist::read_tail;

/// Output kept in memory for viewers that ask for history.
pub const HISTORY_BYTES: usize = 64 * 1024;
/// The console log rotates to `console.log.1` past this size, so a chatty guest costs at most twice this on disk.
pub const LOG_ROTATE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot connect to the serial console at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write to the serial console")]
    Write(#[source] std::io::Error),
    #[error("the serial console is closed")]
    Closed,
}

struct Shared {
    capture: Mutex<Capture>,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
}

struct Capture {
    history: VecDeque<u8>,
    /// `None` once QEMU closed the socket: dropping the sender ends every viewer's stream.
    live: Option<broadcast::Sender<Vec<u8>>>,
}

/// One VM's serial console while its QEMU runs. Cheap to clone.
#[derive(Clone)]
pub struct SerialConsole {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialConsole")
    }
}

impl SerialConsole {
    /// Connects to QEMU's serial socket and starts capturing into `log` (history starts from the log's tail, so a
    /// restarted daemon still shows what came before).
    pub async fn attach(socket: &Path, log: &Path) -> Result<Self, ConsoleError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ConsoleError::Connect { path: socket.to_owned(), source })?;
        let (mut reader, writer) = stream.into_split();
        let log = log.to_owned();
        let tail = {
            let log = log.clone();
            tokio::task::spawn_blocking(move || read_tail(&log, HISTORY_BYTES as u64)).await.unwrap_or_default()
        };
        let (live, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            capture: Mutex::new(Capture { history: tail.into(), live: Some(live) }),
            writer: tokio::sync::Mutex::new(Some(writer)),
        });
        let capture = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut log_file = LogFile::open(log).await;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                {
                    let mut state = capture.capture.lock().unwrap_or_else(|e| e.into_inner());
                    state.history.extend(chunk);
                    let excess = state.history.len().saturating_sub(HISTORY_BYTES);
                    state.history.drain(..excess);
                    // Sent under the lock so a viewer subscribing meanwhile sees each byte exactly once.
                    if let Some(live) = &state.live {
                        let _ = live.send(chunk.to_vec());
                    }
                }
                log_file.append(chunk).await;
            }
            capture.capture.lock().unwrap_or_else(|e| e.into_inner()).live = None;
            capture.writer.lock().await.take();
        });
        Ok(Self { shared })
    }

    /// Recent output and a receiver for everything after it, with no gap and no overlap between the two.
    pub fn subscribe(&self) -> (Vec<u8>, broadcast::Receiver<Vec<u8>>) {
        let state = self.shared.capture.lock().unwrap_or_else(|e| e.into_inner());
        let live = match &state.live {
            Some(live) => live.subscribe(),
            None => broadcast::channel(1).1,
        };
        (state.history.iter().copied().collect(), live)
    }

    /// Types `data` into the guest's serial port.
    pub async fn write(&self, data: &[u8]) -> Result<(), ConsoleError> {
        let mut writer = self.shared.writer.lock().await;
        let writer = writer.as_mut().ok_or(ConsoleError::Closed)?;
        writer.write_all(data).await.map_err(ConsoleError::Write)
    }
}

/// `console.log` with rotation. Write failures are logged once and then ignored: a full disk must not stop the
/// console from reaching live viewers.
struct LogFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    size: u64,
    warned: bool,
}

impl LogFile {
    async fn open(path: PathBuf) -> Self {
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await;
        let (file, size) = match file {
            Ok(file) => {
                let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                (Some(file), size)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open console log");
                (None, 0)
            }
        };
        Self { path, file, size, warned: false }
    }

    async fn append(&mut self, data: &[u8]) {
        if self.size + data.len() as u64 > LOG_ROTATE_BYTES {
            let rotated = self.path.with_extension("log.1");
            if tokio::fs::rename(&self.path, &rotated).await.is_ok() {
                *self = Self::open(self.path.clone()).await;
            }
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(data).await {
            Ok(()) => self.size += data.len() as u64,
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write console log");
            }
            Err(_) => {}
        }
        // tokio's File buffers in a background task; flush so the log is current for readers.
        let _ = file.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn captures_history_log_and_live_output_and_writes_input() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("serial.sock");
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"before restart\n").unwrap();
        let listener = UnixListener::bind(&socket).unwrap();
        let console = SerialConsole::attach(&socket, &log).await.unwrap();
        let (mut guest, _) = listener.accept().await.unwrap();

        let (history, mut live) = console.subscribe();
        assert_eq!(history, b"before restart\n");
        guest.write_all(b"login: ").await.unwrap();
        assert_eq!(live.recv().await.unwrap(), b"login: ");

        console.write(b"root\n").await.unwrap();
        let mut typed = [0u8; 5];
        guest.read_exact(&mut typed).await.unwrap();
        assert_eq!(&typed, b"root\n");

        drop(guest);
        assert!(live.recv().await.is_err(), "viewers see the end when QEMU goes away");
        assert_eq!(std::fs::read(&log).unwrap(), b"before restart\nlogin: ");
        assert!(matches!(console.write(b"x").await, Err(ConsoleError::Closed)));
    }

    #[tokio::test]
    async fn history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("serial.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let console = SerialConsole::attach(&socket, &dir.path().join("console.log")).await.unwrap();
        let (mut guest, _) = listener.accept().await.unwrap();
        let (_, mut live) = console.subscribe();
        let data = vec![b'x'; HISTORY_BYTES + 1000];
        guest.write_all(&data).await.unwrap();
        let mut seen = 0;
        while seen < data.len() {
            seen += live.recv().await.unwrap().len();
        }
        assert_eq!(console.subscribe().0.len(), HISTORY_BYTES);
    }
}
