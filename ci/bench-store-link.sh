#!/usr/bin/env bash
# Restores from an object store at the far end of a slow link (numbers, not
# a test): `thaw bench --store` in the client namespace of ci/store-link.sh,
# per link profile. The guest is the throughput workload with 1 GiB of RAM,
# 512 MiB of it filled and 32 MiB hot. Side by side, from the same store and
# each from an empty local cache:
#   stock       download QEMU's migration stream, then migrate-incoming
#   lazy        thaw restore s3://… --mode lazy
#   ws:trace    thaw restore s3://… --mode ws with the set traced after the save
#   ws:learned  the same with the set a first restore learned
# Reported: time to running, TTR, all RAM resident, MiB and requests sent to
# the store, fault p50 against the round trip, the fill against the link
# rate, and TTR against the floor of a restore from that link.
#
# The working sets are recorded with windows that end after 5 s without a
# new page (at most 30 s; RECORD_QUIET_MS, RECORD_MAX_MS), not thaw's
# default 1 s: a restore from across the link takes up to 25 s to fill,
# and what the guest touches in that time but outside the set comes by
# faults, one round trip each. The guest walks a few pages every few
# seconds (4, 8 and 10 s after it resumes), which a 1 s window closes
# before.
#
# With LEARN_FROM_STORE=1 the learning restore before ws:learned is a first
# host's: it restores the image as pushed from the store, across the link,
# learns, and publishes its learned set there (`--learn-from-store`); the
# measured ws:learned restores prefetch the published set. Its runs write to
# store-link-<profile>[...]-published/.
#
# With APP=redis (or memcached) the guest is that real application from
# Debian (configs/apps/APP.yaml), measured by its own client: the guest's
# NIC is tap0 in the client namespace (ci/app-net.sh), where the client
# runs beside QEMU; APP_DATA/APP_HOT size its data (default: the bench's).
#
# Usage (root): ci/bench-store-link.sh [PROFILE...]   (default: lan wan far;
#               see ci/store-link.sh)
# Environment: RUNS (default 2), METHODS (default stock,lazy,ws:trace,ws:learned),
#              APP, APP_DATA, APP_HOT, THAW_S3_SERVER (seaweedfs or garage;
#              see ci/s3-server.sh), RECORD_QUIET_MS, RECORD_MAX_MS, LEARN_FROM_STORE.
# Output: target/bench/store-link-<profile>[-<app>][-garage][-published]/{bench.json,bench.md,throughput.svg}
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-2}
methods=${METHODS:-stock,lazy,ws:trace,ws:learned}
# shellcheck source=ci/bench-common.sh
. ci/bench-common.sh
profiles=("$@")
[ ${#profiles[@]} -gt 0 ] || profiles=(lan wan far)

app=${APP:-}
guest=()
if [ -n "$app" ]; then
  bash tests/guest/build-app.sh "$app" >/dev/null
  config=configs/apps/$app.yaml
  guest=(--app "$app")
  [ -z "${APP_DATA:-}" ] || guest+=(--app-data "$APP_DATA")
  [ -z "${APP_HOT:-}" ] || guest+=(--app-hot "$APP_HOT")
else
  config=$out/configs/store-link-1g.yaml
  mkdir -p "$out/configs"
  sed -e "s|^memory: .*|memory: 1G|" -e "s|thaw.mem=[^ ]*|thaw.mem=512M|" \
    -e "s|thaw.hot=[^ ]*|thaw.hot=32M|" -e "s|\.\./target/|$PWD/target/|g" \
    configs/bench-tput-2g.yaml >"$config"
fi

trap 'bash ci/store-link.sh down' EXIT
for p in "${profiles[@]}"; do
  bash ci/store-link.sh up "$p"
  # The application guest's NIC: tap0 beside the client, in its namespace.
  [ -z "$app" ] || bash ci/app-net.sh up thaw-client >&2
  read -r rtt rate < <(bash ci/store-link.sh describe "$p")
  server=${THAW_S3_SERVER:-seaweedfs}
  dest=$out/store-link-${p//\//-}${app:+-$app}
  [ "$server" = seaweedfs ] || dest=$dest-$server
  learn=()
  if [ "${LEARN_FROM_STORE:-0}" = 1 ]; then
    learn=(--learn-from-store)
    dest=$dest-published
  fi
  mkdir -p "$dest"
  echo "== $dest" >&2
  # The bench's VM and its client run in the client namespace: every byte
  # of the image crosses the shaped link.
  (
    eval "$(bash ci/store-link.sh env)"
    ip netns exec thaw-client "$thaw" bench --config "$config" "${guest[@]}" --runs "$runs" \
      --methods "$methods" --store "s3://$THAW_S3_BUCKET/bench-link" \
      --link-rtt-ms "$rtt" --link-rate "$rate" --no-limits --dir /var/lib/thaw/bench-link \
      --record-quiet-ms "${RECORD_QUIET_MS:-5000}" --record-max-ms "${RECORD_MAX_MS:-30000}" \
      "${learn[@]}" --out "$dest" 2>"$dest/stderr.log" | tee "$dest/stdout.md"
  )
done
