"""Shared by the real-model loaders: finding a file inside an installed package without importing it, loading
converted tensors into a model built on the meta device, and turning the accepted image inputs into a list."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def package_file(
    package: str, parts: Sequence[str], error: type[Exception], missing: str, fix: str, contains: Sequence[str] = ()
) -> Path:
    """Path of ``<package>/<parts...>`` in the installed ``package``, located with ``importlib.util.find_spec``
    (the package is never imported): a file, or with ``contains`` a folder holding every one of those files.
    Raises ``error("<missing> (looked in ...); <fix>")``."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*parts)
        if all((candidate / name).is_file() for name in contains) if contains else candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(map(str, locations))})" if locations else ""
    raise error(f"{missing}{where}; {fix}")


def load_converted(
    model: nn.Module,
    build: Callable[[], nn.Module],
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    error: type[Exception],
    origin: str,
) -> nn.Module:
    """Load ``state`` (every key of ``model.state_dict()``) into ``model``, built on the meta device, as ``dtype``.

    Shapes are checked first (``error("<key>: <origin> (shape) vs model (shape)")``). The tensors are assigned, not
    copied; when the installed transformers keeps tensors outside the state dict (still on meta after loading),
    the model is built again for real with ``build()`` and loaded by copy. Returns the loaded model (train mode
    as built; callers set eval).
    """
    expected = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise error(f"{key}: {origin} {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # a transformers version with tensors outside the state dict: build for real
        model = build().to(dtype)
        model.load_state_dict(state, strict=True)
    return model


def image_list(images: Any) -> list[Any]:
    """A preprocessor's ``images`` argument as a non-empty list: one image, a list/tuple of them, or a (B, H, W, C)
    array (split along B)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess() got no images")
    return list(images)
