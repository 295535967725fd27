#!/usr/bin/env bash
# Install everything Tapio needs on a Debian/Ubuntu host, build the BPF objects, and create the
# Python environment in .venv. Idempotent; run as root.
#   scripts/setup.sh          runtime + build (agent)
#   scripts/setup.sh --test   also the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ $(id -u) -ne 0 ]]; then
  echo "setup.sh: run as root (it installs packages and the agent needs CAP_BPF)" >&2
  exit 1
fi

pkgs=(clang llvm libbpf-dev libbpf1 bpftool gcc libc6-dev python3 python3-venv python3-dev
      iproute2 util-linux)
if [[ $want_test -eq 1 ]]; then
  pkgs+=(nftables iptables fuse3 libfuse3-dev pkg-config kmod procps)
  # scripts/image-test.sh: build and run the images (runc: crun refuses hybrid cgroup hosts).
  pkgs+=(podman runc containerd debootstrap)
  pkgs+=(nats-server)  # the controller forwarding tests start a real JetStream server
  pkgs+=(prometheus)   # tests/unit/test_promtool.py: `promtool check metrics` on both expositions
fi
source scripts/lib/debs.sh
ensure_debs "${pkgs[@]}"

# The manifest tests render with `kubectl kustomize`; Debian has no kubectl package, so it must
# come with the machine (it fails those tests, not this script, when missing).
if [[ $want_test -eq 1 ]] && ! command -v kubectl >/dev/null; then
  echo "setup.sh: kubectl not found: tests/unit/deploy/test_manifests.py will fail" >&2
fi

# tracefs: the agent mounts it itself too, but the tests use it directly.
if [[ ! -d /sys/kernel/tracing/events ]]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# Debian's interpreter runs the drain loops 1.3-1.6x faster than a source build.
PY=${TAPIO_PYTHON:-}
if [[ -z "$PY" ]]; then
  if /usr/bin/python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY=/usr/bin/python3
  else
    PY=python3
  fi
fi
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [[ $want_test -eq 1 ]]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi

.venv/bin/python build_bpf.py
