#!/usr/bin/env bash
# An object store at the far end of a slow link, for benchmarks of
# restores from a store: two network namespaces this script creates, joined
# by a veth pair with MTU 1500 whose bandwidth `tc tbf` limits in each
# direction, and a delaying proxy (ci/delay-proxy.py) in front of the
# store that adds the round-trip time (this kernel has no netem).
#
#   thaw-store   the store (ci/s3-server.sh; THAW_S3_SERVER picks SeaweedFS
#                or Garage) on its 127.0.0.1, and the proxy
#                on 10.79.0.2:8333
#   thaw-client  10.79.0.1: run thaw (and QEMU) here, with the environment
#                of `env`: ip netns exec thaw-client thaw restore s3://...
#
#   ci/store-link.sh up PROFILE   create (or reshape) the link and start the store
#   ci/store-link.sh env          the environment that points thaw at the store
#   ci/store-link.sh describe PROFILE   its round trip (ms) and rate (bytes/s)
#   ci/store-link.sh down         stop the store (keeping its data) and remove the namespaces
#
# THAW_LINK_NAME (default thaw) names the namespaces ($THAW_LINK_NAME-store,
# $THAW_LINK_NAME-client), so that a test's link and a benchmark's do not meet.
# PROFILE: RTT_MS/RATE, RATE in tc's units (1gbit, 100mbit, 256mbit = 32 MB/s),
# e.g. 1/1gbit, 10/100mbit, 30/256mbit; or one of the names lan, wan, far
# (those three). The store keeps its data in THAW_S3_DIR (default
# /var/lib/$THAW_LINK_NAME-s3-link), apart from ci/s3-server.sh's default one.
# Idempotent; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
name=${THAW_LINK_NAME:-thaw}
store_ns=$name-store
client_ns=$name-client
store_addr=10.79.0.2
client_addr=10.79.0.1
port=8333
export THAW_S3_DIR=${THAW_S3_DIR:-/var/lib/$name-s3-link}
export THAW_S3_PORT=18334
proxy_pid=$THAW_S3_DIR/proxy.pid

[ "$(id -u)" = 0 ] || { echo "ci/store-link.sh: run as root" >&2; exit 1; }

exec 9>"/run/lock/$name-store-link.lock"
flock 9

profile() {
  case $1 in
  lan) echo "1 1gbit" ;;
  wan) echo "10 100mbit" ;;
  far) echo "30 256mbit" ;;
  */*) echo "${1%%/*} ${1#*/}" ;;
  *)
    echo "ci/store-link.sh: profile $1: use RTT_MS/RATE or lan, wan, far" >&2
    exit 2
    ;;
  esac
}

namespace() {
  if [ -e "/run/netns/$1" ] && ! mountpoint -q "/run/netns/$1"; then
    rm -f "/run/netns/$1"
  fi
  [ -e "/run/netns/$1" ] || ip netns add "$1"
  ip netns exec "$1" ip link set lo up
}

# shape NS DEV RATE RTT_MS: the egress of DEV limited to RATE. The bucket
# holds 10 ms of the rate (at least 64 KiB: a segment offloaded whole); the
# FIFO behind it holds the link's round trip of data (at least 20 ms), the
# buffer a path's bottleneck usually has. (This kernel has no fq_codel. A
# buffer of a few ms drops the small replies of faults behind the fill's
# bulk data, and their TCP retransmission timeouts stall a guest for
# seconds: a loss-bound link, not a slow one.)
shape() {
  local bits queue
  bits=$(tc_bits "$3")
  local burst=$((bits / 8 / 100))
  [ "$burst" -ge 65536 ] || burst=65536
  queue=$4
  [ "$queue" -ge 20 ] || queue=20
  ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$3" burst "$burst" latency "${queue}ms"
}

# tc_bits RATE: bits per second of a rate in tc's units kbit/mbit/gbit.
tc_bits() {
  case $1 in
  *gbit) echo $((${1%gbit} * 1000000000)) ;;
  *mbit) echo $((${1%mbit} * 1000000)) ;;
  *kbit) echo $((${1%kbit} * 1000)) ;;
  *) echo "ci/store-link.sh: rate $1: use kbit, mbit or gbit" >&2; exit 2 ;;
  esac
}

