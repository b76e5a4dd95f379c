//! The guest agent API against guests without an agent: the busybox test guest runs no qemu-ga, so every call
//! must end with a clear error in bounded time while the daemon goes on answering. The real agent in a real
//! Debian guest is exercised by `debian_guest.rs`.

mod common;

use std::time::Duration;

use common::*;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::guest_agent_service_client::GuestAgentServiceClient;
use tonic::Code;

/// A bound on a call to a silent agent: its sync timeout is 3 s; the bound only catches a hang.
const SILENT_AGENT_BOUND: Duration = Duration::from_secs(60);

fn agent_state(vm: &pb::Vm) -> pb::GuestAgentState {
    let agent = vm.runtime.as_ref().and_then(|r| r.guest_agent.as_ref());
    agent.map_or(pb::GuestAgentState::Unspecified, |a| pb::GuestAgentState::try_from(a.state).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_an_agent_is_reported_not_responding_and_the_daemon_stays_healthy() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let channel = qx_agent::client::channel(daemon.socket()).await.expect("connect to qx-node");
    let mut guests = GuestAgentServiceClient::new(channel);

    let info = |vm: &str| pb::GetGuestInfoRequest { vm: vm.into() };
    let err = guests.get_guest_info(info("nosuchvm")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    create(&mut client, "silent").await;
    let err = guests.get_guest_info(info("silent")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a stopped VM: {err:?}");
    assert!(err.message().contains("running"), "{}", err.message());
    assert_eq!(agent_state(&get(&mut client, "silent").await), pb::GuestAgentState::Unspecified);

    start(&mut client, "silent").await;
    let _console = boot(&mut client, "silent").await;
    assert_eq!(agent_state(&get(&mut client, "silent").await), pb::GuestAgentState::Unknown);

    let err = tokio::time::timeout(SILENT_AGENT_BOUND, guests.get_guest_info(info("silent")))
        .await
        .expect("GetGuestInfo must not hang")
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("silent") && err.message().contains("qemu-guest-agent"), "{}", err.message());

    // The daemon answered other calls meanwhile and answers now; the VM shows the agent's silence.
    let vm = get(&mut client, "silent").await;
    assert_eq!(agent_state(&vm), pb::GuestAgentState::NotResponding, "{vm:?}");
    assert_eq!(state(&vm), pb::VmState::Running);

    let exec = pb::ExecGuestRequest { vm: "silent".into(), path: "/bin/true".into(), ..Default::default() };
    let answer = tokio::time::timeout(SILENT_AGENT_BOUND, async {
        let mut stream = guests.exec_guest(exec).await?.into_inner();
        stream.message().await
    })
    .await
    .expect("ExecGuest must not hang");
    assert_eq!(answer.unwrap_err().code(), Code::DeadlineExceeded);

    let read = pb::ReadGuestFileRequest { vm: "silent".into(), path: "etc/passwd".into(), max_bytes: 0 };
    let err = guests.read_guest_file(read).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("path"), "{}", err.message());
    let password = pb::SetGuestPasswordRequest {
        vm: "silent".into(),
        user: "a:b".into(),
        password: String::new(),
        crypted: false,
    };
    let err = guests.set_guest_password(password).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("user") && err.message().contains("password"), "{}", err.message());

    client.stop_vm(pb::StopVmRequest { name: "silent".into(), force: true, timeout_seconds: 0 }).await.expect("StopVm");
}
