"""Adapter registry: every adapter module registers its class with a detection priority, as methods do.

:func:`find_adapter` imports each module of :mod:`tokenthin.adapters` once (so a new host is one new file), then
tries the registered adapters from the highest priority down; the first whose ``detect`` accepts the model wins.
Nothing keeps a list of adapters.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from ..errors import TokenThinError, UnsupportedModelError
from .contract import Adapter

_REGISTRY: dict[str, type[Adapter]] = {}
_loaded = False
_INFRA = {"contract", "denoiser", "registry"}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a host family available to :func:`find_adapter` under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TokenThinError(f"two adapters are named '{cls.name}'")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import __path__ as pkg_path

    for info in pkgutil.iter_modules(pkg_path):
        if info.name not in _INFRA and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def all_adapters() -> list[type[Adapter]]:
    """Registered adapters in detection order (priority, then name)."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda c: (-c.priority, c.name))


def find_adapter(model: object) -> Adapter:
    """The adapter of the first registered host family that recognises ``model``."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for cls in all_adapters():
        found = cls.detect(model)
        if found is not None:
            return found
    supported = "; ".join(c.families for c in all_adapters())
    raise UnsupportedModelError(
        f"tokenthin does not know how to reduce tokens in {type(model).__name__}. Supported: {supported}. "
        "If this is one of them wrapped in another module, pass the inner model."
    )
