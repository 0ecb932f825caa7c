#!/usr/bin/env bash
# The live-checkpoint benchmarks of BENCHMARKS.md ("Live checkpoints").
#
#   ci/bench-live.sh [sizes|incremental]...     (default: both)
#
# sizes:       thaw bench-checkpoint, live against stop-and-copy at 1, 2, 4
#              and 8 GiB of RAM (configs/bench-tput-2g.yaml), 3 runs each:
#              target/bench/live-sizes/checkpoint.{json,md}
# incremental: configs/live-writers.yaml (two guest threads dirtying about
#              4000 pages a second): a full live checkpoint, then
#              $THAW_INCREMENTS (default 5) incremental ones, one every
#              second or so ($THAW_INCREMENT_SLEEP seconds between them,
#              default 1; 0: back to back) with `thaw save --keep-running
#              --parent`, each against the one before; per increment the time between the two instants,
#              the pages written and inherited, and the pages the guest's
#              writers wrote in that time (their own counters):
#              target/bench/live-incremental/increments.json
# Run from the repository root as root.
set -euo pipefail
. ci/bench-common.sh

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(sizes incremental)

sizes() {
  "$thaw" bench-checkpoint -c configs/bench-tput-2g.yaml --sizes 1G,2G,4G,8G \
    --runs 3 --out "$out/live-sizes"
}

incremental() {
  local dir=/var/lib/thaw/live-writers res=$out/live-incremental
  local n=${THAW_INCREMENTS:-5}
  mkdir -p "$dir" "$res"
  "$thaw" stop live-writers >/dev/null 2>&1 || true
  : >"$dir/console.log"
  "$thaw" start --config configs/live-writers.yaml >/dev/null
  local waited=0
  until grep -q "THAW-COW-TICK 4 " "$dir/console.log"; do
    sleep 1
    waited=$((waited + 1))
    [ $waited -lt 600 ] || { echo "bench-live.sh: the guest never got ready" >&2; exit 1; }
  done
  rm -rf "$dir"/inc-*
  "$thaw" --json save live-writers "$dir/inc-0" --keep-running >"$res/inc-0.json"
  for i in $(seq 1 "$n"); do
    sleep "${THAW_INCREMENT_SLEEP:-1}"
    "$thaw" --json save live-writers "$dir/inc-$i" --keep-running \
      --parent "$dir/inc-$((i - 1))" >"$res/inc-$i.json"
  done
  cp "$dir/console.log" "$res/console.log"
  "$thaw" stop live-writers >/dev/null
  python3 - "$res" "$n" <<'PY'
import json, re, sys
res, n = sys.argv[1], int(sys.argv[2])
# The writers' counter over the guest's 500 ms ticks: their rate.
ticks = [int(m.group(1)) for m in re.finditer(r"THAW-COW-TICK \d+ \S+ writes=(\d+)", open(f"{res}/console.log").read())]
rate = (ticks[-1] - ticks[4]) / ((len(ticks) - 5) * 0.5) if len(ticks) > 6 else 0.0
runs = [json.load(open(f"{res}/inc-{i}.json")) for i in range(n + 1)]
rows = []
print(f"writers: {rate:.0f} pages/s (2 x 16384 pages)")
print("| increment | interval ms | pause ms | pages written | inherited | writer pages in the interval | image MiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for i in range(1, n + 1):
    a, b = runs[i - 1], runs[i]
    interval = b["paused_at_unix_ms"] - a["paused_at_unix_ms"]
    dirtied = min(rate * interval / 1000, 32768)
    rows.append(dict(increment=i, interval_ms=interval, paused_ms=b["paused_ms"],
                     written=b["nonzero_pages"], inherited=b["inherited_pages"],
                     writer_pages=dirtied))
    print(f"| {i} | {interval:.0f} | {b['paused_ms']:.1f} | {b['nonzero_pages']} | {b['inherited_pages']} | {dirtied:.0f} | {b['nonzero_pages'] * 4096 / 2**20:.1f} |")
print(f"full image: {runs[0]['nonzero_pages']} pages")
json.dump(dict(writer_rate=rate, full_pages=runs[0]["nonzero_pages"], increments=rows),
          open(f"{res}/increments.json", "w"), indent=1)
PY
}

for s in "${scenarios[@]}"; do
  case $s in
    sizes) sizes ;;
    incremental) incremental ;;
    *) echo "bench-live.sh: unknown scenario $s (sizes, incremental)" >&2; exit 1 ;;
  esac
done
