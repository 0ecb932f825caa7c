#!/usr/bin/env bash
# Restore from an object store, side by side with a local image (numbers,
# not a test): boots configs/bench-2g.yaml (2 GiB guest, ~1 GiB of
# non-zero RAM), saves it once, pushes the image to a real S3-compatible
# store on loopback (SeaweedFS, ci/s3-server.sh), then RUNS times, each
# from a cold page cache (and an empty thaw cache):
#   local   thaw restore IMAGE --mode lazy
#   store   thaw restore s3://… --mode lazy      (metadata first, pages by ranged reads)
#   pull    thaw pull s3://… DIR, then thaw restore DIR --mode eager
#           (download, then restore: what a restore that is not lazy pays)
# The link is loopback, unshaped: this measures thaw's store path against
# the local one on this host, not a network.
#
# Usage (root): ci/bench-store.sh [RUNS]     (default 3)
# Output: target/bench/store/*.jsonl, a median table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=ci/bench-common.sh
. ci/bench-common.sh
res=$out/store
mkdir -p "$res"
image=/var/lib/thaw/bench-2g.img
pulled=/var/lib/thaw/bench-2g.pulled
export THAW_CACHE_DIR=/var/lib/thaw/bench-store-cache
bash ci/s3-server.sh up
eval "$(bash ci/s3-server.sh env)"
url=s3://$THAW_S3_BUCKET/bench/bench-2g

start_bench_2g
"$thaw" --json save bench-2g "$image" --force >"$res/save.json"
"$thaw" --json push "$image" "$url" --force >"$res/push.json"

now() { date +%s%N; }
for way in local store pull; do
  : >"$res/$way.jsonl"
  for _ in $(seq "$runs"); do
    rm -rf "$THAW_CACHE_DIR" "$pulled"
    cold
    t0=$(now)
    case $way in
      local) "$thaw" --json restore "$image" --mode lazy --no-learn >"$res/last.json" ;;
      store) "$thaw" --json restore "$url" --mode lazy --no-learn >"$res/last.json" ;;
      pull)
        "$thaw" --json pull "$url" "$pulled" >/dev/null
        t_pulled=$(now)
        "$thaw" --json restore "$pulled" --mode eager >"$res/last.json"
        ;;
    esac
    t1=$(now)
    python3 - "$res/last.json" "$t0" "$t1" "${t_pulled:-$t0}" <<'PY' >>"$res/$way.jsonl"
import json, sys
r = json.load(open(sys.argv[1]))
t0, t1, tp = (int(x) for x in sys.argv[2:5])
download_ms = (tp - t0) / 1e6
print(json.dumps(dict(download_ms=download_ms,
                      running_ms=download_ms + r["resume_ms"],
                      all_resident_ms=download_ms + r["complete_ms"],
                      command_ms=(t1 - t0) / 1e6, fault_p50_us=r.get("fault_p50_us", 0),
                      faults=r.get("faults", 0), fill_mib_per_s=r.get("fill_mib_per_s", 0))))
PY
    "$thaw" stop bench-2g
  done
done
rm -rf "$THAW_CACHE_DIR" "$pulled"
bash ci/s3-server.sh stop

python3 - "$res" <<'PY' | tee "$res/store.md"
import json, statistics, sys
res = sys.argv[1]
keys = ["running_ms", "all_resident_ms", "download_ms", "faults", "fault_p50_us", "fill_mib_per_s"]
print("| restore | " + " | ".join(keys) + " |")
print("|---|" + "---:|" * len(keys))
for way, label in (("local", "local image, lazy"), ("store", "from the store, lazy"),
                   ("pull", "pull, then eager")):
    rows = [json.loads(l) for l in open(f"{res}/{way}.jsonl") if l.strip()]
    print(f"| {label} | " + " | ".join(f"{statistics.median(r[k] for r in rows):.1f}" for k in keys) + " |")
PY
