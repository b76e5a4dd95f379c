//! Live migration between two qx-node daemons on this machine: separate data dirs, sockets and TCP ports, mutual
//! TLS between them with node certificates from one cluster CA, real QEMUs under TCG running the test guest.

mod common;
mod tls_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{boot, create, get, start, state, Client, Console};
use qx_agent::certs::CertPaths;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::migration_peer_service_client::MigrationPeerServiceClient;
use qx_proto::node::v1::migration_service_client::MigrationServiceClient;
use tls_common::TlsNode;
use tonic::Code;

/// A cluster CA that signs both nodes' certificates, as a control plane does at JoinCluster.
struct Cluster {
    dir: tempfile::TempDir,
    ca: CertPaths,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("qx-cluster-").tempdir().unwrap();
        let ca = CertPaths::new(dir.path().join("ca"));
        ca.ensure("cluster", &[]).unwrap();
        Self { dir, ca }
    }

    /// The certificates directory of node `name`: its own key, a certificate for it from the cluster CA (for
    /// `localhost` and 127.0.0.1, usable as server and client), and the cluster CA.
    fn node_certificates(&self, name: &str) -> PathBuf {
        let certs = CertPaths::new(self.dir.path().join(format!("certs-{name}")));
        certs.ensure(name, &[]).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&certs.node_csr(name).unwrap()).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(self.ca.local_ca_key()).unwrap()).unwrap();
        let ca_pem = std::fs::read_to_string(self.ca.local_ca()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, key).unwrap();
        let signed = params.signed_by(&csr.public_key, &issuer).unwrap().pem();
        certs.install_cluster(&ca_pem, &signed).unwrap();
        certs.dir().to_owned()
    }

    /// A node named `name` that lets `peer`'s certificate migrate VMs to it.
    fn node(&self, name: &str, peer: &str) -> TlsNode {
        let certs = self.node_certificates(name);
        TlsNode::start(&format!(
            "node_name: {name}\ntls:\n  certificates_dir: {}\n  clients:\n    - name: {peer}\n      role: admin\n",
            certs.display()
        ))
    }
}

/// Nodes `node-a` and `node-b`, each letting the other migrate VMs to it; the cluster must outlive them.
async fn two_nodes() -> (Cluster, TlsNode, TlsNode) {
    let cluster = Cluster::new();
    let (a, b) = (cluster.node("node-a", "node-b"), cluster.node("node-b", "node-a"));
    b.wait_tcp().await;
    (cluster, a, b)
}

async fn unix(node: &TlsNode) -> (Client, MigrationServiceClient<tonic::transport::Channel>) {
    let channel = qx_agent::client::channel(node.daemon.socket()).await.unwrap();
    (Client::new(channel.clone()), MigrationServiceClient::new(channel))
}

fn url(node: &TlsNode) -> String {
    format!("grpcs://127.0.0.1:{}", node.port)
}

/// The largest `C<n>` counter line printed.
fn last_count(text: &str) -> u64 {
    text.split(['\r', '\n']).filter_map(|l| l.trim().strip_prefix('C')?.parse().ok()).max().unwrap_or(0)
}

/// The first `C<n>` counter line printed.
fn first_count(text: &str) -> Option<u64> {
    text.split(['\r', '\n']).find_map(|l| l.trim().strip_prefix('C')?.parse().ok())
}

/// Reads the console until the counter passes `count`.
async fn counter_passes(console: &mut Console, count: u64) {
    let what = format!("the counter passing {count}");
    console.expect_that(&what, Duration::from_secs(60), |seen| last_count(seen) > count).await;
}

/// Boots the test guest as `name` on `client`'s node and starts a counter on its console.
async fn running_counter(client: &mut Client, name: &str) -> Console {
    create(client, name).await;
    start(client, name).await;
    let mut console = boot(client, name).await;
    let line = b"i=0; while true; do i=$((i+1)); echo C$i; sleep 0.2; done &\n".to_vec();
    console.input.send(pb::ConsoleInput { data: line, ..Default::default() }).await.unwrap();
    counter_passes(&mut console, 3).await;
    console
}

