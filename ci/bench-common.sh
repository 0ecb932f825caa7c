# Shared start of the benchmark scripts (sourced): run from the repository
# root as root, set the host up, build the guest kit and thaw, and define
# $thaw, $out (target/bench) and cold (drop the page cache).
# shellcheck shell=bash
# shellcheck source=/dev/null
command -v cargo >/dev/null 2>&1 || . "$HOME/.cargo/env"
[ "$(id -u)" = 0 ] || { echo "$0: run as root (drop_caches, ptrace)" >&2; exit 1; }
bash ci/setup-host.sh >/dev/null
bash tests/guest/build.sh >/dev/null
cargo build --release -p thaw-cli -q
thaw=$PWD/target/release/thaw
out=$PWD/target/bench
mkdir -p "$out" /var/lib/thaw/bench-2g
cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Starts configs/bench-2g.yaml afresh and waits for its workload's third
# tick on the console.
start_bench_2g() {
  local console=/var/lib/thaw/bench-2g/console.log
  "$thaw" stop bench-2g --force >/dev/null 2>&1 || true
  : >"$console"
  "$thaw" start --config configs/bench-2g.yaml
  for _ in $(seq 3000); do
    grep -q 'THAW-TICK 3 ' "$console" 2>/dev/null && break
    sleep 0.2
  done
  grep -q 'THAW-TICK 3 ' "$console" || {
    echo "guest never ticked; console:" >&2
    tail -5 "$console" >&2
    exit 1
  }
}
