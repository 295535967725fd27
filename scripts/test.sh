#!/usr/bin/env bash
# Install everything, then run the lint gates and the whole test suite (kernel tests included).
# With CI=true a kernel test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff"
.venv/bin/ruff check src tests benchmarks build_bpf.py
.venv/bin/ruff format --check src tests benchmarks build_bpf.py
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
