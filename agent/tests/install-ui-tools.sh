#!/usr/bin/env bash
# Installs the Debian packages the Host UI and metrics tests use, when missing: promtool (Debian's `prometheus`
# package; installing it starts no Prometheus where policy-rc.d forbids it, and the tests never need the server)
# and headless Chromium (the browser test drives Debian's build; no browser is downloaded). Needs root when it
# installs.
set -euo pipefail

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0

echo "install-ui-tools: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >&2
