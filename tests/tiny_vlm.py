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


# ----- Qwen2-VL / Qwen2.5-VL -----
Q_PATCH = 4  # vision patch; 2x2 patches merge into one visual token, so an image of (8h x 8w) px gives h*w tokens
Q_START, Q_END = 97, 96


def qwen(version: str = "2", attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
    )
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=98, vision_start_token_id=Q_START, vision_end_token_id=Q_END)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            patch_size=Q_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            mlp_ratio=2,
        )
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text, attn_implementation=attn, **ids)
        return Qwen2VLForConditionalGeneration(cfg).eval()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=2,
        hidden_size=32,
        out_hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=Q_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, attn_implementation=attn, **ids)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


# (text before, image grid in merged tokens (h, w), text after): three prompts, three image sizes
Q_PROMPTS = [([5], (2, 2), [7, 8, 9]), ([5, 6, 11, 12], (2, 3), [7]), ([], (3, 2), [3, 4, 10, 12, 13, 14])]


def qwen_inputs(prompts=Q_PROMPTS, seed: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded input_ids/attention_mask/mm_token_type_ids plus packed patches and image_grid_thw."""
    g = torch.Generator().manual_seed(seed)
    seqs, thw, patches = [], [], []
    for before, (h, w), after in prompts:
        seqs.append([1, *before, Q_START, *([IMAGE_TOKEN] * (h * w)), Q_END, *after])
        thw.append([1, 2 * h, 2 * w])
        patches.append(torch.randn(4 * h * w, 3 * 2 * Q_PATCH * Q_PATCH, generator=g))
    ids, mask = batch(seqs)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
        "pixel_values": torch.cat(patches),
        "image_grid_thw": torch.tensor(thw),
    }


def qwen_single(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample i of a qwen_inputs batch, unpadded."""
    keep = inputs["attention_mask"][i].bool()
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    start = sum(sizes[:i])
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": None,
        "mm_token_type_ids": inputs["mm_token_type_ids"][i : i + 1, keep],
        "pixel_values": inputs["pixel_values"][start : start + sizes[i]],
        "image_grid_thw": inputs["image_grid_thw"][i : i + 1],
    }


def qgenerate(model: nn.Module, inputs: dict[str, torch.Tensor], new: int = 6, **kw):
    out = model.generate(
        **{k: v for k, v in inputs.items() if v is not None},
        max_new_tokens=new,
        do_sample=False,
        suppress_tokens=[IMAGE_TOKEN, Q_START, Q_END],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kw,
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


# ----- LLaVA-NeXT (AnyRes) -----
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def llava_next(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMG,
        patch_size=PATCH,
        projection_dim=32,
    )
    tc = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
    )
    cfg = LlavaNextConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        image_grid_pinpoints=PINPOINTS,
        attn_implementation=attn,
    )
    return LlavaNextForConditionalGeneration(cfg).eval()


# (text before, original image size (h, w), text after): three sizes give three token counts
N_PROMPTS = [([5], (40, 70), [7, 8, 9]), ([5, 6, 11, 12], (70, 40), [7]), ([], (30, 30), [3, 4, 10, 12])]


def next_inputs(model: nn.Module, prompts=N_PROMPTS, seed: int = 3) -> dict[str, torch.Tensor]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([s for _, s, _ in prompts])
    crops = [image_size_to_num_patches(s.tolist(), PINPOINTS, IMG) for s in sizes]
    pv = torch.zeros(len(prompts), max(crops), 3, IMG, IMG)
    for i, n in enumerate(crops):
        pv[i, :n] = torch.randn(n, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True).pooler_output
    seqs = [[1, *b, *([IMAGE_TOKEN] * f.shape[0]), *a] for (b, _, a), f in zip(prompts, feats)]
    ids, mask = batch(seqs)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": sizes}


def next_single(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": None,
        "pixel_values": inputs["pixel_values"][i : i + 1],
        "image_sizes": inputs["image_sizes"][i : i + 1],
    }


def ngenerate(model: nn.Module, inputs: dict[str, torch.Tensor], new: int = 6, **kw):
    out = model.generate(
        **{k: v for k, v in inputs.items() if v is not None},
        max_new_tokens=new,
        do_sample=False,
        suppress_tokens=[IMAGE_TOKEN],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kw,
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)
