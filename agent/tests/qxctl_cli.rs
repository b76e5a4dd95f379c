//! qxctl as a shell user meets it: completion scripts for bash, zsh and fish, and `qxctl events` printing times of
//! day, against a real qx-node.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn qxctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qxctl"))
}

fn completions(shell: &str) -> String {
    let output = qxctl().args(["completions", shell]).output().unwrap();
    assert!(output.status.success(), "{shell}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish() {
    let bash = completions("bash");
    // bash parses it, and it offers the subcommands and their flags.
    let mut check = Command::new("bash").arg("-n").stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), bash.as_bytes()).unwrap();
    assert!(check.wait().unwrap().success(), "bash -n refused the script");
    for word in ["complete -F _qxctl", "events", "completions", "--socket", "volume"] {
        assert!(bash.contains(word), "{word} missing from the bash completions");
    }
    assert!(completions("zsh").starts_with("#compdef qxctl"));
    assert!(completions("fish").contains("complete -c qxctl"));
    let output = qxctl().args(["completions", "tcsh"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("tcsh"), "the bad value is named");
}

/// Kills the `qxctl events` it holds when dropped, even when the test fails.
struct Watcher(std::process::Child);

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_print_the_time_of_day() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let mut watcher =
        Watcher(qxctl().arg("--socket").arg(daemon.socket()).arg("events").stdout(Stdio::piped()).spawn().unwrap());
    let mut lines = BufReader::new(watcher.0.stdout.take().unwrap()).lines();
    // The watch is open once WatchEvents answered; until then a create could go unseen, so create until one shows.
    let reader = std::thread::spawn(move || lines.next().map(|line| line.unwrap()));
    let mut n = 0;
    while !reader.is_finished() {
        create(&mut client, &format!("ev{n}")).await;
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let line = reader.join().unwrap().expect("a line of qxctl events");
    let (time, rest) = line.split_once("  ").unwrap_or_else(|| panic!("{line:?}"));
    let digits: Vec<&str> = time.split([':', '.']).collect();
    assert_eq!(digits.iter().map(|d| d.len()).collect::<Vec<_>>(), [2, 2, 2, 3], "{line:?}");
    assert!(digits.iter().all(|d| d.chars().all(|c| c.is_ascii_digit())), "{line:?}");
    assert!(rest.starts_with("ev") && rest.contains("-> stopped  created"), "{line:?}");
}
