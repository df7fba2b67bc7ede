"""Block-local reduction (site ``block``): merge a layer's input tokens, let the layer compute on fewer, and hand
every original token its slot's update, so the layer's output has the full token count (tomesd's scheme).

For a residual block ``f(x) = x + g(x)`` the result is ``x + unmerge(f(m) - m)`` with ``m`` the merged input: each
token keeps its own residual stream and receives the update computed for its slot; a pruned token skips the block
(its update is zero). The metric a method reads through ``keys()`` is the block's input hidden states (tomesd
matches on them; a layer's own keys do not exist before it runs); attention signals are not available here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import TokenThinError
from ..methods.base import SignalSource
from ..ops import assign
from .state import CallState, key_bias

if TYPE_CHECKING:
    from .core import Runtime


class BlockSignals(SignalSource):
    """Signals at a block site: the block's input tokens stand in for keys."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def keys(self, layer: int) -> torch.Tensor:
        return self.x

    def cls_attention(self, layer: int) -> torch.Tensor:
        raise TokenThinError("attention signals are not available at a block site (the block has not run yet)")

    mean_attention = cls_attention


def block_merge(rt: Runtime, st: CallState, i: int, x: torch.Tensor) -> torch.Tensor | None:
    """The reduced input of layer i (None when the budget keeps every token); state for :func:`block_unmerge`."""
    b, n, _ = x.shape
    got = rt.assignment(st, i, x, BlockSignals(x), pristine=True)
    if got is None:
        return None
    plan, size = got
    xr, size_r = assign.merge(x, size, plan)
    source = assign.compose_source(torch.arange(n, device=x.device).expand(b, n), plan)
    valid_r = assign.slot_valid(plan)
    st.block[i] = (x, xr, source, st.bias, st.valid)
    needed = valid_r is not None or (plan.merges and rt.prop_attn)
    st.bias = key_bias(size_r, valid_r, rt.prop_attn) if needed else None
    st.valid = valid_r
    return xr


def block_unmerge(st: CallState, i: int, y: torch.Tensor) -> torch.Tensor:
    """Layer i's output on every original token: its input plus its slot's update."""
    x, xr, source, bias, valid = st.block.pop(i)
    st.bias, st.valid = bias, valid
    return x + assign.unmerge((y - xr).to(x.dtype), source)
