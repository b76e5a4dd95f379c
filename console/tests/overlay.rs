//! The host overlay (`overlay/` at the repository root) stays true: the example node.yaml is what qx-node
//! accepts and holds its defaults, the shell scripts parse, the inittab helper does its job once, and the inittab
//! entry's arguments are ones qx-console takes.

use std::path::{Path, PathBuf};
use std::process::Command;

use qx_agent::config::NodeConfig;

fn overlay() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlay")
}

fn read(relative: &str) -> String {
    let path = overlay().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_example_node_yaml_is_valid_and_spells_out_the_defaults() {
    let config = NodeConfig::from_yaml(&read("etc/quantix/node.yaml")).expect("qx-node parses the example");
    config.validate().expect("qx-node accepts the example");
    assert_eq!(config, NodeConfig::default(), "the example's values are qx-node's defaults");
}

#[test]
fn scripts_are_posix_sh_that_parses() {
    let scripts = [
        "etc/init.d/quantix-node",
        "etc/init.d/quantix-console",
        "etc/init.d/firewall",
        "etc/conf.d/quantix-node",
        "etc/conf.d/quantix-console",
        "usr/libexec/quantix/console-on-tty1",
        "usr/libexec/quantix/firewall-ports",
    ];
    for script in scripts {
        let out = Command::new("sh").arg("-n").arg(overlay().join(script)).output().unwrap();
        assert!(out.status.success(), "sh -n {script}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn console_on_tty1_replaces_the_getty_once() {
    let dir = tempfile::tempdir().unwrap();
    let inittab = dir.path().join("inittab");
    // Alpine's stock table, shortened.
    let stock = "::sysinit:/sbin/openrc sysinit\n::wait:/sbin/openrc default\n\
                 tty1::respawn:/sbin/getty 38400 tty1\ntty2::respawn:/sbin/getty 38400 tty2\n\
                 ::ctrlaltdel:/sbin/reboot\n";
    std::fs::write(&inittab, stock).unwrap();
    let run = || {
        let out = Command::new("sh")
            .arg(overlay().join("usr/libexec/quantix/console-on-tty1"))
            .env("INITTAB", &inittab)
            .env("ENTRY_FILE", overlay().join("usr/share/quantix/inittab.tty1"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(&inittab).unwrap()
    };
    let expected = "::sysinit:/sbin/openrc sysinit\n::wait:/sbin/openrc default\n\
                    #tty1::respawn:/sbin/getty 38400 tty1\ntty2::respawn:/sbin/getty 38400 tty2\n\
                    ::ctrlaltdel:/sbin/reboot\n\
                    tty1::respawn:/usr/bin/qx-console --allow-quit false --tty /dev/tty1\n";
    assert_eq!(run(), expected);
    assert_eq!(run(), expected, "a second run changes nothing");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
}

#[test]
fn the_inittab_entry_runs_qx_console_with_arguments_it_takes() {
    let entry = read("usr/share/quantix/inittab.tty1");
    let entry = entry.lines().find(|line| !line.starts_with('#') && !line.is_empty()).unwrap();
    let command = entry.splitn(4, ':').nth(3).unwrap();
    let mut argv = command.split_whitespace();
    assert_eq!(argv.next(), Some("/usr/bin/qx-console"));
    let args: Vec<&str> = argv.collect();
    assert_eq!(args, ["--allow-quit", "false", "--tty", "/dev/tty1"]);
    // Parsed like on the host; --version then stops before anything touches a terminal.
    let out = Command::new(env!("CARGO_BIN_EXE_qx-console")).args(&args).arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