fn vm_dirs(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("vms"))
        .map(|dir| dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_to_the_other_node_and_its_counter_goes_on() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut client_a, mut migrations_a) = unix(&a).await;
    let (mut client_b, _) = unix(&b).await;
    let mut console = running_counter(&mut client_a, "mover").await;
    let uuid = get(&mut client_a, "mover").await.spec.unwrap().uuid;
    let source_qemus = a.daemon.qemu_pids();
    assert_eq!(source_qemus.len(), 1);

    let request = pb::MigrateVmRequest { name: "mover".into(), target_url: url(&b), ..Default::default() };
    let mut stream = migrations_a.migrate_vm(request).await.expect("MigrateVm").into_inner();
    let mut phases = Vec::new();
    let result = loop {
        match stream.message().await.expect("the migration succeeds").and_then(|e| e.event) {
            Some(pb::migration_event::Event::Progress(p)) => {
                if phases.last() != Some(&p.phase) {
                    phases.push(p.phase);
                }
            }
            Some(pb::migration_event::Event::Result(result)) => break result,
            None => panic!("the stream ended without a result; phases {phases:?}"),
        }
    };
    assert_eq!(result.target_node, "node-b");
    assert!(!result.encrypted && result.total_time_ms > 0 && result.transferred_bytes > 0, "{result:?}");
    assert!(phases.iter().any(|p| p == "precopy") && phases.last().unwrap() == "completed", "{phases:?}");
    // What the source printed before it stopped.
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(300), console.output.message()).await {
        console.seen.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    let before = last_count(&console.seen);

    // The VM is listed on the target only, running there with the same uuid; the source's QEMU and files are gone.
    let listed = client_a.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms;
    assert!(listed.is_empty(), "still on the source: {listed:?}");
    assert!(vm_dirs(&a.daemon.data_dir()).iter().all(|d| d.starts_with('.')), "{:?}", vm_dirs(&a.daemon.data_dir()));
    let gone = qx_test_infra::wait_until(Duration::from_secs(20), || {
        source_qemus.iter().all(|pid| !qx_test_infra::pid_alive(*pid)).then_some(())
    });
    assert!(gone.is_some(), "the source QEMU still runs");
    let moved = get(&mut client_b, "mover").await;
    assert_eq!(state(&moved), pb::VmState::Running);
    assert_eq!(moved.spec.unwrap().uuid, uuid);

    // The guest did not restart: its counter goes on from where it was.
    let mut target_console = Console::open(&mut client_b, "mover").await;
    counter_passes(&mut target_console, before + 2).await;
    let first = first_count(&target_console.seen).unwrap();
    assert!(first + 1 >= before && first <= before + 3, "the counter restarted or jumped: {before} then {first}");
    let uptime = target_console.sh("cut -d. -f1 /proc/uptime").await;
    assert!(uptime.parse::<u64>().unwrap() >= 2, "the guest rebooted: uptime {uptime}");
    println!(
        "migrated in {} ms, downtime {} ms, {} bytes; counter {before} -> {first}",
        result.total_time_ms, result.downtime_ms, result.transferred_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_under_another_accelerator_refuses_the_vm_and_creates_nothing() {
    let (cluster, _a, b) = two_nodes().await;
    // node-a's own certificate, as its migration driver presents it to node-b.
    let certs = CertPaths::new(cluster.dir.path().join("certs-node-a"));
    let files = tls_common::ClientFiles { key: certs.node_key(), cert: certs.node_cert(), ca: certs.cluster_ca() };
    let mut peer = MigrationPeerServiceClient::new(b.channel(&files).await.expect("node-a reaches node-b"));
    let spec_text = qx_test_infra::test_guest().spec_yaml("kvm-vm", "uuid: 11111111-2222-4333-8444-555555555555\n");
    let spec = qx_vmm::VmSpec::from_text(&spec_text).unwrap();
    let devices = qx_vmm::DeviceTree::new(&spec).unwrap();
    let request = pb::PrepareIncomingRequest {
        spec_json: serde_json::to_string(&spec).unwrap(),
        devices_json: serde_json::to_string(&devices).unwrap(),
        config_json: serde_json::to_string(&qx_vmm::migration::MigrationConfig::default()).unwrap(),
        source_node: "node-a".into(),
        accelerator: "kvm".into(),
    };
    let refused = peer.prepare_incoming(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let expected = "accelerator: \"kvm\" is what the VM runs under on node-a; this node would run it under tcg";
    assert!(refused.message().contains(expected), "{}", refused.message());
    let (mut client_b, _) = unix(&b).await;
    assert!(client_b.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    assert!(vm_dirs(&b.daemon.data_dir()).iter().all(|d| d.starts_with('.')), "{:?}", vm_dirs(&b.daemon.data_dir()));
}

/// Runs `stream` to its result.
async fn completed(stream: &mut tonic::Streaming<pb::MigrationEvent>) -> pb::MigrationResult {
    loop {
        match stream.message().await.expect("the migration succeeds").and_then(|e| e.event) {
            Some(pb::migration_event::Event::Result(result)) => return result,
            Some(_) => {}
            None => panic!("the stream ended without a result"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uefi_vm_with_a_tpm_moves_with_its_nvram_and_keeps_its_tpm() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut client_a, mut migrations_a) = unix(&a).await;
    let (mut client_b, _) = unix(&b).await;
    let spec_text =
        qx_test_infra::test_guest().efi_spec_yaml("efi", "firmware: uefi\ntpm: true\nnics:\n  - kind: user\n");
    client_a.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
    start(&mut client_a, "efi").await;
    let mut console = boot(&mut client_a, "efi").await;
    assert_eq!(console.sh("ls /sys/class/tpm").await, "tpm0");
    // What the firmware wrote on the source at first boot (its boot entries): not the template any more.
    let vars = std::fs::read(a.daemon.data_dir().join("vms/efi/uefi-vars.fd")).unwrap();
    assert_ne!(vars, std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.fd").unwrap());
    let request = pb::MigrateVmRequest { name: "efi".into(), target_url: url(&b), ..Default::default() };
    let mut stream = migrations_a.migrate_vm(request).await.expect("MigrateVm").into_inner();
    completed(&mut stream).await;
    assert_eq!(state(&get(&mut client_b, "efi").await), pb::VmState::Running);
    let target_dir = b.daemon.data_dir().join("vms/efi");
    // The flash travels in QEMU's stream; the target's QEMU writes it to its copy as the guest resumes.
    let moved = qx_test_infra::wait_until(Duration::from_secs(10), || {
        (std::fs::read(target_dir.join("uefi-vars.fd")).ok()? == vars).then_some(())
    });
    assert!(moved.is_some(), "the target's NVRAM is not the source's");
    let swtpm: i32 = std::fs::read_to_string(target_dir.join("swtpm.pid")).unwrap().trim().parse().unwrap();
    assert!(qx_test_infra::pid_alive(swtpm), "the target runs the VM's swtpm");
    let mut console = Console::open(&mut client_b, "efi").await;
    assert_eq!(console.sh("ls /sys/class/tpm").await, "tpm0", "the guest keeps its TPM");
    let uptime = console.sh("cut -d. -f1 /proc/uptime").await;
    assert!(uptime.parse::<u64>().unwrap() >= 2, "the guest rebooted: uptime {uptime}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_cancel_mid_way_leave_the_vm_running_on_the_source_and_nothing_on_the_target() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut client_a, mut migrations_a) = unix(&a).await;
    let (mut client_b, _) = unix(&b).await;
    let mut console = running_counter(&mut client_a, "stay").await;

    // The name exists on the target: refused before anything moves, naming the cause.
    create(&mut client_b, "stay").await;
    let request = pb::MigrateVmRequest { name: "stay".into(), target_url: url(&b), ..Default::default() };
    let refused = async {
        let mut stream = migrations_a.migrate_vm(request.clone()).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    let err = refused.await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("already exists"), "{}", err.message());
    assert_eq!(state(&get(&mut client_a, "stay").await), pb::VmState::Running);
    client_b.delete_vm(pb::VmRef { name: "stay".into() }).await.unwrap();
    // A bad target URL names the field.
    let bad = pb::MigrateVmRequest { target_url: "http://x:1".into(), ..request };
    let err = async { migrations_a.migrate_vm(bad).await?.into_inner().message().await }.await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("target_url: \"http://x:1\""), "{}", err.message());

    // 1 MiB/s: the guest's memory takes about a minute, so a cancel after the first precopy progress is mid-way.
    let mut stream = slow_migration(&mut migrations_a, "stay", &b).await;
    assert_eq!(state(&get(&mut client_a, "stay").await), pb::VmState::Migrating);
    assert_eq!(state(&get(&mut client_b, "stay").await), pb::VmState::Incoming);
    migrations_a.cancel_migration(pb::CancelMigrationRequest { name: "stay".into() }).await.expect("CancelMigration");
    let err = stream_error(&mut stream, "the stream ended without saying the migration was cancelled").await;
    assert_eq!(err.code(), Code::Cancelled, "{err:?}");

    // The guest runs on the source as before; the target has no VM, no files and no QEMU left.
    assert_eq!(state(&get(&mut client_a, "stay").await), pb::VmState::Running);
    let before = last_count(&console.seen);
    counter_passes(&mut console, before + 3).await;
    let cleaned = qx_test_infra::wait_until(Duration::from_secs(20), || {
        (b.daemon.qemu_pids().is_empty() && vm_dirs(&b.daemon.data_dir()).iter().all(|d| d.starts_with('.')))
            .then_some(())
    });
    assert!(cleaned.is_some(), "left on the target: {:?}", vm_dirs(&b.daemon.data_dir()));
    assert!(client_b.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    let err = migrations_a.cancel_migration(pb::CancelMigrationRequest { name: "stay".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Starts a slow (1 MiB/s) migration of `name` to `b` and returns its stream once precopy is under way.
async fn slow_migration(
    migrations: &mut MigrationServiceClient<tonic::transport::Channel>,
    name: &str,
    b: &TlsNode,
) -> tonic::Streaming<pb::MigrationEvent> {
    let request = pb::MigrateVmRequest {
        name: name.into(),
        target_url: url(b),
        max_bandwidth_bytes: 1 << 20,
        ..Default::default()
    };
    let mut stream = migrations.migrate_vm(request).await.unwrap().into_inner();
    loop {
        match stream.message().await.unwrap().and_then(|e| e.event) {
            Some(pb::migration_event::Event::Progress(p)) if p.phase == "precopy" && p.transferred_bytes > 0 => {
                return stream
            }
            Some(pb::migration_event::Event::Progress(_)) => {}
            other => panic!("no precopy progress: {other:?}"),
        }
    }
}

/// Reads `stream` to its end, which must be an error, and returns it.
async fn stream_error(stream: &mut tonic::Streaming<pb::MigrationEvent>, what: &str) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("{what}: the stream ended without an error"),
            Err(status) => return status,
        }
    }
}

/// The VM runs on `a` only (counting on its console), and `b` has no VM, no files and no QEMU left.
async fn runs_on_the_source_only(a: &TlsNode, b: &TlsNode, name: &str, phase: &str) {
    let (mut client_a, _) = unix(a).await;
    let ran = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if state(&get(&mut client_a, name).await) == pb::VmState::Running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ran.is_ok(), "{phase}: the VM does not run on the source: {:?}", get(&mut client_a, name).await);
    let mut console = Console::open(&mut client_a, name).await;
    let before = last_count(&console.seen);
    counter_passes(&mut console, before + 3).await;
    let cleaned = qx_test_infra::wait_until(Duration::from_secs(90), || {
        (b.daemon.qemu_pids().is_empty() && vm_dirs(&b.daemon.data_dir()).iter().all(|d| d.starts_with('.')))
            .then_some(())
    });
    assert!(cleaned.is_some(), "{phase}: left on the target: {:?}", vm_dirs(&b.daemon.data_dir()));
    let (mut client_b, _) = unix(b).await;
    let listed = client_b.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms;
    assert!(listed.is_empty(), "{phase}: listed on the target: {listed:?}");
    assert_eq!(a.daemon.qemu_pids().len(), 1, "{phase}: one QEMU on the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_target_qemu_the_source_daemon_or_the_target_daemon_mid_way_leaves_the_vm_on_the_source() {
    let (_cluster, mut a, mut b) = two_nodes().await;
    let (mut client_a, mut migrations) = unix(&a).await;
    running_counter(&mut client_a, "tough").await;

    // The target's QEMU is killed: the stream breaks, the source resumes, the target's VM goes with its QEMU.
    let mut stream = slow_migration(&mut migrations, "tough", &b).await;
    for pid in b.daemon.qemu_pids() {
        qx_test_infra::kill_pid(pid);
    }
    let err = stream_error(&mut stream, "the migration ended well without its target").await;
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("it keeps running here"), "{}", err.message());
    runs_on_the_source_only(&a, &b, "tough", "target QEMU killed").await;

    // The source daemon is killed: its QEMU goes on sending; the restarted daemon cancels that migration, and the
    // target's QEMU, its stream cancelled, ends and takes the incoming VM with it.
    let stream = slow_migration(&mut migrations, "tough", &b).await;
    a.daemon.kill9();
    drop(stream);
    a.daemon.restart();
    runs_on_the_source_only(&a, &b, "tough", "source daemon killed").await;
    assert!(a.daemon.log_text().contains("cancelling a migration cut short by the restart"));

    // The target daemon is killed: the restarted one removes the incoming VM and its QEMU; the source's stream
    // breaks and the source resumes.
    let (_, mut migrations) = unix(&a).await;
    let mut stream = slow_migration(&mut migrations, "tough", &b).await;
    b.daemon.kill9();
    b.daemon.restart();
    let err = stream_error(&mut stream, "the migration ended well without its target daemon").await;
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    runs_on_the_source_only(&a, &b, "tough", "target daemon killed").await;
    assert!(b.daemon.log_text().contains("cut short by a qx-node restart"));
}
