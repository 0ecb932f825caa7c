#!/usr/bin/env bash
# Working-set benchmark (numbers, not a test): configs/bench-2g.yaml (2 GiB
# guest, ~1 GiB non-zero, 64 MiB hot set). One image gets every estimator:
# `thaw track` abit and dirty estimates (the guest's own per-tick work time
# is recorded meanwhile, to show what tracking costs it), then a
# `thaw checkpoint` (trace), then one lazy restore that learns (learned).
# Each method is then restored RUNS times from a cold page cache without
# learning, and a VEE-style table of medians is printed.
#
# Usage (root): [READ_LIMIT=32M] ci/bench-ws.sh [RUNS]    (default 3)
#   READ_LIMIT: restore with --read-limit (emulated networked storage).
# Output: target/bench/ws-*.json*, table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=ci/bench-common.sh
. ci/bench-common.sh
image=/var/lib/thaw/bench-2g-ws.img
console=/var/lib/thaw/bench-2g/console.log

ticks() { grep -c 'THAW-TICK ' "$console" 2>/dev/null || true; }
wait_ticks() { # wait until the console holds N tick lines
  for _ in $(seq 3000); do [ "$(ticks)" -ge "$1" ] && return 0; sleep 0.2; done
  echo "guest stopped ticking; console:" >&2; tail -5 "$console" >&2; exit 1
}
mark() { echo "$1 $(ticks)" >>"$out/ws-phases.txt"; }

"$thaw" stop bench-2g --force >/dev/null 2>&1 || true
: >"$console"
: >"$out/ws-phases.txt"
"$thaw" start --config configs/bench-2g.yaml
wait_ticks 20
mark baseline-start
wait_ticks 70
mark abit-start
"$thaw" --json track bench-2g --interval-ms 1000 --keep 3 --duration-ms 5000 >"$out/ws-track-abit.json"
mark dirty-start
"$thaw" --json track bench-2g --estimator dirty --interval-ms 1000 --keep 3 --duration-ms 5000 >"$out/ws-track-dirty.json"
mark trace-start
"$thaw" --json checkpoint bench-2g "$image" --force >"$out/ws-checkpoint.json"
mark trace-end
wait_ticks $(( $(ticks) + 20 ))
"$thaw" stop bench-2g

cold
"$thaw" --json restore "$image" --mode lazy >"$out/ws-learn.json"
"$thaw" stop bench-2g
for method in lazy none trace abit dirty learned; do
  : >"$out/ws-restore-$method.jsonl"
  for _ in $(seq "$runs"); do
    cold
    if [ "$method" = lazy ]; then
      args=(--mode lazy)
    else
      args=(--mode ws --estimator "$method")
    fi
    [ -n "${READ_LIMIT:-}" ] && args+=(--read-limit "$READ_LIMIT")
    "$thaw" --json restore "$image" "${args[@]}" --no-learn --observe | tr -d '\n' >>"$out/ws-restore-$method.jsonl"
    echo >>"$out/ws-restore-$method.jsonl"
    "$thaw" stop bench-2g
  done
done

python3 - "$out" "$console" <<'PY'
import json, re, statistics, sys
out, console = sys.argv[1], sys.argv[2]
med = lambda rows, k: statistics.median(r[k] for r in rows)
print(f"{'method':<8} {'ws pages':>9} {'prefetch ms':>11} {'resume ms':>9} {'complete ms':>11} "
      f"{'prefetched':>10} {'skipped':>8} {'lazy':>6} {'unused':>7}")
for m in ["lazy", "none", "trace", "abit", "dirty", "learned"]:
    rows = [json.loads(l) for l in open(f"{out}/ws-restore-{m}.jsonl") if l.strip()]
    print(f"{m:<8} {med(rows,'ws_pages'):>9.0f} {med(rows,'prefetch_ms'):>11.1f} {med(rows,'resume_ms'):>9.1f} "
          f"{med(rows,'complete_ms'):>11.1f} {med(rows,'prefetched_pages'):>10.0f} {med(rows,'skipped_faults'):>8.0f} "
          f"{med(rows,'lazy_faults'):>6.0f} {med(rows,'unused_prefetched_pages'):>7.0f}")
# Guest cost of tracking: median work_us per tick in each phase.
lines = [l for l in open(console, errors="replace") if "THAW-TICK " in l]
work = [int(m.group(1)) for l in lines if (m := re.search(r"work_us=(\d+)", l))]
marks = [l.split() for l in open(f"{out}/ws-phases.txt")]
pos = {name: int(n) for name, n in marks}
def phase(a, b):
    seg = work[pos[a]:pos[b]]
    return statistics.median(seg) if seg else float("nan"), len(seg)
base, nb = phase("baseline-start", "abit-start")
print(f"\nguest work per tick (median us): baseline {base:.0f} ({nb} ticks)")
for name, a, b in [("track abit", "abit-start", "dirty-start"), ("track dirty", "dirty-start", "trace-start"),
                   ("checkpoint+trace window", "trace-start", "trace-end")]:
    v, n = phase(a, b)
    print(f"  {name:<24} {v:>8.0f} us ({n} ticks, {v / base:.2f}x baseline)")
for f in ["ws-track-abit", "ws-track-dirty", "ws-checkpoint"]:
    print(f, json.dumps(json.load(open(f"{out}/{f}.json")))[:400])
PY
