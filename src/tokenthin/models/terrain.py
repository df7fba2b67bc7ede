"""adaptive-terrain-diffusion's one-step consistency model as a diffusers ``UNet2DModel`` (real diffusion weights).

What this is
------------
The PyPI package ``adaptive-terrain-diffusion`` (version 0.4.2, MIT licence, author Youwei Yu; the network is
OpenAI's consistency-models UNet, MIT) ships one ONNX file,
``terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx`` (44 MB, 10.46M parameters): a
difficulty-conditioned, endpoint-distilled consistency model that turns noise at ``sigma = 80`` into a 128 x 128
heightfield in one step. Inputs ``noisy`` (B, 1, 128, 128), ``sigma`` (B,), ``difficulty`` (B,) = (level - 1) / 99
for a level 1..100; output ``denoised`` (B, 1, 128, 128) in [-1, 1] (the package maps it to metres with an
``asinh`` curve afterwards). Install it with ``pip install --no-deps adaptive-terrain-diffusion==0.4.2`` (its
onnxruntime-gpu dependency is not needed; ``terrain_diffusion`` is never imported here).

:func:`load_terrain` converts it once (cached under :func:`~tokenthin.models.cache.cache_dir`) into a
:class:`TerrainDenoiser`: ``.unet`` is a stock ``diffusers.UNet2DModel`` (its config: :func:`unet_config`; its
state dict loads into ``UNet2DModel(**unet_config())`` with no key left over), and the two things the ONNX graph
computes outside OpenAI's UNet live in the wrapper:

* the consistency-model parameterisation (Karras et al. / Song et al. 2023, ``sigma_min`` 0.002, ``sigma_data`` 0.5,
  *inside* the ONNX graph): ``denoised = clamp(c_skip * noisy + c_out * unet(c_in * noisy, c_noise), -1, 1)`` with
  ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)``, ``c_out = (s - s_min) sd / sqrt(s^2 + sd^2)``,
  ``c_in = 1 / sqrt(s^2 + sd^2)`` and the timestep ``c_noise = 250 log(s)``;
* the difficulty embedding ``label_emb`` (Linear(1, 128) -> SiLU -> Linear(128, 128) on the scaled difficulty, a
  continuous input rather than OpenAI's ``nn.Embedding``): diffusers has no class embedding of that form, so the
  wrapper computes it and hands the UNet its output through ``class_embed_type="identity"`` (the UNet adds it to
  the time embedding, exactly where OpenAI's UNet adds ``label_emb(y)``).

Architecture: model channels 32, ``channel_mult`` (1, 1, 2, 3, 4), 4 ResBlocks per level with scale-shift norm,
ResBlock down/upsampling (average pool / nearest), GroupNorm(32, eps 1e-5), self-attention with 32-channel heads
after every ResBlock of the 32x32, 16x16 and 8x8 levels: 28 attention layers: 9 at 1024 tokens (2 heads), 9 at 256
(3 heads), 10 at 64 (4 heads; 4 down, the mid block, 5 up). The name mapping is in
:mod:`~tokenthin.models.terrain_convert`. Deviation from the ONNX graph: none in the function; attention runs
through diffusers' SDPA processor instead of two einsums (max abs difference vs onnxruntime ~1e-5, see the tests).

    denoiser = load_terrain()
    x = terrain_inputs(batch=4, seed=0)                  # what TerrainGenerator.generate() feeds the model
    out = denoiser(x.noisy, x.sigma, x.difficulty)       # (4, 1, 128, 128) in [-1, 1]
    tokenthin.apply(denoiser.unet, "tomesd", ...)        # the UNet2DModel is the token-reduction host
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from tokenthin.models.cache import require
from tokenthin.models.loading import load_converted
from tokenthin.models.terrain_convert import (
    C_NOISE_SCALE,
    NUM_DIFFICULTIES,
    PIP_HINT,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    SIZE,
    TerrainConversionError,
    TerrainMissingError,
    cache_path,
    canonical_tensors,
    onnx_path,
    unet_config,
)

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = [
    "NUM_DIFFICULTIES",
    "PIP_HINT",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "SIZE",
    "TerrainConversionError",
    "TerrainDenoiser",
    "TerrainInputs",
    "TerrainMissingError",
    "attention_tokens",
    "cache_path",
    "difficulty_label",
    "load_terrain",
    "onnx_path",
    "onnx_reference",
    "terrain_inputs",
    "unet_config",
]


class TerrainDenoiser(nn.Module):
    """A consistency-model denoiser around a ``UNet2DModel`` (``.unet``, the token-reduction host).

    ``forward(noisy, sigma, difficulty)`` computes what the ONNX graph does; :meth:`unet_inputs` gives the UNet's
    own inputs for callers that run ``self.unet`` directly. ``sigma`` and ``difficulty`` are (B,) tensors or
    floats (broadcast to the batch); ``difficulty`` is already scaled to [0, 1] (:func:`difficulty_label`).
    The scalings are computed in float32 whatever the UNet's dtype.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        sigma_min: float = SIGMA_MIN,
        sigma_data: float = SIGMA_DATA,
        c_noise_scale: float = C_NOISE_SCALE,
    ) -> None:
        super().__init__()
        if unet.config.class_embed_type != "identity":
            raise ValueError("TerrainDenoiser needs a UNet2DModel with class_embed_type='identity'")
        self.unet = unet
        dim = unet.time_embedding.linear_2.out_features
        self.label_embedding = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.sigma_min, self.sigma_data, self.c_noise_scale = sigma_min, sigma_data, c_noise_scale

    def _per_sample(self, value: Any, batch: int, device: torch.device) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
        if value.numel() not in (1, batch):
            raise ValueError(f"expected 1 or {batch} values for sigma / difficulty, got {value.numel()}")
        return value.expand(batch)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in)`` for float32 ``sigma`` (B,): ``c_skip(sigma_min) = 1``, ``c_out(sigma_min) = 0``."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        root = torch.sqrt(sigma**2 + sd2)
        return c_skip, (sigma - self.sigma_min) * self.sigma_data / root, 1.0 / root

    def unet_inputs(self, noisy: torch.Tensor, sigma: Any, difficulty: Any) -> dict[str, torch.Tensor]:
        """``sample`` (``c_in * noisy``), ``timestep`` (``c_noise``, float32) and ``class_labels`` (the difficulty
        embedding) for ``self.unet(**inputs)``."""
        batch, device, dtype = noisy.shape[0], noisy.device, self.unet.dtype
        sigma = self._per_sample(sigma, batch, device)
        difficulty = self._per_sample(difficulty, batch, device)
        c_in = self.scalings(sigma)[2]
        return {
            "sample": (c_in[:, None, None, None] * noisy.float()).to(dtype),
            "timestep": self.c_noise_scale * torch.log(sigma),
            "class_labels": self.label_embedding(difficulty[:, None].to(dtype)),
        }

    def forward(self, noisy: torch.Tensor, sigma: Any, difficulty: Any, clamp: bool = True) -> torch.Tensor:
        """``denoised`` (B, 1, H, W) in ``noisy``'s dtype; ``clamp=False`` skips the graph's final clamp to [-1, 1]."""
        inputs = self.unet_inputs(noisy, sigma, difficulty)
        out = self.unet(**inputs, return_dict=False)[0].float()
        c_skip, c_out, _ = self.scalings(self._per_sample(sigma, noisy.shape[0], noisy.device))
        denoised = c_skip[:, None, None, None] * noisy.float() + c_out[:, None, None, None] * out
        return (denoised.clamp(-1.0, 1.0) if clamp else denoised).to(noisy.dtype)