stop_proxy() {
  if [ -f "$proxy_pid" ] && kill -0 "$(cat "$proxy_pid")" 2>/dev/null; then
    kill "$(cat "$proxy_pid")"
  fi
  rm -f "$proxy_pid"
}

case $cmd in
up)
  read -r rtt rate < <(profile "${2:-wan}")
  bash ci/s3-server.sh install
  namespace "$store_ns"
  namespace "$client_ns"
  if ! ip netns exec "$store_ns" ip link show s3link0 >/dev/null 2>&1; then
    ip link add s3link0 netns "$store_ns" type veth peer name s3link1 netns "$client_ns"
  fi
  ip netns exec "$store_ns" ip addr replace "$store_addr/24" dev s3link0
  ip netns exec "$client_ns" ip addr replace "$client_addr/24" dev s3link1
  for end in "$store_ns s3link0" "$client_ns s3link1"; do
    read -r ns dev <<<"$end"
    ip netns exec "$ns" ip link set "$dev" mtu 1500 up
    shape "$ns" "$dev" "$rate" "$rtt"
  done
  # The daemons started here must not hold this script's lock.
  ip netns exec "$store_ns" bash ci/s3-server.sh up >&2 9>&-
  # The store stands for one on other machines at the far end of the
  # link; here it shares the host's cores with QEMU and thaw, so it and
  # its proxy run at nice 19 (every thread): they take little CPU time
  # from those. (Under SCHED_IDLE they took none, and starved whenever
  # a guest and its client kept both cores busy: a redis restore at
  # 32 MB/s then filled at 2 MiB/s. At nice 19 the store still holds
  # the vCPU off its core a fifth of the time while it serves 100 MiB/s.)
  renice -n 19 -g "$(ps -o pgid= -p "$(bash ci/s3-server.sh pid)" | tr -d ' ')" >/dev/null
  stop_proxy
  # Half the round trip each way.
  one_way=$(awk -v r="$rtt" 'BEGIN { printf "%.3f", r / 2 }')
  ip netns exec "$store_ns" setsid nice -n 19 python3 ci/delay-proxy.py "$store_addr:$port" \
    "127.0.0.1:$THAW_S3_PORT" "$one_way" >"$THAW_S3_DIR/proxy.log" 2>&1 </dev/null 9>&- &
  echo $! >"$proxy_pid"
  # Ready when a connection through the link is accepted.
  for _ in $(seq 100); do
    if ip netns exec "$client_ns" bash -c "exec 3<>/dev/tcp/$store_addr/$port" 2>/dev/null; then
      echo "store link: ${rtt} ms round trip, $rate each way, store at http://$store_addr:$port (client namespace $client_ns)" >&2
      exit 0
    fi
    sleep 0.1
  done
  echo "ci/store-link.sh: the proxy did not start; see $THAW_S3_DIR/proxy.log" >&2
  exit 1
  ;;
describe)
  read -r rtt rate < <(profile "${2:-wan}")
  echo "$rtt $(($(tc_bits "$rate") / 8))"
  ;;
env)
  bash ci/s3-server.sh env | sed "s|http://127.0.0.1:$THAW_S3_PORT|http://$store_addr:$port|"
  ;;
down)
  stop_proxy
  if [ -e "/run/netns/$store_ns" ]; then
    # Whichever store `up` started.
    for server in seaweedfs garage; do
      THAW_S3_SERVER=$server ip netns exec "$store_ns" bash ci/s3-server.sh stop >&2 || true
    done
  fi
  for ns in "$store_ns" "$client_ns"; do
    [ -e "/run/netns/$ns" ] && ip netns delete "$ns"
  done
  true
  ;;
*)
  echo "usage: ci/store-link.sh up PROFILE | env | down" >&2
  exit 2
  ;;
esac
