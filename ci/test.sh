#!/usr/bin/env bash
# Sets up this machine (Debian bookworm, as root) and runs thaw's whole test
# suite: unit tests and end-to-end tests with real QEMU and the guest kit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
command -v cargo >/dev/null 2>&1 || . "$HOME/.cargo/env"

echo "== host setup"
bash ci/setup-host.sh
echo "== libvirt (for the libvirt end-to-end tests)"
bash ci/setup-libvirt.sh
# Stop the daemons this run started (none it found running), and remove
# the application tests' network namespaces.
trap 'bash ci/setup-libvirt.sh stop; for a in redis memcached live; do bash ci/app-net.sh down thaw-e2e-$a; done' EXIT
echo "== guest kit and application guests"
bash tests/guest/build.sh
bash tests/guest/build-app.sh redis
bash tests/guest/build-app.sh memcached
echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --release --all-targets -- -D warnings
echo "== tests"
# Two test threads: each end-to-end test runs a TCG guest on a 2-core machine.
cargo test --workspace --release -- --test-threads=2
echo "== fuzz the image parsers (bounded)"
bash ci/fuzz.sh "${THAW_FUZZ_SECONDS:-60}"
