#!/usr/bin/env bash
# Set everything up in .venv (torch==2.13.0 first: it is the local CPU wheel), then lint, type-check
# and run both test tiers: the fast one (plain `pytest`, minutes) first, then the integration tier
# (real SuperLink deployments and Ray simulation, `-m integration`). This is the README's test command
# and what CI runs. Arguments go to both pytest runs (paths, -x, -k ...); a -m among them replaces
# the tier's own selection. Both tiers run on PYTEST_WORKERS pytest-xdist workers (default 2; 0 runs
# in this process): tests share no state beyond their own tmp_path.
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
WORKERS="${PYTEST_WORKERS:-2}"
.venv/bin/python -m pytest -q -n "$WORKERS" "$@"
# Slow tests stay opt-in (-m slow) in both tiers. Exit status 5 is "nothing selected" (e.g. a path
# holding no integration test): not a failure.
status=0
.venv/bin/python -m pytest -q -n "$WORKERS" -m 'integration and not slow' "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi
