"""Per-call state of the encoder runtime, the signals it offers methods, and timing helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..budget import Schedule
from ..errors import TokenThinError
from ..flops import EncoderDims, encoder_flops
from ..layout import Layout
from ..methods.base import ReduceInput, SignalSource
from ..scores.attention import cls_attention, mean_attention

if TYPE_CHECKING:
    from .core import Runtime


@contextmanager
def _cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads on CPU. A reduction is hundreds of small ops; on a busy machine
    every multi-threaded op waits for a descheduled worker, which made them 10-20x slower than on one thread
    (measured: 35% of a DINOv2-S forward on two threads vs 4% on one)."""
    if device.type != "cpu" or torch.compiler.is_compiling():  # a compiled graph runs as one unit
        yield
        return
    old = torch.get_num_threads()
    if old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Source:
    """The original-token -> current-slot map of a call, composed only when someone reads it: a start (None: the
    identity on ``n0`` tokens, or the input site's grid map) and the slot map (``Assignment.dst``) of every
    reduction since. Nothing is recomposed per layer when no one asks (no unmerge, no visualisation)."""

    def __init__(self, batch: int, n0: int, start: torch.Tensor | None = None) -> None:
        self.batch, self.n0 = batch, n0
        self.start = start
        self.steps: list[torch.Tensor] = []
        self._done: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.start is None and not self.steps

    def add(self, dst: torch.Tensor) -> None:
        self.steps.append(dst)
        self._done = None

    def compose(self) -> torch.Tensor | None:
        """(B, N0) original token -> current slot (-1: dropped); None when nothing was reduced."""
        if self.empty:
            return None
        if self._done is None:
            src = self.start
            if src is None:
                src = torch.arange(self.n0, device=self.steps[0].device).expand(self.batch, self.n0)
            for dst in self.steps:
                src = compose_dst(src, dst)
            self._done = src
        return self._done


def grid_source(p: int, h: int, w: int, sh: int, sw: int, device: torch.device) -> torch.Tensor:
    """(1, p + h * w) original token -> token of an ``sh`` x ``sw`` grid the input site shrank an ``h`` x ``w`` grid
    to (``p`` protected tokens first)."""
    rows = (torch.arange(h, device=device) * sh) // h
    cols = (torch.arange(w, device=device) * sw) // w
    cell = (rows[:, None] * sw + cols[None, :]).reshape(-1) + p
    return torch.cat([torch.arange(p, device=device), cell]).unsqueeze(0)


