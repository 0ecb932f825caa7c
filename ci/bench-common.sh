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
