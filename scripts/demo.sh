#!/usr/bin/env bash
# Set everything up, start Azurite on 127.0.0.1, back up a directory (default: a generated sample
# site), show the recorded status and restore the run, all before Azurite stops with the script.
# Usage: scripts/demo.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SRC=${1:-}
if [ -z "$SRC" ]; then
  SRC=.demo/site
  mkdir -p "$SRC/css" "$SRC/img" "$SRC/blog/2026"
  echo '<html><body>Hello</body></html>' > "$SRC/index.html"
  echo 'body { font-family: sans-serif }' > "$SRC/css/site.css"
  for i in $(seq 1 200); do head -c 20000 /dev/urandom > "$SRC/img/photo-$i.jpg"; done
  for i in $(seq 1 50); do echo "post $i" > "$SRC/blog/2026/post-$i.md"; done
fi
PORT=${AZURITE_PORT:-10000}
.venv/bin/python tests/azurite.py .demo/azurite "$PORT" > .demo/azurite.out &
AZURITE=$!
trap 'kill $AZURITE 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do [ -s .demo/azurite.out ] && break; sleep 0.2; done
if [ ! -s .demo/azurite.out ]; then
  echo "demo: Azurite did not start on 127.0.0.1:$PORT (port in use? set AZURITE_PORT); see .demo/azurite/azurite.log" >&2
  exit 1
fi
export AZURE_STORAGE_CONNECTION_STRING=$(head -n 1 .demo/azurite.out)
export SITEBACKUP_STATE_DIR=${SITEBACKUP_STATE_DIR:-$PWD/.demo/state}
set +e
.venv/bin/sitebackup "$SRC" --container demo     # a live progress bar on a terminal
CODE=$?
set -e
ID=$(.venv/bin/sitebackup list --json --limit 1 | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["instance_id"])')
echo
.venv/bin/sitebackup status "$ID"
echo "backup exit code: $CODE"
# the restore runs here, while Azurite is up: it stops with this script, and with it every blob of the demo
rm -rf .demo/restored
.venv/bin/sitebackup restore "$ID" .demo/restored --quiet && diff -r "$SRC" .demo/restored \
  && echo "restored $ID into .demo/restored: the same files as $SRC"
echo "Azurite stops with the demo; what the state directory recorded stays: try"
echo "  SITEBACKUP_STATE_DIR=$SITEBACKUP_STATE_DIR .venv/bin/sitebackup list"
