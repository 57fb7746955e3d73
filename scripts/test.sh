#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
#
# Without arguments the suite runs in two pytest processes: the Triton-interpreter kernel suite
# (tests/test_pseudo_mask_attention.py) gets a process of its own. In full single-process runs
# it twice crashed inside the interpreted kernel's op call after the engine tests had run
# (a segfault / "vector::reserve" from native code) while passing alone every time; until the
# cause is found, isolation keeps one suite's process state from reaching the other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

run_pytest() {
  set +e
  python -m pytest "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    return 1
  fi
  return "$rc"
}

if [ "$#" -gt 0 ] && [ "$*" != "-q" ]; then
  run_pytest "$@"
else
  KERNEL_SUITE=tests/test_pseudo_mask_attention.py
  run_pytest "$@" --ignore="$KERNEL_SUITE"
  run_pytest "$@" "$KERNEL_SUITE"
fi
