#!/usr/bin/env bash
# Builds an initramfs that runs a real server program from Debian's
# packages in the guest kit's kernel: redis or memcached, reached from the
# host over a virtio NIC (see tests/guest/README.md, "Application guests").
#
# Usage: tests/guest/build-app.sh redis|memcached
# Prints <dir>/apps/<app>.img (the kernel is the guest kit's <dir>/vmlinuz).
#
# Cached and reproducible like the kit: a stamp records the package
# versions and the hashes of this script, app-init and busybox; the same
# inputs give a byte-identical image. Packages come from the release itself
# (never backports): `apt-cache madison` picks the newest non-backports
# version of each, and `apt-get download` fetches it into <dir>/cache/apps.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${THAW_GUEST_DIR:-$repo/target/guest}
log() { echo "build-app: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

app=${1:-}
case $app in
redis)
  # redis-server is a link to redis-check-rdb (argv[0] picks the mode).
  pkgs="redis-tools libc6 libatomic1 liblzf1 libjemalloc2 libstdc++6 libgcc-s1 libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblz4-1 liblzma5 libzstd1 libssl3"
  ;;
memcached)
  pkgs="memcached libc6 libevent-2.1-7 libsasl2-2 libssl3"
  ;;
*) die "usage: build-app.sh redis|memcached" ;;
esac

for tool in apt-cache apt-get dpkg cpio gzip sha256sum flock find sort touch; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
# The kernel and its virtio modules are the guest kit's.
"$here/build.sh" >/dev/null
mkdir -p "$out/apps" "$out/cache/apps"
exec 9>"$out/apps/.lock"
flock 9

busybox_bin=/bin/busybox
sha() { sha256sum "$1" | cut -d' ' -f1; }

# The newest version of a package outside backports.
release_version() {
  apt-cache madison "$1" 2>/dev/null | awk -F'|' '$3 !~ /backports/ {gsub(/ /, "", $2); print $2; exit}'
}
versions=""
for p in $pkgs; do
  v=$(release_version "$p")
  [ -n "$v" ] || die "apt-cache knows no release version of $p (run apt-get update?)"
  versions="$versions$p=$v
"
done
inputs="app=$app
$versions
busybox=$(sha "$busybox_bin")
app-init=$(sha "$here/app-init")
build-app.sh=$(sha "$here/build-app.sh")
modules=$(cat "$out/modules/load-order" | tr '\n' ' ')"
inputs_hash=$(printf '%s\n' "$inputs" | sha256sum | cut -d' ' -f1)
image=$out/apps/$app.img
stamp=$out/apps/$app.stamp
if [ -f "$stamp" ] && [ -f "$image" ] && [ "$(head -n1 "$stamp")" = "$inputs_hash" ]; then
  log "$app up to date"
  echo "$image"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
mkdir -p "$root"
while IFS= read -r pv; do
  [ -n "$pv" ] || continue
  p=${pv%%=*}
  v=${pv#*=}
  deb=$(find "$out/cache/apps" -maxdepth 1 -name "${p}_${v//:/%3a}_*.deb" -print -quit)
  if [ -z "$deb" ]; then
    log "downloading $p $v"
    dl=$(mktemp -d)
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
    (cd "$dl" && apt-get download -q "$p=$v") >&2 || die "apt-get download $p=$v failed"
    mv "$dl"/*.deb "$out/cache/apps/"
    rm -rf "$dl"
    deb=$(find "$out/cache/apps" -maxdepth 1 -name "${p}_${v//:/%3a}_*.deb" -print -quit)
    [ -n "$deb" ] || die "apt-get download did not produce $p $v"
  fi
  dpkg -x "$deb" "$root" || die "dpkg -x $deb failed"
done <<<"$versions"

# What the server does not need at run time.
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian" \
  "$root/usr/share/locale" "$root/usr/lib/systemd" "$root/lib/systemd" "$root/etc/init.d" \
  "$root/etc/logrotate.d" "$root/usr/share/bug"
# Debian's usrmerge layout: /lib and /lib64 are links into /usr.
for d in lib lib64 bin sbin; do
  if [ -d "$root/$d" ] && [ ! -L "$root/$d" ]; then
    mkdir -p "$root/usr/$d"
    cp -a "$root/$d/." "$root/usr/$d/"
    rm -rf "${root:?}/$d"
  fi
done
mkdir -p "$root/usr/lib64"
[ -e "$root/usr/lib64/ld-linux-x86-64.so.2" ] ||
  ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/usr/lib64/ld-linux-x86-64.so.2"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
mkdir -p "$root/usr/bin"
ln -s usr/bin "$root/bin"
if [ "$app" = redis ]; then
  ln -sf redis-check-rdb "$root/usr/bin/redis-server"
fi
[ -x "$root/usr/bin/redis-check-rdb" ] || [ -x "$root/usr/bin/memcached" ] ||
  die "the $app binary is missing from its package"
cp "$busybox_bin" "$root/usr/bin/busybox"
mkdir -p "$root/usr/lib/thaw-modules" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" \
  "$root/etc" "$root/run" "$root/var/lib/$app"
cp "$out/modules/"* "$root/usr/lib/thaw-modules/"
cp "$here/app-init" "$root/init"
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "$app" >"$root/etc/thaw-app"
chmod 755 "$root/init" "$root/usr/bin/busybox"
chmod 1777 "$root/tmp"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
  cpio --reproducible --quiet -o -H newc --owner=0:0) | gzip -n -9 >"$tmp/app.img" ||
  die "creating the initramfs failed"
mv -f "$tmp/app.img" "$image"
printf '%s\n%s\n' "$inputs_hash" "$inputs" >"$stamp"
log "built $app: $(stat -c %s "$image") bytes"
echo "$image"
