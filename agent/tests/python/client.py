"""A standard gRPC client of qx-node: Python grpcio stubs generated from proto/ at run time, with no workaround
(no :authority override). Creates, starts, watches and stops a VM, then checks that an error keeps its code.

usage: client.py PROTO_DIR TARGET SPEC_FILE VM [CA CERT KEY]
TARGET is a grpcio target: `unix:/path/node.sock`, or `localhost:PORT` with the three TLS files (mutual TLS).
Prints `OK` last when every step passed; exits non-zero with the reason otherwise.
"""

import os
import queue
import subprocess
import sys
import tempfile
import threading

import grpc


def stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="qx-pystubs-")
    # Every file of the package: node.proto imports its siblings (guest.proto, ...).
    package = os.path.join(proto_dir, "quantix/node/v1")
    protos = sorted(os.path.join(package, f) for f in os.listdir(package) if f.endswith(".proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir, f"--python_out={out}", f"--grpc_python_out={out}"]
        + protos,
        check=True,
    )
    sys.path.insert(0, out)
    from quantix.node.v1 import node_pb2, node_pb2_grpc

    return node_pb2, node_pb2_grpc


def main():
    proto_dir, target, spec_file, vm = sys.argv[1:5]
    pb, rpc = stubs(proto_dir)
    if len(sys.argv) > 5:
        ca, cert, key = (open(path, "rb").read() for path in sys.argv[5:8])
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    node = rpc.NodeServiceStub(channel)
    print("grpcio", grpc.__version__, "node", node.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=30).node_name)

    events = queue.Queue()
    watch = node.WatchEvents(pb.WatchEventsRequest(vm=vm))

    def pump():
        try:
            for event in watch:
                events.put(event)
        except grpc.RpcError as error:
            events.put(error)

    threading.Thread(target=pump, daemon=True).start()

    created = node.CreateVm(pb.CreateVmRequest(spec_text=open(spec_file).read()), timeout=60)
    assert created.state == pb.VM_STATE_STOPPED, created
    started = node.StartVm(pb.StartVmRequest(name=vm), timeout=120)
    assert started.state == pb.VM_STATE_RUNNING, started

    def expect(state):
        while True:
            event = events.get(timeout=60)
            if isinstance(event, grpc.RpcError):
                raise AssertionError(f"event stream failed: {event}")
            print("event", pb.VmState.Name(event.previous), "->", pb.VmState.Name(event.state), event.reason)
            if event.state == state:
                return event

    expect(pb.VM_STATE_RUNNING)
    stopped = node.StopVm(pb.StopVmRequest(name=vm, force=True), timeout=60)
    assert stopped.state == pb.VM_STATE_STOPPED, stopped
    expect(pb.VM_STATE_STOPPED)
    assert node.GetVm(pb.VmRef(name=vm), timeout=30).state == pb.VM_STATE_STOPPED
    watch.cancel()

    try:
        node.GetVm(pb.VmRef(name="no-such-vm"), timeout=30)
        raise AssertionError("GetVm of a missing VM succeeded")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        print("missing VM:", error.code().name, error.details())
    node.DeleteVm(pb.VmRef(name=vm), timeout=60)
    print("OK")


if __name__ == "__main__":
    main()
