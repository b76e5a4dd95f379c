//! The Host UI listener's login end to end: a real qx-node serving HTTPS with its node certificate, driven with
//! curl (HTTP/1.1, as a browser's gRPC-Web client talks): nothing of the API without a session, wrong passwords,
//! forged and expired cookies and a missing CSRF token refused with clear messages, a lock-out after repeated
//! failures, and the daemon healthy after all of it.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use qx_test_infra::{test_guest, wait_until, Daemon};

const PASSWORD: &str = "correct horse battery staple";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

/// One HTTP exchange: status, headers (lowercased names), body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

struct Ui {
    port: u16,
    ca: PathBuf,
    scratch: tempfile::TempDir,
}

impl Ui {
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let body_file = self.scratch.path().join("body");
        std::fs::write(&body_file, body).unwrap();
        let mut curl = Command::new("curl");
        curl.args(["--silent", "--show-error", "--http1.1", "--max-time", "30", "-i", "-X", method, "--cacert"])
            .arg(&self.ca);
        for (name, value) in headers {
            curl.args(["-H", &format!("{name}: {value}")]);
        }
        if !body.is_empty() {
            curl.arg("--data-binary").arg(format!("@{}", body_file.display()));
        }
        let output = curl.arg(format!("https://localhost:{}{path}", self.port)).output().expect("run curl");
        assert!(output.status.success(), "curl: {}", String::from_utf8_lossy(&output.stderr));
        let raw = output.stdout;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply { status, headers, body: raw[split + 4..].to_vec() }
    }

    fn login(&self, user: &str, password: &str) -> Reply {
        let body = serde_json::json!({ "user": user, "password": password }).to_string();
        self.request("POST", "/api/login", &[("content-type", "application/json")], body.as_bytes())
    }

    /// GetNodeInfo as a browser's gRPC-Web client sends it: an empty message in one frame.
    fn get_node_info(&self, cookie: Option<&str>, csrf: Option<&str>) -> Reply {
        let mut headers = vec![("content-type", "application/grpc-web+proto"), ("x-grpc-web", "1")];
        let cookie = cookie.map(|c| format!("qx_session={c}"));
        if let Some(cookie) = &cookie {
            headers.push(("cookie", cookie));
        }
        if let Some(csrf) = csrf {
            headers.push(("x-csrf-token", csrf));
        }
        self.request("POST", "/quantix.node.v1.NodeService/GetNodeInfo", &headers, &[0, 0, 0, 0, 0])
    }
}

/// The session token a login's `Set-Cookie` carries, after checking its attributes.
fn session_cookie(reply: &Reply) -> String {
    let cookie = reply.header("set-cookie").unwrap_or_else(|| panic!("no cookie: {reply:?}"));
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{attribute} missing: {cookie}");
    }
    cookie.strip_prefix("qx_session=").unwrap().split(';').next().unwrap().to_owned()
}

fn grpc_refusal(reply: &Reply, code: u32, message: &str) {
    assert_eq!(reply.status, 200, "gRPC-Web refusals are gRPC statuses: {reply:?}");
    assert_eq!(reply.header("grpc-status"), Some(code.to_string().as_str()), "{reply:?}");
    let said = reply.header("grpc-message").unwrap_or_default().replace("%20", " ");
    assert!(said.contains(message), "{message:?} not in {said:?}");
}

