#!/usr/bin/env bash
# Set everything up, then run the test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k backup -x
#
# Two tiers:
#   scripts/test.sh          everything not marked `slow`: end to end through real `sitebackup` processes and
#                            a real Azurite the suite starts on 127.0.0.1 (add `-m slow` for the long scale runs)
#   scripts/test.sh --fast   only tests that start no process and no Azurite (pure logic, the embedded backend
#                            in-process, orchestrators replayed with fake activities), in about a minute.
#                            Tests that start processes leave it by themselves (a fixture that starts Azurite
#                            or a mount, or @pytest.mark.processes); in a fast run, starting a process or
#                            reaching the network beyond loopback fails the test (tests/fast_tier.py).
# Both run on every core (pytest-xdist); most `sitebackup` processes the tests start are forked from a server
# that imported the package once (tests/zygote.py), the rest are real `python -m sitebackup` processes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the layers (pyproject.toml [tool.importlinter]): an upward import or a cycle fails before any test runs
.venv/bin/lint-imports --no-cache
# the types (pyproject.toml [tool.mypy]: strict on the model, workflows, blob, durable): a type error fails too
.venv/bin/mypy
# bytecode once, as an install would: under PYTHONDONTWRITEBYTECODE every `sitebackup` process the tests
# start would compile the package from source again
.venv/bin/python -m compileall -q sitebackup
# one pytest worker per core, at most 4 (pytest-xdist), each with its own Azurite, fork server (tests/zygote.py)
# and port range; SITEBACKUP_TEST_WORKERS=0 runs the tests in this one process
workers=${SITEBACKUP_TEST_WORKERS:-$(nproc)}
[ "$workers" -gt 4 ] && workers=4
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
