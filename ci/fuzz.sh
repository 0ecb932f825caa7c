#!/usr/bin/env bash
# Fuzzes the image metadata and index parsers (fuzz/fuzz_targets/image_index.rs)
# with cargo fuzz for a bounded time, seeded with a real image's meta.json
# and index.bin. Installs the nightly toolchain and cargo-fuzz if missing.
#
# Usage: ci/fuzz.sh [SECONDS]    (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
command -v cargo >/dev/null 2>&1 || . "$HOME/.cargo/env"
seconds=${1:-60}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
corpus=$PWD/target/fuzz-corpus/image_index
mkdir -p "$corpus"
# The seed: a real image's meta.json and index.bin in the target's format.
THAW_FUZZ_SEED=$corpus/seed cargo test --release -q -p thaw --lib \
  image::tests::meta_and_index_parsers_accept_a_real_image >/dev/null
test -s "$corpus/seed"
cargo +nightly fuzz run image_index "$corpus" -- \
  -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1