def compose_dst(source: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``source`` (B, N0) after a reduction whose slot map is ``dst`` (B, N): see ``assign.compose_source``."""
    return torch.where(source >= 0, dst.gather(1, source.clamp(min=0)), source)


@dataclass
class TokenInfo:
    """What the last forward call did. ``source`` is composed when first read."""

    grid: tuple[int, int]  # original patch grid
    num_protected: int
    tokens_per_layer: list[int]  # tokens entering each encoder layer (largest sample: what the batch computes)
    size: torch.Tensor | None  # (B, N_out) token sizes after the encoder (None: no reduction)
    valid: torch.Tensor | None  # (B, N_out) False for padding; None when every sample kept the same count
    kept: list[int]  # output tokens per sample (protected included)
    source_map: Source | None = field(default=None, repr=False)
    layer_valid: list[torch.Tensor | None] = field(default_factory=list, repr=False)  # per layer; None: no padding
    # an official parity mode's output order (ToMe's [unmerged A, B]): place -> output token, so that
    # ``out.gather(1, order)`` is the tokens as the official code returns them; None: positional (the output itself
    # stays positional, as do ``size``, ``valid`` and ``source``)
    order: torch.Tensor | None = field(default=None, repr=False)
    dims: EncoderDims | None = field(default=None, repr=False)  # the host's, for the realised FLOPs

    def _full_flops(self) -> tuple[EncoderDims, int, int] | None:
        """(dims, FLOPs of the unreduced encoder at the original grid, the input's patches); None without dims."""
        d = self.dims
        if d is None or len(self.tokens_per_layer) != d.num_layers:
            return None
        n0 = self.grid[0] * self.grid[1]
        full = encoder_flops([n0 + self.num_protected] * d.num_layers, n0, d)
        return d, full, self.tokens_per_layer[0] - self.num_protected  # the (possibly resized) input's patches

    @property
    def sample_flops(self) -> list[float] | None:
        """Per sample, the analytic FLOPs fraction (of the unreduced encoder at the original grid) this call
        realised, each sample at its own token counts (:mod:`tokenthin.flops`); None where the host gave no
        dimensions."""
        if (f := self._full_flops()) is None:
            return None
        d, full, n_in = f
        per_sample = list(zip(*self.sample_tokens))
        return [encoder_flops(list(c), n_in, d, k) / full for c, k in zip(per_sample, self.kept)]

    @property
    def batch_flops_fraction(self) -> float | None:
        """The FLOPs fraction the batch computes: every sample at the largest sample's counts (the padded shapes),
        so at least :attr:`flops_fraction`; equal to it unless samples kept different counts (dynamic methods)."""
        if (f := self._full_flops()) is None:
            return None
        d, full, n_in = f
        return encoder_flops(self.tokens_per_layer, n_in, d, max(self.kept)) / full

    @property
    def flops_fraction(self) -> float | None:
        """The mean over samples of :attr:`sample_flops` (what ``tokenthin bench`` reports as FLOPs reached)."""
        f = self.sample_flops
        return None if not f else sum(f) / len(f)

    @property
    def sample_tokens(self) -> list[list[int]]:
        """Per layer, the valid tokens of each sample (they differ only for dynamic methods and padded inputs)."""
        b = len(self.kept)
        return [[n] * b if v is None else v.sum(1).tolist() for n, v in zip(self.tokens_per_layer, self.layer_valid)]

    @property
    def source(self) -> torch.Tensor | None:
        """(B, N0) original token -> output token (-1: dropped); None when nothing was reduced."""
        return None if self.source_map is None else self.source_map.compose()


@dataclass
class CallState:
    batch: int
    grid: tuple[int, int]
    n0: int  # tokens at the start (protected + patches) of the original input
    layout: Layout
    schedule: Schedule  # the plan for this call's input shape
    content: torch.Tensor | int = 0  # (B,) real content tokens per sample (the caller's padding excluded), or int
    size: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    source: Source | None = None  # composed lazily (None: nothing reduced yet)
    bias: torch.Tensor | None = None  # (B, N) additive key bias for the next layers, None = no bias needed
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    k_mean: dict[int, torch.Tensor] = field(default_factory=dict)  # the keys' head mean, where taken at capture
    bias_at: dict[int, torch.Tensor | None] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    layer_valid: list[torch.Tensor | None] = field(default_factory=list)  # the valid mask entering each layer
    pristine: bool = True
    frame: str | None = None  # under torch.compile: the compiled frame the layers' hooks run in (tracing.one_frame)
    sized: bool = False  # a merge happened (token sizes differ from 1)
    n_cur: int | None = None  # tokens after the last reduction
    block: dict[int, tuple] = field(default_factory=dict)  # site "block": layer -> (input, reduced input, source, bias)
    order: torch.Tensor | None = None  # (B, n_cur) place of each token in an official mode's order (ReduceInput.order)
    plan_order: torch.Tensor | None = None  # the last plan's OrderedPlan.order (sort key over its input tokens)


class _Signals(SignalSource):
    def __init__(self, rt: Runtime, st: CallState) -> None:
        self.rt, self.st = rt, st

    def _qk(self, layer: int, need_q: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        if layer not in self.st.k or (need_q and layer not in self.st.q):
            raise TokenThinError(f"internal: no keys captured at layer {layer}")
        return self.st.q.get(layer), self.st.k[layer]

    @staticmethod
    def head_mean(k: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = k.shape
        return k.view(b, n, heads, -1).mean(2)

    def keys(self, layer: int) -> torch.Tensor:
        got = self.st.k_mean.get(layer)
        if got is not None:
            return got
        _, k = self._qk(layer, False)
        return self.head_mean(k, self.rt.adapter.num_heads)

    def cls_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        assert q is not None
        return cls_attention(q, k, self.rt.adapter.num_heads, self.rt.adapter.scale, self.st.bias_at.get(layer))

    def mean_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        assert q is not None
        bias = self.st.bias_at.get(layer)
        return mean_attention(q, k, self.rt.adapter.num_heads, self.rt.adapter.scale, bias, self.st.valid)


class _Sub(SignalSource):
    """The signals of part of the call: batch rows ``rows`` (a sub-batch) and tokens ``cols`` (a group's real
    tokens, the caller's padding cut off)."""

    def __init__(self, base: SignalSource, rows: torch.Tensor | slice = slice(None), cols: slice = slice(None)) -> None:
        self.base, self.rows, self.cols = base, rows, cols
        self.has_cls = base.has_cls

    def keys(self, layer: int) -> torch.Tensor:
        return self.base.keys(layer)[self.rows][:, self.cols]

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self.base.cls_attention(layer)[self.rows][:, self.cols]

    def mean_attention(self, layer: int) -> torch.Tensor:
        return self.base.mean_attention(layer)[self.rows][:, self.cols]


NEG = torch.finfo(torch.float32).min / 2  # the key bias of a token no query may attend to


def key_bias(size: torch.Tensor, valid: torch.Tensor | None, prop_attn: bool) -> torch.Tensor:
    """(B, N) additive key bias: log token size (proportional attention; 0 without it), ``NEG`` on padding."""
    logs = size.clamp_min(1e-6).log() if prop_attn else torch.zeros_like(size)
    return logs if valid is None else logs.masked_fill(~valid, NEG)


def _trimmed(inp: ReduceInput) -> ReduceInput | None:
    """``inp`` (a group whose samples have equal real-token counts) cut to its real tokens, as an unpadded, pristine
    input, when they are the same leading prefix in every sample (right padding); a 1-D sequence layout gets the
    grid (1, real content tokens). None where the padding is not such a suffix (the group is planned as it is).

    Scores stay exact: attention over the padded batch already gives padding keys zero weight (the key bias), and
    mean attention averages over valid queries only."""
    P = inp.num_protected
    m = P + int(inp.counts[0])
    if not bool(inp.valid[:, :m].all()) or bool(inp.valid[:, m:].any()):
        return None
    lay = inp.layout
    seq = lay is not None and lay.kind == "sequence"
    return ReduceInput(
        x=inp.x[:, :m],
        size=inp.size[:, :m],
        valid=inp.valid[:, :m],
        num_protected=P,
        layer=inp.layer,
        num_layers=inp.num_layers,
        grid=(1, m - P) if seq else inp.grid,
        pristine=True,
        signals=_Sub(inp.signals, cols=slice(0, m)),
        calibrating=inp.calibrating,
        layout=Layout.sequence(P, m - P) if seq else lay,
    )
