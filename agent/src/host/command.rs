//! Running the host commands named in `host:` config: argv lists, no shell, a time limit, and the command's own
//! words in the error when it fails.

use std::process::Stdio;
use std::time::Duration;

use tracing::{debug, info, warn};

/// How much of a failed command's output an error quotes: the end, where the reason usually is.
const OUTPUT_TAIL: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` {status}: {output}")]
    Failed { command: String, status: String, output: String },
    #[error("`{command}` did not finish within {seconds} s and was killed")]
    Timeout { command: String, seconds: u64 },
}

/// `argv` as an operator would type it, for messages.
pub fn display(argv: &[String]) -> String {
    argv.join(" ")
}

/// Runs `argv` to completion (killing it after `timeout`); success means exit status 0.
pub async fn run(argv: &[String], timeout: Duration) -> Result<(), CommandError> {
    let command = display(argv);
    let (program, args) = argv.split_first().ok_or_else(|| CommandError::Spawn {
        command: command.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
    })?;
    debug!(%command, "running host command");
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn { command: command.clone(), source })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.map_err(|source| CommandError::Spawn { command: command.clone(), source })?,
        Err(_) => return Err(CommandError::Timeout { command, seconds: timeout.as_secs() }),
    };
    if output.status.success() {
        return Ok(());
    }
    let text = if output.stderr.iter().any(|b| !b.is_ascii_whitespace()) { &output.stderr } else { &output.stdout };
    Err(CommandError::Failed {
        command,
        status: output.status.to_string(),
        output: tail(&String::from_utf8_lossy(text)),
    })
}

/// Runs `argv` in the background, in a process group of its own so that it outlives qx-node (a reboot or a
/// restart command stops qx-node on the way), after `delay` (so the RPC that asked has been answered). Its
/// outcome is logged when qx-node is still there to see it.
pub fn spawn_detached(argv: Vec<String>, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let command = display(&argv);
        let Some((program, args)) = argv.split_first() else {
            return;
        };
        info!(%command, "running host command");
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match child {
            // Waiting reaps it, so no zombie is left behind.
            Ok(mut child) => match child.wait().await {
                Ok(status) if status.success() => info!(%command, "host command finished"),
                Ok(status) => warn!(%command, %status, "host command failed"),
                Err(error) => warn!(%command, %error, "cannot wait for host command"),
            },
            Err(error) => warn!(%command, %error, "cannot run host command"),
        }
    });
}

/// The end of a command's output, trimmed, where the reason for a failure usually is.
fn tail(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return "no output".to_owned();
    }
    let mut start = text.len().saturating_sub(OUTPUT_TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    #[tokio::test]
    async fn success_failure_missing_and_timeout() {
        let limit = Duration::from_secs(10);
        run(&argv(&["true"]), limit).await.unwrap();
        let err = run(&argv(&["sh", "-c", "echo out; echo 'no such service' >&2; exit 3"]), limit).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "`sh -c echo out; echo 'no such service' >&2; exit 3` exit status: 3: no such service"
        );
        let err = run(&argv(&["sh", "-c", "echo only stdout; exit 1"]), limit).await.unwrap_err();
        assert!(err.to_string().ends_with(": only stdout"), "{err}");
        let err = run(&argv(&["/nonexistent/qx-command"]), limit).await.unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
        let err = run(&argv(&["sleep", "5"]), Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        let long = "é".repeat(OUTPUT_TAIL);
        let kept = tail(&long);
        assert!(kept.len() <= OUTPUT_TAIL && kept.chars().all(|c| c == 'é'));
        assert_eq!(tail("  \n"), "no output");
    }
}
