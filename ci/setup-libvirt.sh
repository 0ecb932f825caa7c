#!/usr/bin/env bash
# Installs libvirt (11.x from bookworm-backports, built for the QEMU 10 thaw
# uses) and starts libvirtd and virtlogd without systemd, idempotently (run
# as root after ci/setup-host.sh). `ci/setup-libvirt.sh stop` stops only the
# daemons this script started.
#
# qemu.conf gets one thaw block (replaced on every run):
#   memory_backing_dir = "/dev/shm/libvirt-ram"   guest RAM files on tmpfs,
#                                                  where userfaultfd works
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "ci/setup-libvirt.sh: run as root" >&2; exit 1; }
state=/run/thaw-ci-libvirt
conf=/etc/libvirt/qemu.conf
sock=/run/libvirt/libvirt-sock

stop_started() {
  local d pid
  for d in libvirtd virtlogd; do
    [ -f "$state/$d.started" ] || continue
    pid=$(cat "/run/$d.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$state/$d.started"
  done
  echo "libvirt daemons started by ci/setup-libvirt.sh are stopped"
}

if [ "${1:-}" = stop ]; then
  stop_started
  exit 0
fi

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
export DEBIAN_FRONTEND=noninteractive
libvirt_major() { virsh --version 2>/dev/null | cut -d. -f1; }
pkgs="libvirt-daemon libvirt-clients libvirt-daemon-driver-qemu libvirt-dev"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ] || [ "$(libvirt_major)" -lt 11 ] 2>/dev/null; then
  # ci/setup-host.sh has enabled backports (QEMU 10 comes from there).
  [ -f /etc/apt/sources.list.d/thaw-backports.sources ] || bash "$(dirname "$0")/setup-host.sh"
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends -t "${codename}-backports" $pkgs
fi
[ "$(libvirt_major)" -ge 11 ] || { echo "libvirt >= 11 is required; found $(virsh --version)" >&2; exit 1; }

# The thaw block of qemu.conf.
begin="# >>> thaw"
end="# <<< thaw"
if [ -f "$conf" ]; then
  sed -i "/^$begin\$/,/^$end\$/d" "$conf"
fi
cat >>"$conf" <<EOF
$begin
memory_backing_dir = "/dev/shm/libvirt-ram"
$end
EOF

mkdir -p /var/log/libvirt/qemu "$state" /dev/shm/libvirt-ram
# What Debian's udev rule does on a host with udev: /dev/kvm for group kvm.
# Without it libvirt probes QEMU with KVM as root, finds KVM unusable for
# the QEMU user, and probes again on every domain start (seconds each).
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi
running() { local pid; pid=$(cat "/run/$1.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }
if ! running virtlogd; then
  virtlogd -d
  touch "$state/virtlogd.started"
fi
if running libvirtd; then
  # Re-read qemu.conf: a restart keeps running domains.
  if [ -f "$state/libvirtd.started" ]; then
    kill "$(cat /run/libvirtd.pid)"
    for _ in $(seq 1 100); do running libvirtd || break; sleep 0.1; done
    libvirtd -d
  fi
else
  libvirtd -d
  touch "$state/libvirtd.started"
fi
for _ in $(seq 1 300); do
  [ -S "$sock" ] && virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.1
done
virsh -c qemu:///system version >/dev/null || { echo "libvirtd did not come up" >&2; exit 1; }
echo "libvirt ready: $(virsh -c qemu:///system version | sed -n 's/^Running hypervisor: //p; s/^Using library: //p' | tr '\n' ' ')"
