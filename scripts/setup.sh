#!/usr/bin/env bash
# Creates .venv with lowcomm installed in editable mode, its test and demo extras, and dev tools.
# Idempotent: a second run with unchanged pyproject.toml and this script returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LOWCOMM_VENV:-.venv}
# Prefer the oldest supported Python the machine has: it is the one CI and most users run.
PYTHON=${LOWCOMM_PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)}
stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $VENV/bin/lowcomm ]]; then
  exit 0
fi

echo "lowcomm setup: creating $VENV with $PYTHON" >&2
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first, pinned to a CPU build: a bare "torch" from PyPI is a multi-GB CUDA build.
# LOWCOMM_TORCH_SPEC overrides (for example "torch==2.11.0" where CUDA is wanted).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [[ -n ${LOWCOMM_TORCH_SPEC:-} ]]; then
    "${pip[@]}" "$LOWCOMM_TORCH_SPEC"
  elif ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    "${pip[@]}" "torch==2.13.0"          # the CPU build that lies on this kind of machine's disk
  else
    "${pip[@]}" "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[test,dev,demo]"
echo "$want" >"$stamp"
echo "lowcomm setup: done" >&2
