#!/usr/bin/env bash
# Installs what the standard-client tests (agent/tests/python_client.rs) use: Python grpcio and grpcio-tools (to
# generate stubs from proto/) in a virtualenv at ~/.cache/quantix/python-grpc (QX_PYTHON_VENV overrides). grpcio
# must be 1.57 or newer: those versions send the %-encoded socket path as :authority, which is what the tests
# prove the node accepts. Debian 12's python3-grpcio is 1.51, hence PyPI. Does nothing when the venv is there.
set -euo pipefail

venv=${QX_PYTHON_VENV:-$HOME/.cache/quantix/python-grpc}
grpcio=1.76.0
if [ -x "$venv/bin/python3" ] && "$venv/bin/python3" -c "import grpc, grpc_tools; assert grpc.__version__ == '$grpcio'" 2>/dev/null; then
    echo "$venv"
    exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    echo "installing: python3-venv" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >&2
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$venv/bin/python3" -m pip install -q --disable-pip-version-check "grpcio==$grpcio" "grpcio-tools==$grpcio" >&2
echo "$venv"
