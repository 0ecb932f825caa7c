#!/usr/bin/env bash
# Builds thaw's test guest kit: a Debian cloud kernel (vmlinuz) and an
# initramfs (initrd.img) holding busybox, tests/guest/init, the kernel's
# virtio modules and a static thaw-workload. The modules are also left in
# <dir>/modules/ for tests that pack initramfses of their own. See
# tests/guest/README.md.
#
# Usage: tests/guest/build.sh
#   Output dir: $THAW_GUEST_DIR, default <repo>/target/guest.
#   Prints the path of vmlinuz and then of initrd.img on stdout, one per
#   line; progress and errors go to stderr.
#
# The build is cached: a stamp file records a hash of the inputs (kernel
# package and version, busybox version and binary, workload binary, init
# script, this script). When it matches and the outputs exist, nothing is
# rebuilt. The initramfs is reproducible (sorted entries, zero mtimes,
# root ownership, no gzip timestamp).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${THAW_GUEST_DIR:-$repo/target/guest}
kernel_meta=linux-image-cloud-amd64
# Kernel modules put into the initramfs, in load order (dependencies first).
guest_modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk virtio-rng virtio_balloon"
busybox_bin=/bin/busybox

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg dpkg-query cpio gzip cargo sha256sum ldd flock find sort touch; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "'$tool' not found; run ci/setup-host.sh (as root) to install the host tools"
done

mkdir -p "$out" "$out/cache" || die "cannot create the output directory $out"
out=$(cd "$out" && pwd)

# One build at a time per output directory.
exec 9>"$out/.lock"
flock 9

tmp=$(mktemp -d "$out/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

is_static() {
  # ldd says "not a dynamic executable" (static) or "statically linked"
  # (static-pie) for binaries without an ELF interpreter.
  local r
  r=$(LC_ALL=C ldd "$1" 2>&1 || true)
  case $r in
    *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
    *) return 1 ;;
  esac
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- busybox ----------------------------------------------------------------
[ -x "$busybox_bin" ] ||
  die "$busybox_bin is missing; run ci/setup-host.sh (as root) to install busybox-static"
is_static "$busybox_bin" ||
  die "$busybox_bin is not statically linked (is the dynamic 'busybox' package installed instead of 'busybox-static'?); run ci/setup-host.sh (as root)"
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || true)
[ -n "$busybox_version" ] ||
  die "package busybox-static is not installed; run ci/setup-host.sh (as root)"

