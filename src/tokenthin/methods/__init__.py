"""One file per paper. Each registers itself by name; see :mod:`tokenthin.methods.base` for the contract."""

from __future__ import annotations

import importlib
import pkgutil

_loaded = False


def _load_all() -> None:
    """Import every method module once so that its ``@register`` runs."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
