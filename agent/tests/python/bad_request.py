"""A standard gRPC client (Python grpcio, whose grpc-core refuses reply metadata past 8-16 KiB) sends specs that
used to produce an oversized `grpc-message`: 200 bad disks, a 1 MiB label value. Each must come back as
INVALID_ARGUMENT with a short message (not RESOURCE_EXHAUSTED) and the problems as google.rpc.BadRequest details
(the `grpc-status-details-bin` trailer).

usage: bad_request.py PROTO_DIR TARGET KERNEL
Prints `OK` last when every check passed; exits non-zero with the reason otherwise.
"""

import sys

import grpc

from client import stubs


def main():
    proto_dir, target, kernel = sys.argv[1:4]
    pb, rpc = stubs(proto_dir)
    node = rpc.NodeServiceStub(grpc.insecure_channel(target))
    boot = pb.KernelBoot(kernel=kernel)
    specs = {
        "200 disks": pb.VmSpec(
            name="many", vcpus=1, memory_mib=128, kernel_boot=boot,
            disks=[pb.Disk(path=f"/no/such/disk-{i}.raw") for i in range(200)],
        ),
        "a 1 MiB label": pb.VmSpec(name="label", vcpus=1, memory_mib=128, kernel_boot=boot, labels={"big": "v" * (1 << 20)}),
    }
    for what, spec in specs.items():
        try:
            node.CreateVm(pb.CreateVmRequest(spec=spec), timeout=60)
            raise AssertionError(f"CreateVm with {what} succeeded")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.code(), error.details())
            assert len(error.details()) <= 1024, (what, len(error.details()))
            trailers = dict(error.trailing_metadata() or ())
            assert "grpc-status-details-bin" in trailers, (what, list(trailers))
            print(what, "->", error.code().name, f"({len(error.details())} bytes):", error.details()[:120])
    assert not node.ListVms(pb.ListVmsRequest(), timeout=30).vms
    print("OK")


if __name__ == "__main__":
    main()
