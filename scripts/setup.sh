#!/usr/bin/env bash
# Create .venv in the checkout and install visionbatch with its test extras.
# Where no NVIDIA GPU is visible, torch is pinned to the CPU build this machine
# carries (an unpinned torch pulls a multi-GB CUDA build); override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# uv installs the wheels in parallel where pip unpacks them one at a time (~60 s of
# the ~85 s this script took here); pip where uv cannot be had. uv does not read pip's
# configuration: the indexes, wheel folders and constraints pip is set up with on this
# machine (pip.conf, PIP_* variables) are handed to it, and it picks across them as pip
# does (the newest that fits, not the first index's). Neither byte-compiles (pip would,
# one module at a time): compileall does it below on every core.
PIP=(.venv/bin/python -m pip install -q --no-compile)
UV=()
if [ "${VISIONBATCH_SETUP_PIP:-0}" != 1 ] && .venv/bin/python -m pip install -q uv >/dev/null 2>&1 \
    && SOURCES=$(.venv/bin/python scripts/uv_options_from_pip.py); then
  UV_OPTIONS=()
  [ -z "$SOURCES" ] || mapfile -t UV_OPTIONS <<< "$SOURCES"  # one word a line
  UV=(.venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match "${UV_OPTIONS[@]}")
fi
install() {
  if [ ${#UV[@]} -gt 0 ] && "${UV[@]}" "$@"; then return; fi
  [ ${#UV[@]} -eq 0 ] || echo "setup: uv could not install $*; pip does"
  "${PIP[@]}" "$@"
}
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC=${TORCH_SPEC:-"torch>=2.2,<3"}
  else
    TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0"}
  fi
  echo "setup: installing $TORCH_SPEC"
  install "$TORCH_SPEC"
fi
# OpenVINO (the certified CPU runtime) ships wheels for x86-64 and ARM64 only.
case "$(uname -m)" in
  x86_64|amd64|aarch64|arm64) EXTRAS="test,lite0,openvino,duplicates" ;;
  *) EXTRAS="test,lite0,duplicates" ;;
esac
install -e ".[$EXTRAS]"
# Byte-compile what was installed, in parallel (files already compiled are skipped).
# Python would compile on first import, but not where PYTHONDONTWRITEBYTECODE is set (as
# on this project's machines): there every process compiled torch and transformers
# from source again, ~4 s of CPU each (a 120-image job took 14.4 s instead of 7.5).
# -qq: a file that does not compile on this Python (torch ships a 3.12-only test
# helper) is one it never imports.
.venv/bin/python -m compileall -qq -j 0 .venv/lib/python*/site-packages src >/dev/null || true
echo "setup: ready (.venv/bin/visionbatch)"