def build_denoiser(config: dict[str, Any] | None = None) -> TerrainDenoiser:
    """A TerrainDenoiser with random weights: the shipped architecture, or a (tiny) ``UNet2DModel`` config."""
    diffusers = require("diffusers", "adaptive-terrain-diffusion", extra="diffusion")
    return TerrainDenoiser(diffusers.UNet2DModel(**(unet_config() if config is None else config)))


def load_terrain(device: Any = "cpu", dtype: torch.dtype = torch.float32, cache: bool = True) -> TerrainDenoiser:
    """The shipped consistency model as a :class:`TerrainDenoiser` in eval mode (converted once, then cached).

    ``cache=False`` converts from the ONNX file without reading or writing the cache. Raises
    :class:`TerrainMissingError` (naming ``pip install --no-deps adaptive-terrain-diffusion==0.4.2``) when the
    package is not installed, and ``MissingDependencyError`` without diffusers or onnx.
    """
    tensors = canonical_tensors(cache)
    require("diffusers", "adaptive-terrain-diffusion", extra="diffusion")
    with torch.device("meta"):
        model = build_denoiser()
    expected = set(model.state_dict())
    if set(tensors) != expected:
        raise TerrainConversionError(
            f"converted tensors do not match TerrainDenoiser: missing {sorted(expected - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - expected)[:5]}"
        )
    model = load_converted(model, build_denoiser, tensors, dtype, TerrainConversionError, "ONNX")
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# the ONNX reference


