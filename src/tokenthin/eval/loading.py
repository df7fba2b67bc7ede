"""Load a local vision-language checkpoint with its processor, and turn (images, question) pairs into model inputs.

Offline only: ``HF_HUB_OFFLINE=1`` is set (unless already set) and ``local_files_only=True`` is passed, so a model id
that is not in the local cache fails with a message instead of downloading.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDependencyError, TokenThinError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str | None = None, local_rank: int | None = None) -> torch.device:
    """``device`` if given; else ``cuda:LOCAL_RANK`` when CUDA is available (one GPU per data-parallel process),
    else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """'auto' (or None): on a GPU the checkpoint's own dtype (``"auto"`` for ``from_pretrained``, what lmms-eval's
    ``llava_hf`` loads), on the CPU float32; or a name in float32 / float16 / bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return "auto" if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise TokenThinError(f"dtype '{dtype}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_vlm(
    pretrained: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` from a local checkpoint directory (``save_pretrained`` output) or a cached model id.

    The model is the image-text-to-text class of its config (``LlavaForConditionalGeneration`` etc.; whether a method
    can act on it is the adapters' business: ``tokenthin.apply`` says so), in eval mode on ``device`` (default:
    :func:`pick_device`); the processor pads on the left (batched generation)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("loading a VLM needs transformers: pip install 'tokenthin[hf]'") from e
    dev = device if isinstance(device, torch.device) else pick_device(device)
    try:
        cfg = AutoConfig.from_pretrained(pretrained, local_files_only=True)
    except OSError as e:
        raise TokenThinError(
            f"cannot load '{pretrained}' offline: give a local checkpoint directory (save_pretrained output with "
            "config.json, weights and the processor files) or a model id already in the Hugging Face cache"
        ) from e
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT

    if cfg.model_type not in IMAGE_TEXT:
        raise TokenThinError(
            f"'{pretrained}' is a '{cfg.model_type}' model, not an image-text-to-text one: give a vision-language "
            "checkpoint (tokenthin's hosts: LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; `tokenthin hosts` lists them)"
        )
    kw: dict[str, Any] = {"local_files_only": True, "dtype": resolve_dtype(dtype, dev)}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kw).to(dev).eval()
    processor = AutoProcessor.from_pretrained(pretrained, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


def chat_text(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt string of ``messages`` (Hugging Face chat format; image entries ``{"type": "image", ...}``) with the
    generation prompt, by the processor's chat template; without a template, the image tokens then the text."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", "<image>")
    parts = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts.append(content)
            continue
        parts += [f"{image_token}\n" for c in content if c.get("type") == "image"]
        parts += [c["text"] for c in content if c.get("type") == "text"]
    return "".join(parts)


def question_messages(question: str, n_images: int = 1) -> list[dict[str, Any]]:
    """One user turn: ``n_images`` images, then the question."""
    return [
        {"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": question}]}
    ]


def encode(
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Sequence[Any]],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch (left-padded), on ``device``, floating tensors in ``dtype``. ``images[i]`` are
    sample i's PIL images (in prompt order); a batch without any image is encoded as text only."""
    flat = [im for ims in images for im in ims]
    kw: dict[str, Any] = {"text": list(texts), "return_tensors": "pt", "padding": True}
    if flat:
        kw["images"] = flat
    batch = processor(**kw)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out
