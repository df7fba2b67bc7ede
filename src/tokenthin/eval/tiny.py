"""Tiny random checkpoints that look like real ones: the published configs of LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and
Qwen2.5-VL at tiny widths and depths, saved with ``save_pretrained`` together with their processors (image processor,
a tiny offline tokenizer with the family's special tokens and chat template), so that ``AutoProcessor`` /
``AutoModelForImageTextToText.from_pretrained(DIR)`` load them like the real thing.

What is kept from the real checkpoints (so the token layout is the real one): LLaVA-1.5: CLIP ViT-L/14-336
(patch 14 at 336 px: 576 visual tokens per image), ``vision_feature_layer=-2``, ``vision_feature_select_strategy=
"default"`` (drop [CLS]), a 2-layer GELU projector, CLIP's mean/std and resize + centre crop. LLaVA-NeXT: the same
tower, ``image_grid_pinpoints`` of llava-v1.6 (336 x {672, 1008} grids: base view + up to 4 crops, row-end tokens).
Qwen2-VL: patch 14, ``temporal_patch_size=2``, the 2 x 2 patch merger (``spatial_merge_size=2``), M-RoPE with
``mrope_section`` in the real 2:3:3 proportion, dynamic resolution (``min_pixels`` / ``max_pixels``). Qwen2.5-VL
adds window attention (``window_size=112``, full attention at the last block). Widths are 32-64, the towers 2-4
blocks deep and the language models 4 layers (so ``llm:k`` sites exist): a CPU runs the whole path (processor ->
model -> method -> lmms-eval / bench -> results) in seconds.

Random weights say nothing about quality: use these to test a pipeline, never to rank methods.

    python -m tokenthin tiny-vlm llava /tmp/tiny-llava      # or: tokenthin.eval.tiny.save_tiny("llava", DIR)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .tiny_tokenizer import build_tokenizer

KINDS = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's grids


def _clip_vision(image_size: int) -> Any:
    from transformers import CLIPVisionConfig

    # ViT-L/14-336 is 1024 wide x 24 layers x 16 heads, MLP 4x, quick_gelu; here 32 wide x 4 layers x 4 heads
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
    )


def _llama(vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig

    # Vicuna-7B / Mistral-7B are 4096 wide x 32 layers; here 64 wide x 4 layers, 4 heads
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _clip_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _llava(image_size: int) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tokenizer("llava")
    cfg = LlavaConfig(
        vision_config=_clip_vision(image_size),
        text_config=_llama(len(tok), tok),
        image_token_id=tok.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // 14) ** 2,
        pad_token_id=tok.pad_token_id,
    )
    proc = LlavaProcessor(
        image_processor=_clip_processor(image_size),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's [CLS]: the processor counts it, the strategy drops it
        chat_template=tok.chat_template,
    )
    return LlavaForConditionalGeneration(cfg), proc


def _llava_next(image_size: int) -> tuple[Any, Any]:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_tokenizer("mistral")
    pins = [[h * image_size // 336, w * image_size // 336] for h, w in NEXT_PINPOINTS]
    cfg = LlavaNextConfig(
        vision_config=_clip_vision(image_size),
        text_config=_llama(len(tok), tok),
        image_token_id=tok.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pins,
        pad_token_id=tok.pad_token_id,
    )
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pins,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


def _qwen(version: str, max_pixels: int) -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = build_tokenizer("chatml")
    ids = {
        "image_token_id": tok.image_token_id,
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    # Qwen2-VL-2B: 1536 wide x 28 layers, 12 heads of 128, 2 KV heads, mrope_section [16, 24, 24] (sum = head_dim / 2);
    # here 64 wide x 4 layers, 4 heads of 16, 2 KV heads, mrope_section [2, 3, 3]
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(tok),
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }
    common = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2)
    vp = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        # Qwen2-VL's ViT: 1280 wide x 32 blocks, 16 heads, MLP 4x; here 32 wide x 2 blocks
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 4, **common}
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **ids)
        model = Qwen2VLForConditionalGeneration(cfg)
        proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
        return model, proc
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    # Qwen2.5-VL's ViT: 1280 wide x 32 blocks, window 112 px, full attention at blocks 7/15/23/31; here 2 blocks
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "num_heads": 4,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        **common,
    }
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **ids)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    return model, proc


def build_tiny(kind: str, *, image_size: int = 336, max_pixels: int = 448 * 448, seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)`` of a tiny random ``kind`` checkpoint (see :data:`KINDS`), in eval mode.

    ``image_size``: the CLIP input size of the LLaVA kinds (336 as in LLaVA-1.5; a multiple of 14, e.g. 112 for a
    faster smoke test: 64 tokens per view). ``max_pixels``: the Qwen kinds' largest image (pixels are resized to a
    multiple of 28 within ``[56*56, max_pixels]``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; choose from {', '.join(KINDS)}")
    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of the patch size 14, got {image_size}")
    torch.manual_seed(seed)
    if kind == "llava":
        model, proc = _llava(image_size)
    elif kind == "llava-next":
        model, proc = _llava_next(image_size)
    else:
        model, proc = _qwen("2" if kind == "qwen2-vl" else "2.5", max_pixels)
    model.generation_config.suppress_tokens = _structure_tokens(proc.tokenizer)
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.generation_config.eos_token_id = proc.tokenizer.eos_token_id
    return model.eval(), proc


def _structure_tokens(tok: Any) -> list[int]:
    """Image / video / vision-boundary ids: a random model may emit them, a real one never does; generation
    suppresses them (written to generation_config.json, so every loader of the checkpoint does the same)."""
    names = ("<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    vocab = tok.get_vocab()
    return sorted(vocab[n] for n in names if n in vocab)


def save_tiny(kind: str, out_dir: str | Path, **kwargs: Any) -> Path:
    """Build a tiny ``kind`` checkpoint (see :func:`build_tiny`) and ``save_pretrained`` model and processor to
    ``out_dir``; returns the directory. Load it back with ``tokenthin.eval.loading.load_vlm(out_dir)`` or the
    ``transformers`` auto classes."""
    out = Path(out_dir)
    model, proc = build_tiny(kind, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    (out / "tokenthin_tiny.json").write_text(json.dumps({"kind": kind, **kwargs, "note": "random weights"}) + "\n")
    return out


# (question, answer, shape, colour, image size (w, h)) of the demo data: sizes differ, so token counts do
_DEMO = (
    ("What color is the square?", "red", "square", (220, 40, 40), (320, 240)),
    ("What shape is shown?", "circle", "circle", (40, 90, 220), (336, 336)),
    ("What color is the circle?", "green", "circle", (40, 180, 60), (400, 200)),
    ("Is there a square in the image?", "yes", "square", (230, 200, 40), (240, 320)),
    ("What shape is shown?", "square", "square", (140, 60, 200), (256, 256)),
    ("What color is the square?", "blue", "square", (40, 90, 220), (300, 180)),
)


def make_vqa_data(out_dir: str | Path, n: int = 6, answers: list[str] | None = None) -> Path:
    """Write ``n`` (at most 6) drawn images (a coloured square or circle on grey, different sizes) and
    ``out_dir/vqa.jsonl`` with a question and answer about each; returns the JSONL's path. ``answers`` replaces the
    reference answers (e.g. with a model's own, to check scoring end to end)."""
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (q, a, shape, colour, (w, h)) in enumerate(_DEMO[:n]):
        im = Image.new("RGB", (w, h), (128, 128, 128))
        r = min(w, h) // 4  # a centred square box: circles stay round on any aspect ratio
        box = (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r)
        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)
        im.save(out / "images" / f"{i}.png")
        ref = answers[i] if answers is not None else a
        lines.append(json.dumps({"id": f"q{i}", "image": f"images/{i}.png", "question": q, "answer": ref}))
    path = out / "vqa.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
