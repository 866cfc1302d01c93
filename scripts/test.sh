#!/usr/bin/env bash
# Sets up .venv if needed, then runs what CI runs: format and lint checks, type checks, the tests.
# Extra arguments go to pytest (for example: scripts/test.sh tests/comm -x).
# LOWCOMM_SLOW=1 also runs the soak tests marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
V=${LOWCOMM_VENV:-.venv}/bin

paths=(); for d in lowcomm tests benchmarks examples; do [[ -d $d ]] && paths+=("$d"); done
echo "== ruff format --check" && "$V/ruff" format --check --quiet "${paths[@]}"
echo "== ruff check" && "$V/ruff" check --quiet "${paths[@]}"
echo "== mypy" && "$V/mypy" --no-error-summary
marker=(-m "not slow and not gpu")
[[ ${LOWCOMM_SLOW:-0} == 1 ]] && marker=(-m "not gpu")
echo "== pytest"
# pytest exits non-zero when a test fails and (exit 5) when no test ran: both fail this script.
exec "$V/python" -m pytest "${marker[@]}" "$@"
