#!/usr/bin/env bash
# The live-checkpoint benchmarks of BENCHMARKS.md ("Live checkpoints").
#
#   ci/bench-live.sh [sizes|incremental|speculate|app]...     (default: all)
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
#              (default 3) rounds of three series of 6 checkpoints a second
#              apart (`thaw checkpoint --interval-ms 1000`): plain
#              (--speculate-pages 0), speculative (the default: predicted
#              pages copied first after the resume) and in-pause
#              (--speculate-in-pause), where each checkpoint predicts from
#              the one before; then, per method, a single save predicted
#              by a `thaw track --estimator dirty` that ran for 3 s
#              before. Pause and
#              write faults per checkpoint (the first of a series, which
#              has nothing to predict from, apart):
#              target/bench/live-speculate/speculate.{json,md}
# app:         a real server and its own clients during checkpoints:
#              redis from Debian (configs/apps/redis.yaml, 2 GiB, in the
#              network namespace of ci/app-net.sh) loaded with about
#              900 MiB of 4 KiB values by redis-benchmark, then
#              `redis-benchmark -t set -c 4` writing without pause (its
#              progress line: requests/s every 250 ms) and `redis-cli
#              --latency-history -i 1` (PING latency, worst per second) while
#              thaw takes $THAW_RUNS (default 3) checkpoints per method,
#              live and stop-and-copy alternating, 10 s apart (`thaw save
#              --keep-running [--stop-copy]`), each round after two
#              controls: 5 s without a checkpoint, and a plain copy of the
#              guest's RAM file by cp (the copy's own cost, no write
#              protection). Per checkpoint: the pause,
#              the clients' rate during the command against the 5 s
#              before it, their slowest 250 ms, the worst PING:
#              target/bench/live-app/app.{json,md}; $THAW_LIVE_ARGS are
#              added to the live saves (e.g. "--copy-limit 128M");
#              THAW_TRACK=1 runs `thaw track --estimator dirty` for 3 s
#              before every checkpoint (both methods), whose estimate the
#              live one predicts its writes from
# Run from the repository root as root.
set -euo pipefail
. ci/bench-common.sh

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(sizes incremental speculate app)

sizes() {
  "$thaw" bench-checkpoint -c configs/bench-tput-2g.yaml --sizes 1G,2G,4G,8G \
    --runs 3 --out "$out/live-sizes"
}

# Boots configs/NAME.yaml (a guest of the workload's copy-on-write mode)
# and waits until its writers have run for two seconds.
start_writers() {
  local name=$1 dir=/var/lib/thaw/$1
  mkdir -p "$dir"
  "$thaw" stop "$name" >/dev/null 2>&1 || true
  : >"$dir/console.log"
  "$thaw" start --config "configs/$name.yaml" >/dev/null
  local waited=0
  until grep -q "THAW-COW-TICK 4 " "$dir/console.log"; do
    sleep 1
    waited=$((waited + 1))
    [ $waited -lt 600 ] || { echo "bench-live.sh: the guest never got ready" >&2; exit 1; }
  done
}

