#!/usr/bin/env bash
# Set everything up, then run the test suite. The suite starts its own Azurite on 127.0.0.1.
# Extra arguments go to pytest, e.g. scripts/test.sh -k backup -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the layers (pyproject.toml [tool.importlinter]): an upward import or a cycle fails before any test runs
.venv/bin/lint-imports --no-cache
# bytecode once, as an install would: under PYTHONDONTWRITEBYTECODE every `sitebackup` process the tests
# start would compile the package from source again
.venv/bin/python -m compileall -q sitebackup
exec .venv/bin/python -m pytest -q "$@"
