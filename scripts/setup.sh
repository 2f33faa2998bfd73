#!/usr/bin/env bash
# Create .venv with sitebackup and its test dependencies, and install Azurite from package.json.
# Needs only Python >= 3.10, Node 20 and npm. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's build chatter goes to a log; it is shown only when the install fails
if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
       .venv/bin/python -m pip install --quiet -e '.[test]'; } > .venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  exit 1
fi
if [ ! -x node_modules/.bin/azurite-blob ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
