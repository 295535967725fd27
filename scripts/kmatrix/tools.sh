#!/usr/bin/env bash
# The kernel matrix's tools: QEMU and a static busybox (virtme-ng's initramfs) from Debian,
# e2fsprogs for the guest's scratch disk, and virtme-ng from PyPI in its own venv
# (.venv-vng: a test-infrastructure tool, kept out of the agent's environment). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
pkgs=(qemu-system-x86 busybox-static e2fsprogs file kmod)
source scripts/lib/debs.sh
ensure_debs "${pkgs[@]}"
VNG_VERSION=1.42
if ! .venv-vng/bin/vng --version 2>/dev/null | grep -q "$VNG_VERSION"; then
  /usr/bin/python3 -m venv .venv-vng
  .venv-vng/bin/python -m pip install -q "virtme-ng==$VNG_VERSION"
fi