incremental() {
  local dir=/var/lib/thaw/live-writers res=$out/live-incremental
  local n=${THAW_INCREMENTS:-5}
  mkdir -p "$res"
  start_writers live-writers
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
  mkdir -p "$res"
  rm -f "$res"/*.json
  start_writers $name
  for r in $(seq 1 "$rounds"); do
    for mode in plain speculative in-pause; do
      local spec=()
      case $mode in
        plain) spec=(--speculate-pages 0) ;;
        in-pause) spec=(--speculate-in-pause) ;;
      esac
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
modes = ("plain", "speculative", "in-pause")
q = lambda xs: statistics.quantiles(xs, n=4) if len(xs) > 1 else [0.0, 0.0, 0.0]
for mode in modes:
    series = [json.load(open(f"{res}/series-{mode}-{r}.json")) for r in range(1, rounds + 1)]
    first = [e for s in series for e in s["taken"] if e["n"] == 1]
    later = [e for s in series for e in s["taken"] if e["n"] > 1]
    tracked = [json.load(open(f"{res}/tracked-{mode}-{r}.json")) for r in range(1, rounds + 1)]
    out[mode] = dict(
        series_later=dict(n=len(later), paused_ms=med([e["paused_ms"] for e in later]),
                          device_state_ms=med([e.get("device_state_ms", 0.0) for e in later]),
                          protect_ms=med([e.get("protect_ms", 0.0) for e in later]),
                          paused_q1=q([e["paused_ms"] for e in later])[0],
                          paused_q3=q([e["paused_ms"] for e in later])[2],
                          wp_faults=med([e["wp_faults"] for e in later]),
                          speculated=med([e["speculated_pages"] for e in later])),
        series_first=dict(n=len(first), paused_ms=med([e["paused_ms"] for e in first]),
                          wp_faults=med([e["wp_faults"] for e in first]),
                          speculated=med([e["speculated_pages"] for e in first])),
        tracked=dict(n=len(tracked), paused_ms=med([t["paused_ms"] for t in tracked]),
                     wp_faults=med([t["live"]["wp_faults"] for t in tracked]),
                     speculated=med([t["live"]["speculated_pages"] for t in tracked]),
                     protect_ms=med([t["live"]["protect_ms"] for t in tracked])))
print("| prediction | method | checkpoints | pause ms (median) | write faults (median) | pages copied ahead |")
print("|---|---|---:|---:|---:|---:|")
for key, label in (("series_later", "previous checkpoint (series, 2nd to 6th)"),
                   ("tracked", "dirty estimate (track, then save)"),
                   ("series_first", "none (first of a series)")):
    for mode in modes:
        m = out[mode][key]
        print(f"| {label} | {mode} | {m['n']} | {m['paused_ms']:.1f} | {m['wp_faults']:.0f} | {m['speculated']:.0f} |")
for key in ("series_later", "tracked"):
    for mode in modes[1:]:
        p, s = out["plain"][key], out[mode][key]
        if p["wp_faults"]:
            print(f"{key}, {mode}: write faults cut by {100 * (1 - s['wp_faults'] / p['wp_faults']):.0f} %, "
                  f"pause {s['paused_ms'] - p['paused_ms']:+.1f} ms")
for mode in modes:
    m = out[mode]["series_later"]
    print(f"series, {mode}: pause quartiles {m['paused_q1']:.1f}-{m['paused_q3']:.1f} ms; "
          f"in the pause, device state {m['device_state_ms']:.1f} ms beside protecting {m['protect_ms']:.1f} ms (medians)")
json.dump(out, open(f"{res}/speculate.json", "w"), indent=1)
PY
}

app() {
  local name=app-redis dir=/var/lib/thaw/app-redis res=$out/live-app ns=thaw-app
  local addr=10.77.0.2 runs=${THAW_RUNS:-3}
  bash tests/guest/build-app.sh redis >/dev/null
  bash ci/app-net.sh up $ns >/dev/null
  mkdir -p "$dir" "$res"
  "$thaw" stop $name >/dev/null 2>&1 || true
  : >"$dir/console.log"
  ip netns exec $ns "$thaw" start --config configs/apps/redis.yaml >/dev/null
  local waited=0
  until ip netns exec $ns redis-cli -h $addr ping 2>/dev/null | grep -q PONG; do
    sleep 1
    waited=$((waited + 1))
    [ $waited -lt 600 ] || { echo "bench-live.sh: redis never answered" >&2; exit 1; }
  done
  # About 900 MiB of 4 KiB values under random keys, so the copy is long.
  ip netns exec $ns redis-benchmark -h $addr -t set -n 400000 -r 300000 -d 4096 -P 32 -c 4 -q \
    >"$res/load.txt"
  # shellcheck disable=SC2086
  python3 - "$thaw" $name "${THAW_IMAGE_DIR:-$dir}/ckpt" "$res" "$runs" $ns $addr "${THAW_TRACK:-0}" ${THAW_LIVE_ARGS:-} <<'PY' | tee "$res/app.md"
import glob, json, os, statistics, subprocess, sys, threading, time
thaw, name, image, res, runs, ns, addr = sys.argv[1:8]
shm = os.environ.get("THAW_SHM_DIR", "/dev/shm/thaw")
runtime = os.environ.get("THAW_RUNTIME_DIR", "/run/thaw")
runs = int(runs)
track = sys.argv[8] == "1"
live_args = sys.argv[9:]
now = lambda: time.time() * 1000.0

def stamped(cmd, sep):
    """Runs cmd in the namespace; returns (process, list of (ms, line))."""
    p = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    lines = []
    def read():
        buf = b""
        while True:
            chunk = p.stdout.read1(4096)
            if not chunk:
                return
            buf += chunk
            while sep in buf:
                line, buf = buf.split(sep, 1)
                text = line.decode(errors="replace").strip()
                if text:
                    lines.append((now(), text))
    threading.Thread(target=read, daemon=True).start()
    return p, lines

bench, progress = stamped(["redis-benchmark", "-h", addr, "-t", "set", "-n", "2000000000",
                           "-r", "100000", "-d", "256", "-c", "4"], b"\r")
pinger, pings = stamped(["stdbuf", "-oL", "redis-cli", "-h", addr, "--latency-history", "-i", "1"], b"\n")
checkpoints = []
try:
    time.sleep(10)
    for run in range(runs):
        for method in ("no checkpoint", "copy only", "live", "stop-and-copy"):
            if method == "copy only":
                # The copy's own cost: guest RAM's data copied into a file
                # next to the image and synced, by cp (holes skipped),
                # with no write protection and no fault.
                # QEMU holds them open, unlinked: reach them through its fds.
                qemu = open(os.path.join(runtime, name, "qemu.pid")).read().strip()
                fds = glob.glob(f"/proc/{qemu}/fd/*")
                rams = [f for f in fds if os.readlink(f).startswith(os.path.join(shm, name) + "/")]
                if not rams:
                    raise SystemExit(f"bench-live.sh: QEMU of {name} holds no RAM file of {shm}")
                start = now()
                for f in rams:
                    subprocess.run(["cp", "--sparse=always", f, image + ".raw"], check=True)
                    subprocess.run(["sync", image + ".raw"], check=True)
                    os.remove(image + ".raw")
                checkpoints.append(dict(method=method, run=run, start=start, end=now(),
                                        report={"paused_ms": 0.0, "nonzero_pages": 0}))
                time.sleep(10)
                continue
            if method == "no checkpoint":
                # The control: the same measure over 5 s without a checkpoint.
                start = now()
                time.sleep(5)
                checkpoints.append(dict(method=method, run=run, start=start, end=now(),
                                        report={"paused_ms": 0.0, "nonzero_pages": 0}))
                time.sleep(10)
                continue
            args = [thaw, "--json", "save", name, image, "--keep-running", "--force"]
            if method == "stop-and-copy":
                args.append("--stop-copy")
            else:
                args += live_args
            tracker = None
            if track:
                # A write tracker runs before the checkpoint, which stops
                # it and predicts the guest's writes from its estimate.
                tracker = subprocess.Popen([thaw, "track", name, "--estimator", "dirty",
                                            "--interval-ms", "500", "--keep", "2"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(3)
            start = now()
            out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
            end = now()
            if tracker:
                tracker.wait(timeout=120)
            checkpoints.append(dict(method=method, run=run, start=start, end=end,
                                    report=json.loads(out)))
            time.sleep(10)
finally:
    bench.terminate()
    pinger.terminate()
    subprocess.run([thaw, "stop", name], capture_output=True)

# redis-benchmark: "SET: rps=41234.0 (overall: ...) avg_msec=..."; each
# line's rate covers the time since the line before it.
samples = []
for (t0, _), (t1, line) in zip(progress, progress[1:]):
    if line.startswith("SET: rps="):
        samples.append((t0, t1, float(line.split("rps=")[1].split()[0])))
def rate(a, b):
    work = sum(r * max(0.0, min(e, b) - max(s, a)) for s, e, r in samples)
    return work / (b - a) if b > a else 0.0
# redis-cli, a line a second: "min: 0, max: 12, avg: 0.31 (1480 samples)
# -- 1.00 seconds range" on a terminal, "0 12 0.31 1480" otherwise.
worst_ping = []
for t, line in pings:
    if "max:" in line:
        worst_ping.append((t, float(line.rsplit("max:", 1)[1].split(",")[0])))
    elif len(line.split()) == 4:
        worst_ping.append((t, float(line.split()[1])))
rows = []
for c in checkpoints:
    a, b = c["start"], c["end"]
    before = rate(a - 5000, a)
    during = rate(a, b)
    slowest = min((r for s, e, r in samples if e > a and s < b), default=0.0)
    # Each history line covers the second before it.
    ping = max((m for t, m in worst_ping if t > a and t - 1000 < b + 1000), default=None)
    rep = c["report"]
    rows.append(dict(method=c["method"], run=c["run"], paused_ms=rep["paused_ms"],
                     window_ms=b - a, rps_before=before, rps_during=during,
                     during_vs_before=during / before if before else 0.0,
                     slowest_250ms_rps=slowest, worst_ping_ms=ping,
                     wp_faults=(rep.get("live") or {}).get("wp_faults", 0),
                     speculated_pages=(rep.get("live") or {}).get("speculated_pages", 0),
                     nonzero_pages=rep["nonzero_pages"]))
med = lambda xs: statistics.median(xs) if xs else 0.0
summary = {}
for m in ("no checkpoint", "copy only", "live", "stop-and-copy"):
    rs = [r for r in rows if r["method"] == m]
    summary[m] = {k: med([r[k] for r in rs if r[k] is not None])
                  for k in ("paused_ms", "window_ms", "rps_before", "rps_during",
                            "during_vs_before", "slowest_250ms_rps", "worst_ping_ms", "wp_faults")}
print(f"data: {max(r['nonzero_pages'] for r in rows) * 4096 / 2**30:.2f} GiB in the image")
print("| method | pause ms | checkpoint ms | SET/s the 5 s before | SET/s during | during vs before | slowest 250 ms, SET/s | worst PING ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for m, s in summary.items():
    print(f"| {m} | {s['paused_ms']:.1f} | {s['window_ms']:.0f} | {s['rps_before']:.0f} | {s['rps_during']:.0f} | "
          f"{100 * s['during_vs_before']:.0f} % | {s['slowest_250ms_rps']:.0f} | {s['worst_ping_ms']:.0f} |")
json.dump(dict(live_args=live_args, track=track, runs=rows, summary=summary), open(f"{res}/app.json", "w"), indent=1)
json.dump(dict(progress=progress, pings=pings), open(f"{res}/clients.json", "w"))
PY
}

for s in "${scenarios[@]}"; do
  case $s in
    sizes) sizes ;;
    incremental) incremental ;;
    speculate) speculate ;;
    app) app ;;
    *) echo "bench-live.sh: unknown scenario $s (sizes, incremental, speculate, app)" >&2; exit 1 ;;
  esac
done
