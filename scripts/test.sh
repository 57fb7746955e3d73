#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff) and run the test suite in one pytest process.
# Extra arguments go to pytest (and skip the lint when they select tests: `scripts/test.sh tests/x.py -k y`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

if [ "$#" -eq 0 ] || [ "$*" = "-q" ]; then
  echo "[test] ruff check"
  ruff check .
fi

set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
