#!/usr/bin/env bash
# One command to install everything: a virtual environment in .venv with the pinned torch
# 2.14.1 (CUDA 13.0 build), the fastshift package with its compiled extension fastshift._C,
# and the test extras. Re-running it updates the environment in place.
#
#   bash scripts/install.sh            # then: source .venv/bin/activate
#
# Environment: PYTHON (default python3), VENV (default .venv), FASTSHIFT_NO_CUDA=1 to skip the
# CUDA sources, FASTSHIFT_FORCE_CUDA=1 to require them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# torch first: the extension builds against it without build isolation.
"${PIP[@]}" install -c constraints.txt "torch==2.14.1" setuptools wheel ninja numpy
# The toolkit's standard link; a wrapper nvcc on PATH misleads torch's own guess.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
"${PIP[@]}" install -c constraints.txt --no-build-isolation -e ".[test]"
"$VENV/bin/python" -m fastshift.info