# --- kernel package: resolve the versioned package behind the metapackage ---
resolve_kernel() {
  apt-cache depends "$kernel_meta" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
kernel_pkg=$(resolve_kernel || true)
if [ -z "$kernel_pkg" ]; then
  log "apt-cache cannot resolve $kernel_meta; running apt-get update"
  [ "$(id -u)" = 0 ] || die "apt-get update needs root; run this script as root or run 'apt-get update' first"
  apt-get update -q >&2 || die "apt-get update failed"
  kernel_pkg=$(resolve_kernel || true)
  [ -n "$kernel_pkg" ] || die "cannot resolve $kernel_meta to a linux-image-* package (is this a Debian host with the main component enabled?)"
fi
kernel_version=$(apt-cache show --no-all-versions "$kernel_pkg" 2>/dev/null |
  awk '$1 == "Version:" { print $2; exit }')
[ -n "$kernel_version" ] || die "apt-cache has no candidate version of $kernel_pkg"

# --- workload: release build, fully static ------------------------------------
# A target dir of its own keeps the static build from fighting over
# target/release with ordinary workspace builds.
log "building thaw-workload (static, release)"
(cd "$repo" && cargo rustc --release -p thaw-workload --bin thaw-workload \
  --target-dir "$out/cargo-target" \
  -- -C target-feature=+crt-static -C strip=debuginfo) >&2 ||
  die "cargo build of thaw-workload failed"
workload_bin=$out/cargo-target/release/thaw-workload
[ -x "$workload_bin" ] || die "cargo did not produce $workload_bin"
is_static "$workload_bin" || die "$workload_bin is not statically linked"

# --- cache check ----------------------------------------------------------------
inputs="kernel=$kernel_pkg $kernel_version
busybox=$busybox_version $(sha "$busybox_bin")
workload=$(sha "$workload_bin")
init=$(sha "$here/init")
build.sh=$(sha "$here/build.sh")"
inputs_hash=$(printf '%s\n' "$inputs" | sha256sum | cut -d' ' -f1)
stamp=$out/stamp

if [ -f "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -d "$out/modules" ] &&
  [ "$(head -n1 "$stamp")" = "$inputs_hash" ]; then
  log "up to date ($kernel_pkg $kernel_version)"
  echo "$out/vmlinuz"
  echo "$out/initrd.img"
  exit 0
fi
rm -f "$stamp"

# --- kernel -------------------------------------------------------------------
deb_glob="${kernel_pkg}_${kernel_version//:/%3a}_*.deb"
find_deb() { find "$out/cache" -maxdepth 1 -name "$deb_glob" -print -quit; }
deb=$(find_deb)
if [ -z "$deb" ]; then
  log "downloading $kernel_pkg $kernel_version"
  # apt-get download writes into the current directory. As root, apt fetches
  # as the unprivileged _apt user, so give it a directory it can write to.
  dl=$(mktemp -d)
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
  (cd "$dl" && apt-get download -q "$kernel_pkg=$kernel_version") >&2 || {
    rm -rf "$dl"
    die "apt-get download $kernel_pkg=$kernel_version failed"
  }
  mv "$dl"/*.deb "$out/cache/" && rm -rf "$dl"
  deb=$(find_deb)
  [ -n "$deb" ] || die "apt-get download did not produce $out/cache/$deb_glob"
  # Older kernel packages are of no further use.
  find "$out/cache" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$deb_glob" -delete
fi
log "extracting the kernel from $(basename "$deb")"
dpkg -x "$deb" "$tmp/kpkg" || die "dpkg -x $deb failed"
vmlinuz=$(find "$tmp/kpkg/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
cp "$vmlinuz" "$tmp/vmlinuz"
chmod 644 "$tmp/vmlinuz"
# The cloud kernel builds virtio as modules: ship the ones the tests' devices
# need (virtio-pci, -blk, -net, -rng), flat, in load order (modules.order).
mkdir -p "$tmp/modules"
moddir=$(find "$tmp/kpkg/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
[ -n "$moddir" ] || die "no lib/modules/<version> in $deb"
for m in $guest_modules; do
  ko=$(find "$moddir/kernel" -name "$m.ko" -print -quit)
  [ -n "$ko" ] || die "module $m.ko not found in $deb"
  cp "$ko" "$tmp/modules/$m.ko"
done
chmod 644 "$tmp/modules"/*.ko
echo "$guest_modules" | tr ' ' '\n' >"$tmp/modules/load-order"
rm -rf "$tmp/kpkg"

# --- initramfs ------------------------------------------------------------------
log "building the initramfs"
root=$tmp/root
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/lib"
cp "$here/init" "$root/init"
cp -r "$tmp/modules" "$root/lib/modules"
chmod 755 "$root/lib" "$root/lib/modules"
cp "$busybox_bin" "$root/bin/busybox"
cp "$workload_bin" "$root/bin/thaw-workload"
chmod 755 "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/init" \
  "$root/bin/busybox" "$root/bin/thaw-workload"
chmod 1777 "$root/tmp"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
  cpio --reproducible --quiet -o -H newc --owner=0:0) | gzip -n -9 >"$tmp/initrd.img" ||
  die "creating the initramfs failed"

rm -rf "$out/modules"
mv -f "$tmp/modules" "$out/modules"
mv -f "$tmp/vmlinuz" "$out/vmlinuz"
mv -f "$tmp/initrd.img" "$out/initrd.img"
printf '%s\n%s\n' "$inputs_hash" "$inputs" >"$stamp"
log "built $kernel_pkg $kernel_version, initrd $(stat -c %s "$out/initrd.img") bytes"
echo "$out/vmlinuz"
echo "$out/initrd.img"
