#!/bin/bash
# Loads overlay/usr/share/quantix/firewall.nft into a private network namespace (the "host"), opens the ports of a
# node.yaml as /etc/init.d/firewall does (overlay/usr/libexec/quantix/firewall-ports with a real qx-node
# --firewall-ports) and probes it from a second namespace over a veth pair with real sockets: exactly the
# configured ports answer (listen.tcp, ui.listen, Geneve with OVN; QX_NODE_ARGS' --listen-tcp counts), SSH only
# between ssh-on and ssh-off, others are silently dropped; replies to the host's own connections come back, ping
# works. Needs root, nft, python3 and qx-node (QX_NODE, else built with cargo). Cleans up what it made.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rules="$here/../overlay/usr/share/quantix/firewall.nft"
ports_helper="$here/../overlay/usr/libexec/quantix/firewall-ports"
if [[ -z ${QX_NODE:-} ]]; then
    (cd "$here/.." && cargo build -q -p qx-agent --bin qx-node)
    QX_NODE=$here/../target/debug/qx-node
fi
h=qxfw-host-$$ c=qxfw-client-$$
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$h" 2>/dev/null || true
    ip netns del "$c" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
ip netns add "$h"; ip netns add "$c"
ip link add qxfwh$$ netns "$h" type veth peer name qxfwc$$ netns "$c"
ip -n "$h" addr add 10.99.0.1/24 dev qxfwh$$; ip -n "$h" link set qxfwh$$ up; ip -n "$h" link set lo up
ip -n "$c" addr add 10.99.0.2/24 dev qxfwc$$; ip -n "$c" link set qxfwc$$ up; ip -n "$c" link set lo up
ip netns exec "$h" nft -f "$rules"
ip netns exec "$h" nft -f "$rules"   # loading twice replaces, never duplicates
# What /etc/init.d/firewall runs: the ports of the node's config (path and extra arguments from conf.d).
ports() { # yaml qx_node_args
    printf '%s' "$1" >"$tmp/node.yaml"
    printf 'QX_NODE_CONFIG=%s\nQX_NODE_ARGS="%s"\n' "$tmp/node.yaml" "$2" >"$tmp/conf"
    ip netns exec "$h" env QX_NODE="$QX_NODE" QX_NODE_CONF="$tmp/conf" sh "$ports_helper" node
}

listen() { # proto port: a listener in the host namespace
    ip netns exec "$h" python3 -c '
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
if proto == "tcp":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()
else:
    s = socket.socket(type=socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(100); s.sendto(b"ok", a)
' "$1" "$2" &
    pids+=($!)
}
probe() { # ns addr proto port -> prints open/closed
    ip netns exec "$1" python3 -c '
import socket, sys
addr, proto, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if proto == "tcp":
        s = socket.create_connection((addr, port), timeout=1); r = s.recv(2)
    else:
        s = socket.socket(type=socket.SOCK_DGRAM); s.settimeout(1); s.sendto(b"hi", (addr, port)); r = s.recv(2)
    print("open" if r == b"ok" else "closed")
except OSError:
    print("closed")
' "$2" "$3" "$4"
}
for spec in tcp:7443 tcp:8443 tcp:9443 tcp:5900 tcp:22 tcp:8080 udp:6081 udp:53 udp:6082; do
    listen "${spec%%:*}" "${spec##*:}"
done
sleep 1
fail=0
expect() { # proto port want
    got=$(probe "$c" 10.99.0.1 "$1" "$2")
    if [[ $got == "$3" ]]; then echo "ok   $1/$2 $got"; else echo "FAIL $1/$2 is $got, want $3"; fail=1; fi
}
echo "-- the ruleset alone: nothing open"
expect tcp 7443 closed; expect tcp 22 closed; expect udp 6081 closed
echo "-- listen.tcp 7443, ui.listen 8443, OVN: those and Geneve; SSH off"
ports $'listen:\n  tcp: 0.0.0.0:7443\nui:\n  listen: 0.0.0.0:8443\novn:\n  northbound: tcp:10.99.0.9:6641\n' ""
expect tcp 7443 open; expect tcp 8443 open; expect udp 6081 open
expect tcp 22 closed; expect tcp 9443 closed; expect tcp 5900 closed; expect tcp 8080 closed
expect udp 53 closed; expect udp 6082 closed
echo "-- SSH on, then off again"
ip netns exec "$h" sh "$ports_helper" ssh-on
ip netns exec "$h" sh "$ports_helper" ssh-on   # twice is once
expect tcp 22 open
ip netns exec "$h" sh "$ports_helper" ssh-off
expect tcp 22 closed
echo "-- another config: --listen-tcp 9443 in QX_NODE_ARGS, no UI, no OVN; the old ports close"
ports "" "--listen-tcp 0.0.0.0:9443"
expect tcp 9443 open; expect tcp 7443 closed; expect tcp 8443 closed; expect udp 6081 closed
echo "-- a config qx-node refuses opens nothing new and fails"
if ports $'listen:\n  tcp: nonsense\n' "" 2>/dev/null; then echo "FAIL a bad config was accepted"; fail=1; else echo "ok   bad config refused"; fi
expect tcp 9443 open
# Without the table there is nothing to fill.
ip netns exec "$c" sh "$ports_helper" ssh-on && echo "ok   no table, nothing to do" || { echo "FAIL no table"; fail=1; }
# Loopback inside the host is not filtered.
got=$(probe "$h" 127.0.0.1 tcp 8080); [[ $got == open ]] && echo "ok   loopback tcp/8080 open" || { echo "FAIL loopback"; fail=1; }
# Replies to the host's own outbound connections come back (established/related).
ip netns exec "$c" python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 9000)); s.listen()
while True:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
' & pids+=($!)
sleep 0.5
got=$(probe "$h" 10.99.0.2 tcp 9000); [[ $got == open ]] && echo "ok   outbound reply open" || { echo "FAIL outbound reply"; fail=1; }
ip netns exec "$c" ping -c1 -W1 10.99.0.1 >/dev/null && echo "ok   ping" || { echo "FAIL ping"; fail=1; }
exit $fail
