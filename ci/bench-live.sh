#!/usr/bin/env bash
# The live-checkpoint benchmarks of BENCHMARKS.md ("Live checkpoints").
#
#   ci/bench-live.sh [sizes|incremental|speculate]...     (default: all)
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
# speculate:   speculative pre-copy against plain copy-on-write, side by
#              side on configs/live-hot-writers.yaml (two guest threads
#              rewriting 2048 pages as fast as they can): $THAW_ROUNDS
#              (default 3) rounds of two series of 6 checkpoints a second
#              apart (`thaw checkpoint --interval-ms 1000`), one with
#              --speculate-pages 0 and one with the default, where each
#              checkpoint predicts from the one before; then the same
#              number of single saves predicted by a `thaw track
#              --estimator dirty` that ran for 3 s before, against saves
#              after the same tracking with --speculate-pages 0. Pause and
#              write faults per checkpoint (the first of a series, which
#              has nothing to predict from, apart):
#              target/bench/live-speculate/speculate.{json,md}
# Run from the repository root as root.
set -euo pipefail
. ci/bench-common.sh

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(sizes incremental speculate)

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

speculate() {
  local name=live-hot-writers dir=/var/lib/thaw/live-hot-writers res=$out/live-speculate
  local rounds=${THAW_ROUNDS:-3}
  mkdir -p "$dir" "$res"
  rm -f "$res"/*.json
  "$thaw" stop $name >/dev/null 2>&1 || true
  : >"$dir/console.log"
  "$thaw" start --config configs/live-hot-writers.yaml >/dev/null
  local waited=0
  until grep -q "THAW-COW-TICK 4 " "$dir/console.log"; do
    sleep 1
    waited=$((waited + 1))
    [ $waited -lt 600 ] || { echo "bench-live.sh: the guest never got ready" >&2; exit 1; }
  done
  for r in $(seq 1 "$rounds"); do
    for mode in plain speculative; do
      local spec=()
      [ $mode = speculative ] || spec=(--speculate-pages 0)
      rm -rf "$dir/series"
      # The series' first checkpoint has nothing to predict from.
      rm -f "${THAW_RUNTIME_DIR:-/run/thaw}/$name/estimate-dirty.bin"
      "$thaw" --json checkpoint $name "$dir/series" --interval-ms 1000 --count 6 --keep 6 \
        "${spec[@]}" >"$res/series-$mode-$r.json"
      "$thaw" track $name --estimator dirty --interval-ms 500 --keep 2 --duration-ms 60000 \
        >/dev/null &
      sleep 3
      # The save stops the tracker and keeps its estimate.
      "$thaw" --json save $name "$dir/single" --keep-running --force "${spec[@]}" \
        >"$res/tracked-$mode-$r.json"
      wait
    done
  done
  rm -rf "$dir/series" "$dir/single"
  "$thaw" stop $name >/dev/null
  python3 - "$res" "$rounds" <<'PY' | tee "$res/speculate.md"
import json, statistics, sys
res, rounds = sys.argv[1], int(sys.argv[2])
med = lambda xs: statistics.median(xs) if xs else 0.0
out, rows = {}, []
for mode in ("plain", "speculative"):
    series = [json.load(open(f"{res}/series-{mode}-{r}.json")) for r in range(1, rounds + 1)]
    first = [e for s in series for e in s["taken"] if e["n"] == 1]
    later = [e for s in series for e in s["taken"] if e["n"] > 1]
    tracked = [json.load(open(f"{res}/tracked-{mode}-{r}.json")) for r in range(1, rounds + 1)]
    out[mode] = dict(
        series_later=dict(n=len(later), paused_ms=med([e["paused_ms"] for e in later]),
                          wp_faults=med([e["wp_faults"] for e in later]),
                          speculated=med([e["speculated_pages"] for e in later])),
        series_first=dict(n=len(first), paused_ms=med([e["paused_ms"] for e in first]),
                          wp_faults=med([e["wp_faults"] for e in first]),
                          speculated=med([e["speculated_pages"] for e in first])),
        tracked=dict(n=len(tracked), paused_ms=med([t["paused_ms"] for t in tracked]),
                     wp_faults=med([t["live"]["wp_faults"] for t in tracked]),
                     speculated=med([t["live"]["speculated_pages"] for t in tracked]),
                     protect_ms=med([t["live"]["protect_ms"] for t in tracked])))
print("| prediction | method | checkpoints | pause ms (median) | write faults (median) | pages copied in the pause |")
print("|---|---|---:|---:|---:|---:|")
for key, label in (("series_later", "previous checkpoint (series, 2nd to 6th)"),
                   ("tracked", "dirty estimate (track, then save)"),
                   ("series_first", "none (first of a series)")):
    for mode in ("plain", "speculative"):
        m = out[mode][key]
        print(f"| {label} | {mode} | {m['n']} | {m['paused_ms']:.1f} | {m['wp_faults']:.0f} | {m['speculated']:.0f} |")
for key in ("series_later", "tracked"):
    p, s = out["plain"][key]["wp_faults"], out["speculative"][key]["wp_faults"]
    if p:
        print(f"{key}: write faults cut by {100 * (1 - s / p):.0f} %")
json.dump(out, open(f"{res}/speculate.json", "w"), indent=1)
PY
}

for s in "${scenarios[@]}"; do
  case $s in
    sizes) sizes ;;
    incremental) incremental ;;
    speculate) speculate ;;
    *) echo "bench-live.sh: unknown scenario $s (sizes, incremental, speculate)" >&2; exit 1 ;;
  esac
done
