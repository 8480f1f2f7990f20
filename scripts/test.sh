#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh tests/unit -x` or `bash scripts/test.sh -m slow`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

echo "==> .venv/bin/python -m pytest -q $*"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests, which counts as a failure here" >&2
fi
exit "$status"
