"""The runtime: installs hooks at an adapter's seams and runs a method's plan at each reduction point.

Per-forward state (token sizes, padding, source map, captured queries/keys) lives in a :class:`CallState` that
the root pre-hook creates and the root post-hook closes; nothing survives a call but the :class:`TokenInfo`
summary of the last call. Removing the hooks restores the model exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.base import Adapter
from .budget import Schedule
from .errors import InputMismatchError, TokenThinError
from .methods.base import Method, ReduceInput, SignalSource
from .ops import assign
from .scores.attention import cls_attention, mean_attention


@contextmanager
def _cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads on CPU. A reduction is hundreds of small ops; on a busy machine
    every multi-threaded op waits for a descheduled worker, which made them 10-20x slower than on one thread
    (measured: 35% of a DINOv2-S forward on two threads vs 4% on one)."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old <= n:
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


@dataclass
class TokenInfo:
    """What the last forward call did."""

    grid: tuple[int, int]  # original patch grid
    num_protected: int
    tokens_per_layer: list[int]  # tokens entering each encoder layer (largest sample: what the batch computes)
    sample_tokens: list[list[int]]  # per layer, the valid tokens of each sample (differ only for dynamic methods)
    size: torch.Tensor | None  # (B, N_out) token sizes after the encoder (None: no reduction)
    valid: torch.Tensor | None  # (B, N_out) False for padding; None when every sample kept the same count
    source: torch.Tensor | None  # (B, N0) original token -> output token (-1: dropped)
    kept: list[int]  # output tokens per sample (protected included)


@dataclass
class CallState:
    batch: int
    grid: tuple[int, int]
    n0: int  # tokens at the start (protected + patches) of the original image
    size: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    source: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # (B, N) additive key bias for the next layers, None = no bias needed
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    bias_at: dict[int, torch.Tensor | None] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    sample_tokens: list[list[int]] = field(default_factory=list)
    pristine: bool = True
    sized: bool = False  # a merge happened (token sizes differ from 1)
    n_cur: int | None = None  # tokens after the last reduction


class _Signals(SignalSource):
    def __init__(self, rt: Runtime, st: CallState) -> None:
        self.rt, self.st = rt, st

    def _qk(self, layer: int, need_q: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        if layer not in self.st.k or (need_q and layer not in self.st.q):
            raise TokenThinError(f"internal: no keys captured at layer {layer}")
        return self.st.q.get(layer), self.st.k[layer]

    def keys(self, layer: int) -> torch.Tensor:
        _, k = self._qk(layer, False)
        b, n, _ = k.shape
        return k.view(b, n, self.rt.adapter.num_heads, -1).mean(2)

    def cls_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        assert q is not None
        return cls_attention(q, k, self.rt.adapter.num_heads, self.rt.adapter.scale, self.st.bias_at.get(layer))

    def mean_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        assert q is not None
        bias = self.st.bias_at.get(layer)
        return mean_attention(q, k, self.rt.adapter.num_heads, self.rt.adapter.scale, bias, self.st.valid)


class Runtime:
    """One application of one method to one model."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        method: Method,
        schedule: Schedule,
        *,
        unmerge: bool = False,
        prop_attn: bool = True,
    ) -> None:
        self.model, self.adapter, self.method, self.schedule = model, adapter, method, schedule
        self.unmerge = unmerge
        self.prop_attn = prop_attn
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.last: TokenInfo | None = None
        self._out_bias: torch.Tensor | None = None  # key bias of the last call's output tokens (cross_bias)
        self.calibrating = False
        self.measure = False  # accumulate the time spent in reductions into ``overhead_s`` (benchmarks)
        self.overhead_s = 0.0
        self._st: CallState | None = None
        L = len(adapter.layers)
        self.points = set(schedule.points)
        self.capture: set[int] = set()
        for p in self.points:
            for layer in method.signal_layers(p, L):
                self.capture.add(layer % L)
        self.need_q = bool(method.signals & {"cls_attn", "mean_attn"})

    # ----- hook management -----
    def attach(self) -> None:
        a = self.adapter
        self.handles.append(a.root.register_forward_pre_hook(self._start, with_kwargs=True))
        self.handles.append(a.root.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for i, layer in enumerate(a.layers):
            self.handles.append(layer.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            if i in self.points:
                self.handles.append(layer.register_forward_hook(self._make_post(i)))
            if i in self.capture:
                qm, km = a.qk_modules(i)
                self.handles.append(km.register_forward_hook(self._make_capture(i, "k")))
                if self.need_q:
                    self.handles.append(qm.register_forward_hook(self._make_capture(i, "q")))
        self.handles.extend(a.extra_hooks(self))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._st = None
        self._out_bias = None

    def current_bias(self) -> torch.Tensor | None:
        return None if self._st is None else self._st.bias

    def cross_bias(self) -> torch.Tensor | None:
        """(B, N) additive key bias for modules that read the last call's output tokens (a decoder's
        cross-attention): log token size where merged and ``prop_attn``, a large negative number on padding; None
        when every output token is a plain, valid one (or the output was unmerged to the full grid)."""
        return self._out_bias

    # ----- hooks -----
    def _start(self, _m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        a = self.adapter
        pv = a.pixel_values(args, kwargs)
        if not pv.is_floating_point():
            raise InputMismatchError(
                f"pixel_values has dtype {pv.dtype}; convert images to float and normalise them first "
                "(e.g. with the model's image processor)"
            )
        param = next(a.root.parameters())
        if pv.device != param.device:
            raise InputMismatchError(
                f"pixel_values is on {pv.device} but the model is on {param.device}; move one of them "
                f"(pixel_values.to('{param.device}'))"
            )
        h, w = pv.shape[-2] // a.patch[0], pv.shape[-1] // a.patch[1]
        P = a.num_protected
        st = CallState(batch=pv.shape[0], grid=(h, w), n0=P + h * w)
        self._st = st
        if self.schedule.site == "input":
            hh, ww = self.method.input_size(pv.shape[-2], pv.shape[-1], a.patch[0], self.schedule.keep)  # type: ignore[arg-type]
            if (hh, ww) != tuple(pv.shape[-2:]):
                small = F.interpolate(pv.float(), size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
                small = small.to(pv.dtype)
                sh, sw = hh // a.patch[0], ww // a.patch[1]
                st.source = self._grid_source(h, w, sh, sw, pv.device).expand(st.batch, -1)
                st.pristine = False
                return a.with_pixel_values(args, kwargs, small)
        return None

    def _grid_source(self, h: int, w: int, sh: int, sw: int, device: torch.device) -> torch.Tensor:
        P = self.adapter.num_protected
        rows = (torch.arange(h, device=device) * sh) // h
        cols = (torch.arange(w, device=device) * sw) // w
        cell = (rows[:, None] * sw + cols[None, :]).reshape(-1) + P
        return torch.cat([torch.arange(P, device=device), cell]).unsqueeze(0)

    def _make_pre(self, i: int):
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self._st
            if st is None:
                return None
            hs = args[0] if args else kwargs["hidden_states"]
            st.tokens.append(hs.shape[1])
            st.sample_tokens.append(st.valid.sum(1).tolist() if st.valid is not None else [hs.shape[1]] * hs.shape[0])
            st.bias_at[i] = st.bias
            if st.bias is None or not getattr(self.adapter, "layer_takes_mask", True):
                return None
            mask = st.bias.to(hs.dtype).view(hs.shape[0], 1, 1, -1)
            if len(args) >= 2:
                if args[1] is not None:
                    raise TokenThinError("tokenthin cannot combine a caller-supplied attention_mask with merging")
                args = (args[0], mask, *args[2:])
            else:
                if kwargs.get("attention_mask") is not None:
                    raise TokenThinError("tokenthin cannot combine a caller-supplied attention_mask with merging")
                kwargs = {**kwargs, "attention_mask": mask}
            return args, kwargs

        return pre

    def _make_capture(self, i: int, which: str):
        def cap(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            st = self._st
            if st is not None:
                (st.q if which == "q" else st.k)[i] = out.detach()

        return cap

    def _make_post(self, i: int):
        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            st = self._st
            if st is None:
                return None
            x = out[0] if isinstance(out, tuple) else out
            t0 = 0.0
            if self.measure:
                _sync(x.device)
                t0 = time.perf_counter()
            with _cpu_threads(x.device, 1):
                x_new = self._reduce(st, i, x)
            if self.measure:
                _sync(x.device)
                self.overhead_s += time.perf_counter() - t0
            if isinstance(out, tuple):
                return (x_new, *out[1:])
            return x_new

        return post

    def _reduce(self, st: CallState, i: int, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        b, n, _ = x.shape
        P = a.num_protected
        size = st.size if st.size is not None else torch.ones(b, n, dtype=torch.float32, device=x.device)
        valid = st.valid if st.valid is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        inp = ReduceInput(
            x=x,
            size=size,
            valid=valid,
            num_protected=P,
            layer=i,
            num_layers=len(a.layers),
            grid=st.grid,
            pristine=st.pristine,
            signals=_Signals(self, st),
            calibrating=self.calibrating,
        )
        keep_n = self.schedule.keep_at(i, inp.counts, st.grid[0] * st.grid[1], self.method.dynamic)
        keep, target = self.method.reduce(inp, keep_n)
        keep = keep.clone()
        keep[:, :P] = True
        if st.valid is not None:
            keep &= valid
        if target is not None:
            target = target.masked_fill(keep if st.valid is None else keep | ~valid, -1)
            target[:, :P] = -1
        plan = assign.build(keep, target)
        x_new, size_new = assign.merge(x, size, plan)
        padded = not plan.uniform
        st.valid = (
            torch.arange(plan.n_out, device=x.device).unsqueeze(0) < plan.counts.unsqueeze(1)
            if padded
            else None  # None: every token is valid
        )
        st.size = size_new
        st.n_cur = plan.n_out
        src = st.source if st.source is not None else torch.arange(n, device=x.device).expand(b, n)
        st.source = assign.compose_source(src, plan)
        st.pristine = False
        st.sized = st.sized or plan.merges  # some token stands for more than one (sizes stay > 1 once merged)
        if padded or (st.sized and self.prop_attn):
            logs = size_new.clamp_min(1e-6).log() if self.prop_attn else torch.zeros_like(size_new)
            st.bias = logs if st.valid is None else logs.masked_fill(~st.valid, torch.finfo(torch.float32).min / 2)
        else:
            st.bias = None
        for d in (st.q, st.k):  # signals of earlier layers are stale now
            for layer in [k for k in d if k <= i]:
                del d[layer]
        return x_new

    def _finish(self, _m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> Any:
        st, self._st = self._st, None
        if st is None:
            return None
        P = self.adapter.num_protected
        if st.valid is not None:
            kept = st.valid.sum(1).tolist()
        else:
            n_last = st.n_cur if st.n_cur is not None else (st.tokens[-1] if st.tokens else st.n0)
            kept = [n_last] * st.batch
        self._out_bias = None if (self.unmerge and st.source is not None) else st.bias
        self.last = TokenInfo(
            grid=st.grid,
            num_protected=P,
            tokens_per_layer=st.tokens,
            sample_tokens=st.sample_tokens,
            size=st.size,
            valid=st.valid,
            source=st.source,
            kept=kept,
        )
        if self.unmerge and st.source is not None and hasattr(out, "last_hidden_state"):
            out["last_hidden_state"] = assign.unmerge(out.last_hidden_state, st.source)
        return out if self.unmerge else None
