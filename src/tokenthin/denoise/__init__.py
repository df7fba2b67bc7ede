"""The denoiser runtime: block-local merge -> compute -> unmerge inside diffusion denoisers (UNets, diffusion
transformers) at the seams of a :class:`~tokenthin.adapters.denoiser.DenoiserAdapter`."""

from __future__ import annotations

from .runtime import DenoiserRuntime
from .setup import build
from .state import BlockOptions, DenoiseInfo

__all__ = ["BlockOptions", "DenoiseInfo", "DenoiserRuntime", "build"]
