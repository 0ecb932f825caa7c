#!/usr/bin/env bash
# The demo, on a fresh Debian bookworm machine as root: set up, boot the demo
# guest (configs/demo.yaml), save it, restore it lazily and print the stats.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
command -v cargo >/dev/null 2>&1 || . "$HOME/.cargo/env"

bash ci/setup-host.sh
bash tests/guest/build.sh
cargo build --release -p thaw-cli
thaw=target/release/thaw
image=/var/lib/thaw/demo.img
console=/var/lib/thaw/demo/console.log

"$thaw" stop demo --force >/dev/null 2>&1 || true
mkdir -p /var/lib/thaw/demo && : >"$console"
"$thaw" start --config configs/demo.yaml

# Wait (up to 5 min under TCG) for the workload to run a few ticks.
wait_tick() {
  for _ in $(seq 1500); do
    if grep -q "THAW-TICK $1 " "$console" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "the guest did not reach tick $1; console:" >&2; tail -5 "$console" >&2; exit 1
}
wait_tick 5
echo "== before save:"; grep 'THAW-TICK' "$console" | tail -1

"$thaw" save demo "$image" --force
"$thaw" inspect "$image"
"$thaw" restore "$image" --mode lazy

last=$(grep -o 'THAW-TICK [0-9]*' "$console" | tail -1 | cut -d' ' -f2)
wait_tick $((last + 5))
echo "== after restore (same nonce, ticks continue, ok=1):"; grep 'THAW-TICK' "$console" | tail -3
"$thaw" status demo
"$thaw" stop demo
