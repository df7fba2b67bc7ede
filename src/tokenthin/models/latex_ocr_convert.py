"""latex-ocr-junia's checkpoint -> ``VisionEncoderDecoderModel`` tensors, and their on-disk cache.

Part of :mod:`tokenthin.models.latex_ocr` (import the names from there).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tokenthin.models.cache import cache_file, cached_tensors, source_key
from tokenthin.models.latex_ocr_assets import CHECKPOINT, VERSION, LatexOcrConversionError, asset_path

# bump when the converted tensors change: invalidates old caches
_FORMAT_VERSION = 1
_POSITION_OFFSET = 2  # MBartLearnedPositionalEmbedding looks up position_ids + 2


def cache_path(source: Path | None = None) -> Path:
    """Where the converted tensors of ``source`` (default: the installed ``best.pt``) are cached.

    Under :func:`tokenthin.models.cache.cache_dir` (``$TOKENTHIN_CACHE`` first); the name holds the
    tokenthin version, the conversion format and a hash of the checkpoint's size and mtime.
    """
    source = asset_path() if source is None else Path(source)
    return cache_file(f"latex_ocr_junia-{VERSION}", _FORMAT_VERSION, source)


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


def converted_tensors(cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted tensors: from the cache when it is valid, else converted from ``best.pt`` (and cached)."""
    source = asset_path()
    metadata = {
        "format": str(_FORMAT_VERSION),
        "source": source_key(source),
        "origin": f"latex-ocr-junia {VERSION} assets/{CHECKPOINT}",
        "licence": "none declared by latex-ocr-junia 0.1.3; not for redistribution",
    }
    return cached_tensors(
        cache_path(source), metadata, lambda: convert_state_dict(_load_checkpoint(source)), "latex-ocr", cache
    )