@functools.lru_cache(maxsize=2)
def _session(source: str, mtime_ns: int):
    ort = require("onnxruntime", "adaptive-terrain-diffusion")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_reference(noisy: Any, sigma: Any, difficulty: Any) -> np.ndarray:
    """The untouched graph run with onnxruntime (CPU): ``denoised`` (B, 1, 128, 128) as float32 NumPy."""
    feeds = {"noisy": noisy, "sigma": sigma, "difficulty": difficulty}
    feeds = {
        k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
        for k, v in feeds.items()
    }
    source = onnx_path()
    return _session(str(source), source.stat().st_mtime_ns).run(["denoised"], feeds)[0]


# --------------------------------------------------------------------------------------------------
# real inputs


class TerrainInputs(NamedTuple):
    """One batch as the package's sampler feeds the model (float32, CPU)."""

    noisy: torch.Tensor  # (B, 1, 128, 128)
    sigma: torch.Tensor  # (B,)
    difficulty: torch.Tensor  # (B,) scaled: (level - 1) / 99
    levels: torch.Tensor  # (B,) int64, 1..100


def difficulty_label(levels: Any) -> torch.Tensor:
    """Difficulty levels 1..100 -> the model's input ``(level - 1) / 99`` (float32)."""
    levels = torch.as_tensor(levels)
    if levels.is_floating_point() and not torch.equal(levels, levels.floor()):
        raise ValueError("difficulty levels are whole numbers from 1 to 100")
    if ((levels < 1) | (levels > NUM_DIFFICULTIES)).any():
        raise ValueError(f"difficulty levels must be between 1 and {NUM_DIFFICULTIES}, got {levels.tolist()}")
    return ((levels.to(torch.float64) - 1) / (NUM_DIFFICULTIES - 1)).to(torch.float32)


def terrain_inputs(batch: int, seed: int, difficulty: int | None = None) -> TerrainInputs:
    """The inputs ``TerrainGenerator.generate(batch, seed=seed, difficulty=...)`` gives its model (128 x 128,
    ``size_mode="resize"``): NumPy ``default_rng(seed)`` draws the levels first (uniform 1..100 when
    ``difficulty`` is None, the package's ``"random"``), then float32 standard-normal noise times
    ``sigma_max = 80``; one step at ``sigma = 80``. Same numbers as the package for the same seed."""
    if batch <= 0:
        raise ValueError("batch must be positive")
    rng = np.random.default_rng(seed)
    if difficulty is None:
        levels = rng.integers(1, NUM_DIFFICULTIES + 1, size=batch, dtype=np.int64)
    else:
        levels = np.full(batch, int(difficulty), dtype=np.int64)
    label = difficulty_label(torch.from_numpy(levels))
    noise = rng.standard_normal((batch, 1, SIZE, SIZE), dtype=np.float32)
    noisy = torch.from_numpy(noise * np.float32(SIGMA_MAX))
    return TerrainInputs(noisy, torch.full((batch,), SIGMA_MAX), label, torch.from_numpy(levels))


def attention_tokens(model: TerrainDenoiser, size: int = SIZE) -> dict[str, int]:
    """Tokens each attention layer of ``model.unet`` sees for a ``size`` x ``size`` input (one forward), by name."""
    from diffusers.models.attention_processor import Attention

    counts: dict[str, int] = {}
    handles = []
    for name, module in model.unet.named_modules():
        if isinstance(module, Attention):

            def hook(_mod, args, kwargs, name=name):
                x = args[0] if args else kwargs["hidden_states"]
                counts[name] = x.shape[-2] * x.shape[-1] if x.ndim == 4 else x.shape[1]

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, 1, size, size, device=param.device, dtype=param.dtype), SIGMA_MAX, 0.5)
    finally:
        for handle in handles:
            handle.remove()
    return counts
