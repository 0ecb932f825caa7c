#!/usr/bin/env bash
# Restore benchmark (numbers, not a test): boots configs/bench-2g.yaml (2 GiB
# guest, ~1 GiB of non-zero RAM, 64 MiB hot set), saves it once, then restores
# the same image RUNS times per mode with a cold page cache before each
# restore, and prints one JSON line per restore plus a median table. Also runs
# `thaw limits` in the same run, so fill rate and fault latency can be read
# against this machine's raw sequential read, UFFDIO_COPY and fault round trip.
#
# Usage (root): ci/bench-restore.sh [RUNS]     (default 3)
# Output: target/bench/restore-<mode>.jsonl, target/bench/limits.json, table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=ci/bench-common.sh
. ci/bench-common.sh
image=/var/lib/thaw/bench-2g.img

start_bench_2g
"$thaw" --json save bench-2g "$image" --force >"$out/save.json"

for mode in eager lazy; do
  : >"$out/restore-$mode.jsonl"
  for _ in $(seq "$runs"); do
    cold
    "$thaw" --json restore "$image" --mode "$mode" | tr -d '\n' >>"$out/restore-$mode.jsonl"
    echo >>"$out/restore-$mode.jsonl"
    "$thaw" stop bench-2g
  done
done
"$thaw" --json limits >"$out/limits.json"

python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
lim = json.load(open(f"{out}/limits.json"))
def med(rows, k): return statistics.median(r[k] for r in rows)
keys = ["resume_ms", "device_state_ms", "complete_ms", "faults", "background_pages",
        "fill_mib_per_s", "fault_p50_us", "fault_p99_us"]
print(f"{'mode':<6} " + " ".join(f"{k:>16}" for k in keys))
for mode in ["eager", "lazy"]:
    rows = [json.loads(l) for l in open(f"{out}/restore-{mode}.jsonl") if l.strip()]
    print(f"{mode:<6} " + " ".join(f"{med(rows, k):>16.1f}" for k in keys))
print("limits:", json.dumps(lim, indent=1))
PY
