#!/usr/bin/env bash
# Fetch one Debian kernel into the kernel cache, ready for virtme-ng:
#   scripts/kmatrix/fetch-kernel.sh 5.10|6.1|6.12
# prints the kernel's directory (it holds vmlinuz, lib/modules/<release>/ and a "release" file).
#
# Why this shape: the matrix boots Debian's own generic kernels (they carry the 9p modules the
# guest's root file system needs). They come from the bullseye, bookworm and trixie suites through
# a PRIVATE apt state (own sources list, lists, cache and an empty dpkg status), so the machine's
# own apt configuration and package database are never read or changed. The cache is shared by
# every checkout on the machine: the fetch holds an flock on a lock file in the cache and is
# idempotent (a finished kernel has a "release" stamp written last; an interrupted one is redone).
#
# Environment: TAPIO_KERNEL_CACHE (default /var/cache/tapio/kernels),
#              TAPIO_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

tag=${1:?usage: fetch-kernel.sh 5.10|6.1|6.12}
case "$tag" in
  5.10) suite=bullseye ;;
  6.1)  suite=bookworm ;;
  6.12) suite=trixie ;;
  *) echo "fetch-kernel.sh: unknown kernel tag '$tag' (5.10, 6.1 or 6.12)" >&2; exit 2 ;;
esac
cache=${TAPIO_KERNEL_CACHE:-/var/cache/tapio/kernels}
mirror=${TAPIO_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
dest="$cache/$tag"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [[ -s "$dest/release" && -f "$dest/vmlinuz" ]]; then
  echo "$dest"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb depmod; do
  command -v "$tool" >/dev/null || { echo "fetch-kernel.sh: $tool not found" >&2; exit 1; }
done

# --- private apt state, one per suite ------------------------------------------------------
apt_root="$cache/.apt/$suite"
mkdir -p "$apt_root"/{etc/apt.conf.d,etc/preferences.d,etc/sources.list.d,lists/partial} \
         "$apt_root"/cache/archives/partial "$apt_root/debs"
: >"$apt_root/status"
cat >"$apt_root/etc/sources.list" <<SRC
deb [signed-by=$keyring] $mirror $suite main
deb [signed-by=$keyring] ${mirror%/debian}/debian-security $suite-security main
SRC
cat >"$apt_root/apt.conf" <<CONF
Dir::Etc "$apt_root/etc";
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$apt_root/etc/apt.conf.d";
Dir::Etc::sourcelist "$apt_root/etc/sources.list";
Dir::Etc::sourceparts "$apt_root/etc/sources.list.d";
Dir::Etc::preferences "$apt_root/etc/preferences";
Dir::Etc::preferencesparts "$apt_root/etc/preferences.d";
Dir::State "$apt_root";
Dir::State::lists "$apt_root/lists";
Dir::State::status "$apt_root/status";
Dir::Cache "$apt_root/cache";
Dir::Cache::archives "$apt_root/cache/archives";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
Acquire::Retries "3";
APT::Sandbox::User "root";
CONF
apt_opts=(-q)
export APT_CONFIG="$apt_root/apt.conf"

echo "fetch-kernel.sh: $tag: updating the private package lists of $suite" >&2
apt-get "${apt_opts[@]}" update >&2

# The generic metapackage names the current ABI's signed image; its unsigned twin is the same
# kernel without the Secure Boot wrapper (and the one that carries vmlinuz unwrapped).
signed=$(apt-cache "${apt_opts[@]}" depends linux-image-amd64 \
  | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
if [[ -z "$signed" ]]; then
  echo "fetch-kernel.sh: $suite: linux-image-amd64 names no kernel image" >&2
  exit 1
fi
pkg="${signed}-unsigned"
echo "fetch-kernel.sh: $tag: downloading $pkg" >&2
rm -f "$apt_root"/debs/*.deb
(cd "$apt_root/debs" && apt-get "${apt_opts[@]}" download "$pkg" >&2)
deb=$(ls "$apt_root"/debs/*.deb)

# --- extract into a fresh directory, then swap it in -------------------------------------------
work="$cache/.$tag.partial"
rm -rf "$work"
mkdir -p "$work/root"
dpkg-deb -x "$deb" "$work/root"
# trixie installs modules under usr/lib/modules (merged /usr); virtme-ng and depmod look in
# lib/modules.
if [[ ! -d "$work/root/lib/modules" && -d "$work/root/usr/lib/modules" ]]; then
  ln -s usr/lib "$work/root/lib"
fi
release=$(ls "$work/root/lib/modules/")
[[ $(wc -w <<<"$release") -eq 1 ]] || { echo "fetch-kernel.sh: $deb: not one kernel release: $release" >&2; exit 1; }
depmod -b "$work/root" "$release"
vmlinuz="$work/root/boot/vmlinuz-$release"
[[ -f "$vmlinuz" ]] || { echo "fetch-kernel.sh: $deb has no boot/vmlinuz-$release" >&2; exit 1; }
ln -s "root/boot/vmlinuz-$release" "$work/vmlinuz"
ln -s "root/lib/modules" "$work/modules"
echo "$(basename "$deb")" >"$work/package"
echo "$release" >"$work/release.tmp"
mv "$work/release.tmp" "$work/release"
rm -rf "$dest"
mv "$work" "$dest"
rm -f "$deb"
echo "$dest"
