"""The adapter contract: where a host model's seams are. No method logic lives here.

An adapter is found by duck typing (:func:`find_adapter`); it never imports an optional host library at module
import time.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..flops import EncoderDims


class Adapter:
    """A host family. Subclasses fill in the attributes in ``__init__`` and may override the hooks below."""

    families: ClassVar[str]  # human-readable list of supported models, for error messages

    root: nn.Module  # receives pixel_values; its pre/post hooks open and close a call
    layers: list[nn.Module]
    num_protected: int
    num_heads: int
    head_dim: int
    scale: float
    patch: tuple[int, int]
    image_size: tuple[int, int]
    dims: EncoderDims
    family: str

    @classmethod
    def detect(cls, model: nn.Module) -> Adapter | None:
        raise NotImplementedError

    def qk_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are layer i's queries and keys, (B, N, heads * head_dim)."""
        raise NotImplementedError

    def pixel_values(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def with_pixel_values(self, args: tuple, kwargs: dict[str, Any], pv: torch.Tensor) -> tuple[tuple, dict]:
        """Call arguments with the image replaced (and position interpolation switched on where needed)."""
        raise NotImplementedError

    def extra_hooks(self, runtime: Any) -> list[torch.utils.hooks.RemovableHandle]:
        """Host-specific hooks beyond the layers (e.g. a pooling head that should see token sizes)."""
        return []

    def touched(self) -> list[str]:
        """Names of modules that get hooks, for explain()."""
        raise NotImplementedError


def adapters() -> list[type[Adapter]]:
    from .hf_encoder_decoder import HFEncoderDecoderAdapter
    from .hf_vision import HFVisionAdapter
    from .hf_vlm import HFLlavaAdapter, HFLlavaNextAdapter, HFQwen2VLAdapter

    return [HFLlavaNextAdapter, HFLlavaAdapter, HFQwen2VLAdapter, HFEncoderDecoderAdapter, HFVisionAdapter]  # type: ignore[list-item]


def find_adapter(model: object) -> Adapter:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for cls in adapters():
        found = cls.detect(model)
        if found is not None:
            return found
    supported = "; ".join(c.families for c in adapters())
    raise UnsupportedModelError(
        f"tokenthin does not know how to reduce tokens in {type(model).__name__}. Supported: {supported}. "
        "If this is one of them wrapped in another module, pass the inner model."
    )
