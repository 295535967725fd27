#!/usr/bin/env bash
# Runs INSIDE a kernel-matrix guest (virtme-ng, the host's root shared read-only over 9p):
#   guest.sh OUT_DIR RUNTIME TIMEOUT_SECS       (the pytest node ids are in OUT_DIR/tests)
# RUNTIME.tar holds the Python runtime and checkout files to serve from RAM, RUNTIME.paths their
# directories (see kernel-matrix.sh).
# Prepares the guest the way a production node looks -- cgroup2 ONLY at /sys/fs/cgroup, tracefs,
# bpffs, a block-backed scratch file system for page-cache tests -- then runs the kernel tests with CI=true
# (a test that would skip fails). The exit status and the junit report are written to OUT_DIR,
# a directory shared read-write with the host: virtme-ng does not pass the guest's exit code on.
set -uo pipefail
out=${1:?out dir}
runtime=${2:?runtime archive}
budget=${3:?timeout}
mapfile -t tests <"$out/tests"
repo=$(cd "$(dirname "$0")/../.." && pwd)
echo 125 >"$out/rc"  # "never finished" until the tests ran

fail() { echo "guest: $*" >&2; echo 124 >"$out/rc"; exit 1; }

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "guest: kernel $(uname -r), $(nproc) vCPU, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"

# --- cgroup2 only ---------------------------------------------------------------------------
if ! mountpoint -q /sys/fs/cgroup; then
  mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || fail "cannot mount cgroup2"
fi
[[ $(stat -f -c %T /sys/fs/cgroup) == cgroup2fs ]] || fail "/sys/fs/cgroup is not cgroup2"
if awk '$3 == "cgroup" {found=1} END {exit !found}' /proc/mounts; then
  fail "a cgroup v1 hierarchy is mounted: the guest must be pure cgroup v2"
fi
echo "guest: cgroup2 only; controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"

# --- tracefs, bpffs, debugfs -------------------------------------------------------------------
[[ -d /sys/kernel/tracing/events ]] || mount -t tracefs nodev /sys/kernel/tracing \
  || fail "cannot mount tracefs"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || fail "cannot mount bpffs"
[[ -e /sys/kernel/btf/vmlinux ]] || fail "kernel without BTF"

# --- modules the tests rely on (built in on some kernels, so failures are not fatal here) ------
for m in fuse loop veth sch_netem nf_tables ext4; do
  modprobe -q "$m" 2>/dev/null || true
done
[[ -e /dev/fuse ]] || fail "no /dev/fuse after modprobe fuse"
mountpoint -q /sys/fs/fuse/connections || mount -t fusectl none /sys/fs/fuse/connections || true

# --- scratch file system on a block device, so page-cache thrash reclaims and refaults -------
# (ext4 on a loop device; its backing file lives in the guest's RAM, the ext4 page cache is what
# the tests' cgroups are charged for.)
scratch=/run/tapio-scratch
mkdir -p "$scratch"
truncate -s 512M /run/tapio-scratch.img
mkfs.ext4 -q -F /run/tapio-scratch.img >/dev/null || fail "mkfs.ext4 failed"
mount -o loop /run/tapio-scratch.img "$scratch" || fail "cannot mount the scratch file system"
export TAPIO_TEST_SCRATCH=$scratch

# --- the Python runtime from RAM ----------------------------------------------------------
t0=$(date +%s)
mkdir -p /run/tapio-rt
mount -t tmpfs -o size=1200m tapio-rt /run/tapio-rt || fail "cannot mount the runtime tmpfs"
tar -xf "$runtime.tar" -C /run/tapio-rt 2>/dev/null || fail "cannot unpack $runtime.tar"
while read -r p; do
  mount --bind "/run/tapio-rt$p" "$p" || fail "cannot mount the runtime over $p"
done <"$runtime.paths"
echo "guest: Python runtime in RAM after $(( $(date +%s) - t0 )) s"

# --- the tests ------------------------------------------------------------------------------
export CI=true
export TAPIO_MATRIX_REPORT=$out
export PYTHONDONTWRITEBYTECODE=1
cd "$repo"
start=$(date +%s)
timeout --signal=TERM --kill-after=30 "$budget" \
  "$repo/.venv/bin/python" -m pytest -p no:cacheprovider -q -rA --durations=0 \
  --junitxml="$out/junit.xml" "${tests[@]}"
rc=$?
echo "guest: pytest exit $rc after $(( $(date +%s) - start )) s"
sync
echo "$rc" >"$out/rc"
exit "$rc"
