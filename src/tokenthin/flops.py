"""Analytic FLOPs of a ViT-style encoder for a given number of tokens per layer.

Counted like ``torch.utils.flop_counter`` counts them: 2 FLOPs per multiply-add of every matrix product
(patch-embedding convolution, q/k/v/out projections, Q K^T and A V, MLP) and of the pooling head. Layer norms,
activations, softmax and tokenthin's own matching/selection are not counted (their share is reported by the
benchmark as measured time instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderDims:
    hidden: int
    mlp_hidden: int
    mlp_mats: int  # 2 for fc1/fc2, 3 for SwiGLU (gate, up, down)
    num_layers: int
    patch: tuple[int, int]
    channels: int
    num_protected: int
    head: str = "none"  # "none" | "dense" (ViT pooler on [CLS]) | "map" (SigLIP attention-pooling head)
    head_mlp_hidden: int = 0


def layer_flops(n: int, d: EncoderDims) -> int:
    h = d.hidden
    proj = 2 * n * h * h * 4
    attn = 2 * 2 * n * n * h
    mlp = 2 * n * h * d.mlp_hidden * d.mlp_mats
    return proj + attn + mlp


def embed_flops(n_patches: int, d: EncoderDims) -> int:
    return 2 * n_patches * d.hidden * d.channels * d.patch[0] * d.patch[1]


def head_flops(n: int, d: EncoderDims) -> int:
    h = d.hidden
    if d.head == "dense":
        return 2 * h * h
    if d.head == "map":  # one probe query: q/out projections, k/v over n tokens, attention, MLP
        return 2 * h * h * 2 + 2 * n * h * 2 * h + 2 * 2 * n * h + 2 * h * d.head_mlp_hidden * 2
    return 0


def encoder_flops(tokens_per_layer: Sequence[int], n_patches: int, d: EncoderDims, n_out: int | None = None) -> int:
    """FLOPs for one image: embedding + every layer with the tokens entering it + head on ``n_out`` tokens
    (default: the last layer's count)."""
    if len(tokens_per_layer) != d.num_layers:
        raise ValueError(f"need {d.num_layers} token counts, got {len(tokens_per_layer)}")
    last = tokens_per_layer[-1] if n_out is None else n_out
    return embed_flops(n_patches, d) + sum(layer_flops(n, d) for n in tokens_per_layer) + head_flops(last, d)


@dataclass(frozen=True)
class LMDims:
    """A decoder-only language model's shape, for its prefill FLOPs (a vision-language model's language side)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_hidden: int
    num_layers: int
    mlp_mats: int = 3  # SwiGLU (gate, up, down), as LLaMA / Mistral / Qwen2


def lm_layer_flops(n: int, d: LMDims) -> int:
    """One decoder layer on ``n`` tokens at prefill: q / o projections, grouped k / v projections, Q K^T and A V
    (over the whole n x n map, causal or not, as ``torch.utils.flop_counter`` counts eager attention's matmuls),
    the MLP."""
    q = d.heads * d.head_dim
    kv = d.kv_heads * d.head_dim
    proj = 2 * n * d.hidden * q * 2 + 2 * n * d.hidden * kv * 2
    attn = 2 * 2 * n * n * q
    mlp = 2 * n * d.hidden * d.mlp_hidden * d.mlp_mats
    return proj + attn + mlp


def lm_prefill_flops(tokens_per_layer: Sequence[int], d: LMDims) -> int:
    """The decoder layers' FLOPs for one prompt with ``tokens_per_layer[j]`` tokens entering layer ``j`` (the
    embedding lookup, final norm and head are the same whatever is reduced and not counted)."""
    if len(tokens_per_layer) != d.num_layers:
        raise ValueError(f"need {d.num_layers} token counts, got {len(tokens_per_layer)}")
    return sum(lm_layer_flops(n, d) for n in tokens_per_layer)
