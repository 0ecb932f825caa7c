#!/usr/bin/env bash
# The network of the application guests (configs/apps/, thaw bench --app):
# a network namespace with a tap device the guest's virtio NIC uses, so the
# host's client reaches the guest over a real (virtual) link, and all of
# the traffic stays inside a namespace this script creates.
#
#   ci/app-net.sh up   [NAME]   create NAME (default thaw-app) with tap0 10.77.0.1/24
#   ci/app-net.sh down [NAME]   remove it
#
# Run QEMU/thaw and the client inside it:
#   ip netns exec thaw-app thaw bench -c configs/apps/redis.yaml --app redis
# Idempotent; needs root.
set -euo pipefail

cmd=${1:-}
ns=${2:-thaw-app}
host_addr=10.77.0.1/24
tap=tap0

[ "$(id -u)" = 0 ] || { echo "ci/app-net.sh: run as root" >&2; exit 1; }
in_ns() { ip netns exec "$ns" "$@"; }

# `ip netns add` run twice at once (two tests' namespaces) races on the
# first mount of /run/netns; one lock serialises every change made here.
exec 9>/run/lock/thaw-app-net.lock
flock 9

case $cmd in
up)
  # a name left without its namespace (a crash mid-add) is removed first
  if [ -e "/run/netns/$ns" ] && ! mountpoint -q "/run/netns/$ns"; then
    rm -f "/run/netns/$ns"
  fi
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  in_ns ip link set lo up
  in_ns ip link show "$tap" >/dev/null 2>&1 || in_ns ip tuntap add dev "$tap" mode tap
  in_ns ip addr replace "$host_addr" dev "$tap"
  in_ns ip link set "$tap" up
  echo "network namespace $ns: $tap $host_addr (guest: thaw.ip=10.77.0.2/24)"
  ;;
down)
  if [ -e "/run/netns/$ns" ]; then
    ip netns delete "$ns"
  fi
  ;;
*)
  echo "usage: ci/app-net.sh up|down [NAME]" >&2
  exit 2
  ;;
esac
