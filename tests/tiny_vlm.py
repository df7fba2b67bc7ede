"""Tiny random LLaVA models and prompts (no downloads) for the vision-language tests."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_TOKEN = 99  # the image placeholder id; generation suppresses it (a random model may emit it)
VOCAB = 100
IMG = 32
PATCH = 8
TPI = (IMG // PATCH) ** 2  # visual tokens per image (16)


def llava(attn: str = "sdpa", *, vision_layers: int = 3, text_layers: int = 4, seed: int = 0) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMG,
        patch_size=PATCH,
        projection_dim=32,
    )
    tc = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        image_seq_length=TPI,
        attn_implementation=attn,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def prompt(before: list[int], after: list[int]) -> list[int]:
    return [1, *before, *([IMAGE_TOKEN] * TPI), *after]


PROMPTS = [prompt([5], [7, 8, 9]), prompt([5, 6, 11, 12], [7]), prompt([], [3, 4, 10, 12, 13, 14])]


def batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask (the layout generation expects)."""
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return ids, mask


def pixels(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, pv: torch.Tensor, new: int = 6, **kw):
    """Greedy generation returning (new tokens, per-step logits (B, new, V))."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pv,
        max_new_tokens=new,
        do_sample=False,
        suppress_tokens=[IMAGE_TOKEN],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kw,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)