#[test]
fn nothing_of_the_api_without_a_session_and_every_refusal_says_why() {
    test_guest();
    let port = free_port();
    let config = format!(
        "ui:\n  listen: 127.0.0.1:{port}\n  admin_password_hash: '{}'\n  lockout_failures: 3\n  lockout_seconds: 3\n  \
         session_idle_seconds: 3\n",
        hash(PASSWORD)
    );
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
    let ui = Ui {
        port,
        ca: daemon.data_dir().parent().unwrap().join("certificates/local-ca.pem"),
        scratch: tempfile::tempdir().unwrap(),
    };
    wait_until(Duration::from_secs(30), || {
        let mut curl = Command::new("curl");
        curl.args(["-so/dev/null", "--cacert"]).arg(&ui.ca).arg(format!("https://localhost:{port}/api/session"));
        curl.status().ok()?.success().then_some(())
    })
    .expect("the Host UI listener answers");

    // Nothing of the API without a session.
    let reply = ui.get_node_info(None, None);
    grpc_refusal(&reply, 16, "no session");
    assert_eq!(ui.request("GET", "/api/session", &[], b"").status, 401);
    let reply = ui.get_node_info(Some("00ff"), Some("00ff"));
    grpc_refusal(&reply, 16, "not one this node issued");

    // Bad login bodies name what is wrong; wrong passwords are refused alike for both names.
    let reply = ui.request("POST", "/api/login", &[], b"{\"user\": \"root\"}");
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"].as_str().unwrap().contains("password"), "{}", reply.text());
    let reply = ui.request("POST", "/api/login", &[], &vec![b' '; 10_000]);
    assert_eq!(reply.status, 413, "{}", reply.text());
    for (user, password) in [("root", "wrong"), ("admin", PASSWORD)] {
        let reply = ui.login(user, password);
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert_eq!(reply.json()["error"], "wrong user name or password");
        assert!(reply.header("set-cookie").is_none());
    }
    // The third failure locks the login, even for the right password.
    let reply = ui.login("root", "wrong again");
    assert_eq!(reply.status, 429, "{}", reply.text());
    let reply = ui.login("root", PASSWORD);
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert!(reply.json()["error"].as_str().unwrap().starts_with("too many failed logins"), "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
    let reply = wait_until(Duration::from_secs(10), || Some(ui.login("root", PASSWORD)).filter(|r| r.status != 429))
        .expect("the lock-out ends");

    // Logged in: the cookie and the CSRF token together open the API.
    assert_eq!(reply.status, 200, "{}", reply.text());
    let token = session_cookie(&reply);
    let csrf = reply.json()["csrf_token"].as_str().unwrap().to_owned();
    let reply = ui.get_node_info(Some(&token), Some(&csrf));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/grpc-web+proto"));
    assert!(reply.text().contains("grpc-status:0"), "the trailer frame says OK: {:?}", reply.text());
    assert!(reply.text().contains("qemu-system-x86_64"), "GetNodeInfo's answer: {:?}", reply.text());
    let session = ui.request("GET", "/api/session", &[("cookie", &format!("qx_session={token}"))], b"");
    assert_eq!(session.json()["csrf_token"], csrf.as_str(), "a reloaded page gets its CSRF token back");

    // The cookie alone (a cross-site request) is not enough, nor a wrong token, nor a cookie changed by one digit.
    grpc_refusal(&ui.get_node_info(Some(&token), None), 7, "x-csrf-token");
    grpc_refusal(&ui.get_node_info(Some(&token), Some("not-the-token")), 7, "x-csrf-token");
    let mut forged = token.clone().into_bytes();
    forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
    grpc_refusal(&ui.get_node_info(Some(std::str::from_utf8(&forged).unwrap()), Some(&csrf)), 16, "not one this node");

    // An idle session expires.
    std::thread::sleep(Duration::from_secs(4));
    grpc_refusal(&ui.get_node_info(Some(&token), Some(&csrf)), 16, "expired");

    // Logout ends a session at once.
    let reply = ui.login("root", PASSWORD);
    let (token, csrf) = (session_cookie(&reply), reply.json()["csrf_token"].as_str().unwrap().to_owned());
    let cookie = format!("qx_session={token}");
    let reply = ui.request("POST", "/api/logout", &[("cookie", &cookie), ("x-csrf-token", &csrf)], b"");
    assert_eq!(reply.status, 204);
    grpc_refusal(&ui.get_node_info(Some(&token), Some(&csrf)), 16, "not one this node issued");

    // The daemon is healthy after all of it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = client(&daemon).await;
        client.get_node_info(qx_proto::node::v1::GetNodeInfoRequest {}).await.expect("GetNodeInfo on the socket");
    });
    let log = daemon.log_text();
    assert!(!log.contains(PASSWORD) && !log.contains("wrong again"), "passwords stay out of the log");
}

#[test]
fn the_web_app_files_are_served_with_its_routes_and_nothing_outside_them() {
    test_guest();
    let port = free_port();
    let scratch = tempfile::tempdir().unwrap();
    let assets = scratch.path().join("ui");
    std::fs::create_dir_all(assets.join("assets")).unwrap();
    std::fs::write(assets.join("index.html"), "<!doctype html><div id=root></div>").unwrap();
    std::fs::write(assets.join("assets/app-1a2b.js"), "console.log('plain')").unwrap();
    std::fs::write(assets.join("assets/app-1a2b.js.gz"), "gzip bytes").unwrap();
    std::fs::write(scratch.path().join("secret.txt"), "outside").unwrap();
    let config = format!("ui:\n  listen: 127.0.0.1:{port}\n  assets_dir: {}\n", assets.display());
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
    let ui = Ui { port, ca: daemon.data_dir().parent().unwrap().join("certificates/local-ca.pem"), scratch };
    let index = wait_until(Duration::from_secs(30), || {
        let mut curl = Command::new("curl");
        curl.args(["-sf", "--cacert"]).arg(&ui.ca).arg(format!("https://localhost:{port}/"));
        curl.output().ok().filter(|o| o.status.success())
    })
    .expect("the Host UI listener answers");
    assert_eq!(String::from_utf8_lossy(&index.stdout), "<!doctype html><div id=root></div>");

    let reply = ui.request("GET", "/", &[], b"");
    assert_eq!(reply.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));
    assert!(reply.header("content-security-policy").is_some_and(|csp| csp.contains("frame-ancestors 'none'")));
    // The app's own routes load the app.
    let reply = ui.request("GET", "/vms/web1", &[], b"");
    assert_eq!((reply.status, reply.text().as_str()), (200, "<!doctype html><div id=root></div>"));
    let reply = ui.request("GET", "/assets/app-1a2b.js", &[], b"");
    assert_eq!((reply.status, reply.text().as_str()), (200, "console.log('plain')"));
    assert_eq!(reply.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(reply.header("cache-control"), Some("public, max-age=31536000, immutable"));
    let reply = ui.request("GET", "/assets/app-1a2b.js", &[("accept-encoding", "gzip")], b"");
    assert_eq!((reply.header("content-encoding"), reply.text().as_str()), (Some("gzip"), "gzip bytes"));
    let reply = ui.request("GET", "/assets/missing.js", &[], b"");
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"].as_str().unwrap().contains("no such file"), "{}", reply.text());
    // Nothing outside the assets directory, however the path is spelled.
    for path in ["/../secret.txt", "/assets/../../secret.txt", "/%2e%2e/secret.txt", "/.hidden"] {
        let mut curl = Command::new("curl");
        curl.args(["-s", "--path-as-is", "--cacert"]).arg(&ui.ca).arg(format!("https://localhost:{port}{path}"));
        let body = String::from_utf8_lossy(&curl.output().unwrap().stdout).into_owned();
        assert!(!body.contains("outside"), "{path} reached a file outside: {body}");
    }
    assert_eq!(ui.request("DELETE", "/", &[], b"").status, 405);
}
