//! The Host UI in a real browser: Debian's headless Chromium, driven by playwright-core (`ui/tests/browser.mjs`),
//! against a real qx-node serving the built web app (`ui/build.sh`, skipped when `ui/dist` is newer than its
//! sources) on its HTTPS listener, with a booted test guest. The page refuses a wrong password, logs in, shows the
//! host summary, lists the VM running, shows its detail, opens its VNC console in noVNC (a WebSocket the node
//! bridges to the VM's display, opened with a one-use ticket), and stops it with a click; qx-node's own view (GetVm
//! on the unix socket) then agrees. Screenshots of each page are kept under `target/tmp/ui-browser/`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use qx_proto::node::v1 as pb;
use qx_test_infra::{skip, test_guest, wait_until, Daemon};

const PASSWORD: &str = "correct horse battery staple";
const CHROMIUM: &str = "/usr/bin/chromium";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A VNC display whose port (5900 + display) nothing on the host listens on now.
fn free_vnc_display() -> u32 {
    (10..100)
        .find(|display| std::net::TcpListener::bind(("127.0.0.1", 5900 + *display as u16)).is_ok())
        .expect("a free VNC display")
}

fn hash(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qx-node"))
        .arg("--hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The newest modification time of `path` or of anything under it.
fn newest(path: &Path) -> SystemTime {
    let Ok(meta) = std::fs::metadata(path) else { return SystemTime::UNIX_EPOCH };
    let mut time = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            time = time.max(newest(&entry.path()));
        }
    }
    time
}

/// `ui/dist`, built unless it is newer than everything it is built from.
fn built_ui() -> PathBuf {
    let ui = repo().join("ui");
    let dist = ui.join("dist");
    let sources = ["src", "index.html", "package-lock.json", "vite.config.ts", "tsconfig.json", "build.sh"]
        .iter()
        .map(|name| newest(&ui.join(name)))
        .chain([newest(&repo().join("proto/proto"))])
        .max()
        .unwrap();
    // src/gen is written by the build itself; the proto files stand for it.
    let built = std::fs::metadata(dist.join("index.html")).and_then(|m| m.modified()).ok();
    let fresh = built.is_some_and(|built| built > sources && newest(&ui.join("src/gen")) <= built);
    if !fresh {
        let output = Command::new(ui.join("build.sh")).output().expect("run ui/build.sh");
        assert!(output.status.success(), "ui/build.sh failed:\n{}", String::from_utf8_lossy(&output.stderr));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or_default());
    }
    dist
}

#[test]
fn the_host_ui_in_a_browser_logs_in_lists_the_vm_and_stops_it() {
    if !Path::new(CHROMIUM).exists() {
        return skip("no /usr/bin/chromium: agent/tests/install-ui-tools.sh installs it");
    }
    if Command::new("node").arg("--version").output().is_err() {
        return skip("no node: the Host UI build and its browser test need Node.js and npm");
    }
    let dist = built_ui();
    assert!(repo().join("ui/node_modules/playwright-core").exists(), "ui/build.sh ran npm ci");
    test_guest();
    let port = free_port();
    let config = format!(
        "ui:\n  listen: 127.0.0.1:{port}\n  admin_password_hash: '{}'\n  assets_dir: {}\n",
        hash(PASSWORD),
        dist.display()
    );
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "info", Some(&config));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut client = runtime.block_on(client(&daemon));
    runtime.block_on(async {
        let extra = format!("nics:\n  - kind: user\nvnc_display: {}\n", free_vnc_display());
        let spec_text = test_guest().spec_yaml("web1", &extra);
        client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
        start(&mut client, "web1").await;
        // Booted to its shell, the guest powers off on the ACPI button the page's Stop sends.
        boot(&mut client, "web1").await;
    });
    let ca = daemon.data_dir().parent().unwrap().join("certificates/local-ca.pem");
    wait_until(Duration::from_secs(30), || {
        let mut curl = Command::new("curl");
        curl.args(["-sfo/dev/null", "--cacert"]).arg(&ca).arg(format!("https://localhost:{port}/"));
        curl.status().ok()?.success().then_some(())
    })
    .expect("the Host UI listener serves the app");

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-browser");
    let _ = std::fs::remove_dir_all(&artifacts);
    let mut browser = Command::new("node")
        .arg(repo().join("ui/tests/browser.mjs"))
        .env("QX_UI_URL", format!("https://localhost:{port}"))
        .env("QX_UI_PASSWORD", PASSWORD)
        .env("QX_UI_VM", "web1")
        .env("QX_UI_ARTIFACTS", &artifacts)
        .env("QX_CHROMIUM", CHROMIUM)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node ui/tests/browser.mjs");
    let finished = wait_until(Duration::from_secs(300), || browser.try_wait().ok().flatten());
    if finished.is_none() {
        // The script's browser is its child; ending the script by its PID closes the pipe Chromium watches.
        let _ = browser.kill();
    }
    let output = browser.wait_with_output().unwrap();
    // The browser's profile is of no use after the run; the screenshots stay.
    let _ = std::fs::remove_dir_all(artifacts.join("profile"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no report from the browser script:\n{stdout}\n{stderr}"));
    eprintln!("browser report: {report}\nscreenshots: {}", artifacts.display());
    assert!(output.status.success() && report["error"].is_null(), "the browser test failed: {report}\n{stderr}");
    assert_eq!(report["refusal"], "wrong user name or password");
    assert!(report["csrf_refusal"].as_str().unwrap().contains("x-csrf-token"), "{report}");
    assert!(report["framebuffer"]["width"].as_u64().unwrap() > 0, "{report}");
    let refusals = &report["ticket_refusals"];
    assert!(refusals["none"].as_str().unwrap().contains("no console ticket"), "{report}");
    assert!(refusals["forged"].as_str().unwrap().contains("not one this node issued"), "{report}");
    assert!(refusals["no_csrf"].as_str().unwrap().contains("x-csrf-token"), "{report}");
    for page in ["login-refused", "summary", "vms", "vm-detail", "console", "vms-stopped"] {
        assert!(artifacts.join(format!("{page}.png")).exists(), "no screenshot of {page}");
    }

    // qx-node's own view agrees with the page.
    let vm = runtime.block_on(get(&mut client, "web1"));
    assert_eq!(state(&vm), pb::VmState::Stopped, "{vm:?}");
    assert!(!daemon.log_text().contains(PASSWORD), "the password stays out of the log");
}
