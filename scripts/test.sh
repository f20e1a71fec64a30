#!/usr/bin/env bash
# Set everything up in .venv (torch==2.13.0 first: it is the local CPU wheel), then lint, type-check
# and run the fast test suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[dev,flower]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict protocols
.venv/bin/python -m pytest -q "$@"
