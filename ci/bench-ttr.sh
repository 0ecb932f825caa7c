#!/usr/bin/env bash
# Time-to-responsiveness benchmarks of BENCHMARKS.md (numbers, not a test):
# `thaw bench` on the throughput guest (configs/bench-tput-2g.yaml and
# variants of it generated here), RUNS restores per method, cold cache.
#
# Usage (root): ci/bench-ttr.sh [SCENARIO...]     (default: all of them)
#   main      2 GiB guest, local disk, every method
#   paced     the same, thaw's background fill paced (FILL_LIMIT)
#   32m       the same guest, storage limited to 32 MB/s
#   7m        a 1 GiB guest (768 MiB filled), storage limited to 7 MB/s: stock vs ws
#   ram       RAM 1, 2, 4, 8 GiB (3/4 filled), 64 MiB hot set: stock vs ws
#   hot       2 GiB RAM, hot set 16, 64, 256, 512 MiB: stock vs ws
#   patterns  2 GiB, skewed and phase-change access patterns
#   libvirt   the main guest as a libvirt domain: virsh, virsh-sparse and thaw
#             (needs ci/setup-libvirt.sh; not part of the default set)
#   redis     a real redis (configs/apps/redis.yaml, 1 GiB of values, 20 MiB
#             hot) measured by redis-benchmark from the host, at local disk,
#             100 MB/s and 32 MB/s, and from a hot page cache side by side
#             with local disk (not part of the default set)
#   memcached the same with memcached (configs/apps/memcached.yaml; 256 MiB
#             of values, 2 MiB hot), measured by memccat of the hot keys
#             (not part of the default set)
# Environment: RUNS (default 3), FILL_LIMIT for paced/ram/hot/patterns (default 128M).
# Output: target/bench/ttr-<scenario>[-<variant>]/{bench.json,bench.md,throughput.svg}
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
pace=${FILL_LIMIT:-128M}
# shellcheck source=ci/bench-common.sh
. ci/bench-common.sh
configs=$out/configs
mkdir -p "$configs"

# variant NAME MEMORY FILL HOT [PATTERN]: a copy of the 2 GiB config with
# other sizes (absolute guest kit paths, its own console log).
variant() {
  local name=$1 memory=$2 fill=$3 hot=$4 pattern=${5:-uniform}
  sed -e "s|^memory: .*|memory: $memory|" \
    -e "s|thaw.mem=[^ ]*|thaw.mem=$fill|" \
    -e "s|thaw.hot=[^ ]*|thaw.hot=$hot|" \
    -e "s|thaw.pattern=[^ \"]*|thaw.pattern=$pattern thaw.phase_ms=2000|" \
    -e "s|\.\./target/|$PWD/target/|g" \
    configs/bench-tput-2g.yaml >"$configs/$name.yaml"
  echo "$configs/$name.yaml"
}

# bench OUT CONFIG [thaw bench options...]
bench() {
  local dest=$out/ttr-$1 config=$2
  shift 2
  echo "== $dest" >&2
  mkdir -p "$dest"
  # shellcheck disable=SC2086 # $thaw may carry a prefix (ip netns exec NS)
  $thaw bench --config "$config" --runs "$runs" --out "$dest" "$@" 2>"$dest/stderr.log" |
    tee "$dest/stdout.md"
}

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(main paced 32m 7m ram hot patterns)
for s in "${scenarios[@]}"; do
  case $s in
  main) bench main configs/bench-tput-2g.yaml ;;
  libvirt)
    bash ci/setup-libvirt.sh >&2
    bench libvirt configs/bench-tput-2g.yaml --libvirt
    ;;
  redis | memcached)
    app=$s
    bash ci/app-net.sh up >&2
    bash tests/guest/build-app.sh "$app" >/dev/null
    apps="stock,eager,lazy,ws:trace,ws:learned,ws:auto,lazy:learn"
    # memcached's tools make one request at a time: a smaller data set and
    # hot set (1 GiB takes memccp about 9 minutes on a TCG guest).
    sizes=()
    if [ "$app" = memcached ]; then sizes=(--app-data 256M --app-hot 2M); fi
    # The guest's NIC is tap0 in the namespace: QEMU and the client run there.
    in_ns="ip netns exec thaw-app $PWD/target/release/thaw"
    # On local disk the same image is also restored from a hot page cache
    # (<method>@hot), side by side: the floor of a local-disk restore.
    hot="eager@hot,ws:trace@hot,ws:learned@hot,ws:auto@hot"
    for limit in disk 100M 32M; do
      limits=()
      methods=$apps
      if [ "$limit" = disk ]; then methods="$apps,$hot"; else limits=(--read-limit "$limit"); fi
      thaw=$in_ns bench "$app-$limit" "configs/apps/$app.yaml" --app "$app" "${sizes[@]}" \
        --methods "$methods" --dir /var/lib/thaw/bench-app "${limits[@]}"
    done
    ;;
  paced)
    bench paced configs/bench-tput-2g.yaml --methods stock,eager,lazy,ws:learned,ws:trace \
      --fill-limit "$pace" --no-limits
    ;;
  32m)
    bench 32m configs/bench-tput-2g.yaml --methods stock,mapped-ram,lazy,ws:learned,ws:trace \
      --read-limit 32M --no-limits
    ;;
  7m)
    bench 7m "$(variant tput-1g 1G 768M 64M)" --methods stock,ws:learned \
      --read-limit 7M --no-limits
    ;;
  ram)
    for gib in 1 2 4 8; do
      bench "ram-${gib}g" "$(variant "ram-${gib}g" "${gib}G" "$((gib * 768))M" 64M)" \
        --methods stock,ws:learned --fill-limit "$pace" --no-limits
    done
    ;;
  hot)
    for hot in 16 64 256 512; do
      bench "hot-${hot}m" "$(variant "hot-${hot}m" 2G 1536M "${hot}M")" \
        --methods stock,ws:learned --fill-limit "$pace" --no-limits
    done
    ;;
  patterns)
    for p in skewed phase; do
      bench "pattern-$p" "$(variant "pattern-$p" 2G 1536M 64M "$p")" \
        --methods stock,lazy,ws:learned,ws:trace --fill-limit "$pace" --no-limits
    done
    ;;
  *)
    echo "$0: unknown scenario $s (main, paced, 32m, 7m, ram, hot, patterns, libvirt, redis, memcached)" >&2
    exit 2
    ;;
  esac
done
