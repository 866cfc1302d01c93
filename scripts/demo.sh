#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job: `lowcomm demo` (extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${LOWCOMM_VENV:-.venv}/bin/lowcomm" demo "$@"
