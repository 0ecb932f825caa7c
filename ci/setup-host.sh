#!/usr/bin/env bash
# Installs what thaw needs on a Debian bookworm host, idempotently (run as root):
# QEMU >= 8.2 from bookworm-backports, libclang for the userfaultfd bindings,
# libvirt's client library (11.x from bookworm-backports, as the daemon
# ci/setup-libvirt.sh installs), the tools the guest kit is built with and
# the clients of the application benchmarks.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "ci/setup-host.sh: run as root" >&2; exit 1; }; }
need_root

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
backports_file=/etc/apt/sources.list.d/thaw-backports.sources

# Derive the backports entry from the machine's own Debian source (same mirror,
# same keyring), so no registry host name is written down here.
enable_backports() {
  [ -f "$backports_file" ] && return 0
  local src=/etc/apt/sources.list.d/debian.sources uri="" keyring=""
  if [ -f "$src" ]; then
    # The first stanza whose Suites line lists the release itself.
    uri=$(awk -v c="$codename" '
      /^URIs:/ {u=$2} /^Signed-By:/ {k=$2}
      /^Suites:/ { for (i=2;i<=NF;i++) if ($i==c) hit=1 }
      /^$/ { if (hit && u!="") {print u; exit} ; hit=0; u="" }
      END { if (hit && u!="") print u }' "$src")
    keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$src")
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk -v c="$codename" '$1=="deb" && $3==c {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || { echo "cannot find the Debian mirror in the apt sources" >&2; exit 1; }
  {
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: ${codename}-backports"
    echo "Components: main"
    [ -n "$keyring" ] && echo "Signed-By: $keyring"
  } >"$backports_file"
  apt-get update -q
}

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  set -- $v
  [ "${1:-0}" -gt 8 ] || { [ "${1:-0}" -eq 8 ] && [ "${2:-0}" -ge 2 ]; }
}

pkgs_missing() {
  local p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"; done
}

export DEBIAN_FRONTEND=noninteractive
# redis-tools, libmemcached-tools: the clients of the application benchmark
# (thaw bench --app redis|memcached).
missing=$(pkgs_missing libclang-dev busybox-static cpio xz-utils zstd redis-tools libmemcached-tools iproute2)
if [ -n "$missing" ]; then
  apt-get update -q || true
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $missing
fi
if ! qemu_ok; then
  enable_backports
  apt-get install -y -q --no-install-recommends -t "${codename}-backports" qemu-system-x86
fi
if [ -n "$(pkgs_missing libvirt-dev)" ]; then
  enable_backports
  apt-get install -y -q --no-install-recommends -t "${codename}-backports" libvirt-dev
fi
qemu_ok || { echo "qemu-system-x86_64 >= 8.2 is required; found: $(qemu-system-x86_64 --version 2>&1 | head -1)" >&2; exit 1; }
echo "host ready: $(qemu-system-x86_64 --version | head -1)"
