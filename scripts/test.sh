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
# On N workers (pytest-xdist): a file's tests (or a group's, tests/conftest.py GROUPS) stay on
# one worker so module- and session-scoped fixtures are made once; the slow files start first
# (conftest SLOW_FIRST), which --no-loadscope-reorder keeps. 3 workers on 2 cores: tests also
# wait on I/O and sleeps, but each TCG VM wants a whole core, and with 4 at once on a loaded
# machine smoke guests missed their SSH timeout. OSIMAGE_TEST_WORKERS overrides the count.
# The per-test hang guard (pyproject: 300 s) doubled: with cores shared, a module fixture of
# two smoke builds (36 s alone) passed 300 s on a loaded machine.
exec python3 -m pytest -n "${OSIMAGE_TEST_WORKERS:-3}" --dist loadgroup --no-loadscope-reorder \
    --timeout 600 -ra --durations=30 "$@"
