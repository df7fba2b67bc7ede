#!/usr/bin/env bash
# Run the adapter tests against another transformers release in its own venv (default: 5.17.0, the last release
# before DINOv2's layers took an attention mask, so it exercises the attention-function seam; its generate() still
# passes pixel_values, past_key_values and cache_position, which the vision-language seams must handle too).
# Usage: bash scripts/compat.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-5.17.0}"
venv=".venv-tf-$version"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "transformers==$version" pytest hypothesis pillow numpy tqdm typer
PYTHONPATH=src "$venv/bin/python" -m pytest -p no:cacheprovider tests/test_matrix.py tests/test_api.py \
  tests/test_flops.py tests/test_methods_merge_family.py tests/test_methods_cls_prune.py \
  tests/test_vlm.py tests/test_vlm_qwen.py tests/test_vlm_next.py tests/test_vlm_tower.py tests/test_methods_aim.py \
  tests/test_methods_todre.py tests/test_host_contract.py tests/test_block_site.py tests/test_adapters_hf_text.py
