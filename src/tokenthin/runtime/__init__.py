"""The encoder runtime: hooks at an adapter's seams, per-call state, per-input plans (see :mod:`.core`)."""

from __future__ import annotations

from .build import build
from .core import Runtime
from .state import CallState, TokenInfo, _sync

__all__ = ["CallState", "Runtime", "TokenInfo", "_sync", "build"]
