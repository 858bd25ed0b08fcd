#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then ruff, mypy --strict and the whole pytest
# suite (real packer, qemu, sshd, HTTP servers; libvirtd is started by the tests if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"
ruff check osimage tests bench build.py
echo "== mypy --strict"
mypy
echo "== pytest"
exec python3 -m pytest -ra --durations=30 "$@"
