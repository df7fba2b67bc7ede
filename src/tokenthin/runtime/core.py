"""The encoder runtime: installs hooks at an adapter's seams (see :mod:`tokenthin.adapters.contract`) and runs a
method's plan at each reduction point. It names no host keyword or module: the adapter says how a layer gets its key
bias, where queries and keys are, and what the call's token layout is.

Per-forward state (token sizes, padding, source map, captured queries/keys) lives in a :class:`CallState` that
the root pre-hook creates and the root post-hook closes; nothing survives a call but the :class:`TokenInfo`
summary of the last call. Budgets are planned for the token count each call actually sees (one plan per input
shape, cached). Removing the hooks restores the model exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapters.contract import Adapter, Layout
from ..budget import Schedule, flops_fraction, tokens_per_layer
from ..errors import InputMismatchError
from ..methods.base import Method, ReduceInput, SignalSource
from ..ops import assign, ordered
from .block import block_merge, block_unmerge
from .grouped import plan_grouped
from .state import CallState, Source, TokenInfo, _cpu_threads, _Signals, _sync, grid_source, key_bias
from .tracing import check_traceable, one_frame

Planner = Callable[[Layout], Schedule]


class Runtime:
    """One application of one method to one model. ``planner`` turns a call's layout into its schedule (cached per
    input shape); ``schedule`` is the plan for the default layout (what explain() shows before any call)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        method: Method,
        schedule: Schedule,
        *,
        planner: Planner | None = None,
        unmerge: bool = False,
        prop_attn: bool = True,
    ) -> None:
        self.model, self.adapter, self.method, self.schedule = model, adapter, method, schedule
        self.planner = planner
        self._plans: dict[tuple, Schedule] = {}
        if planner is not None:  # the default input's plan is known already (and a compiled trace need not plan)
            self._plans[self._plan_key(adapter.default_layout)] = schedule
        self.unmerge = unmerge
        self.prop_attn = prop_attn
        self.handles: list[Any] = []
        self.last: TokenInfo | None = None
        self._out_bias: torch.Tensor | None = None  # key bias of the last call's output tokens (cross_bias)
        self.calibrating = False
        self.measure = False  # accumulate the time spent in reductions into ``overhead_s`` (benchmarks)
        self.overhead_s = 0.0
        self.clock: Callable[[], float] = time.perf_counter  # benchmarks may count thread CPU time instead
        self._st: CallState | None = None
        L = len(adapter.layers)
        # per-input plans may place reductions at other layers only for site "layers" (r per layer): hook them all
        self.points = set(range(L - 1)) if (schedule.site == "layers" and planner is not None) else set(schedule.points)
        self.capture: set[int] = set()
        for p in self.points if schedule.site != "block" else ():  # a block's metric is its input (BlockSignals)
            for layer in method.signal_layers(p, L):
                self.capture.add(layer % L)
        self.need_q = bool(method.signals & {"cls_attn", "mean_attn"})

    # ----- hook management -----
    def attach(self) -> None:
        """Install the hooks; a no-op when they are installed already (a second set would reduce every point twice)."""
        if self.handles:
            return
        a = self.adapter
        self.handles.append(a.root.register_forward_pre_hook(self._start, with_kwargs=True))
        self.handles.append(a.root.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        block = self.schedule.site == "block"
        for i, layer in enumerate(a.layers):
            if block and i in self.points:  # merge before the bookkeeping pre-hook sees the tokens
                self.handles.append(layer.register_forward_pre_hook(self._make_block_pre(i), with_kwargs=True))
                self.handles.append(layer.register_forward_hook(self._make_block_post(i)))
            self.handles.append(layer.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            if i in self.points and not block:
                self.handles.append(layer.register_forward_hook(self._make_post(i)))
            if i in self.capture:
                self.handles.extend(a.capture_qk(i, self.need_q, self._make_sink(i)))
        self.handles.extend(a.bias_hooks(self))
        self.handles.extend(a.consumer_hooks(self))

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

    @staticmethod
    def _plan_key(layout: Layout) -> tuple:
        return (layout.protected, layout.grid, layout.frames)

    def plan_for(self, layout: Layout) -> Schedule:
        """The schedule for an input of this layout (cached by shape)."""
        if self.planner is None:
            return self.schedule
        key = self._plan_key(layout)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.planner(layout)
        return plan

    # ----- hooks -----
    def _start(self, _m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        a = self.adapter
        if self.method.dynamic and torch.compiler.is_compiling():
            check_traceable(self.method.name, "it keeps a different token count per sample (data-dependent shapes)")
        layout, batch, x = a.call_layout(args, kwargs)
        param = next(a.root.parameters())
        if x.device != param.device:
            raise InputMismatchError(
                f"the input is on {x.device} but the model is on {param.device}; move one of them "
                f"(inputs.to('{param.device}'))"
            )
        sched = self.plan_for(layout)
        st = CallState(batch=batch, grid=layout.grid, n0=layout.tokens, layout=layout, schedule=sched)
        st.content = layout.content
        st.source = Source(batch, layout.tokens)
        if layout.padding is not None:  # the caller's padding: never content, masked from the first layer on
            pad = layout.padding.to(device=x.device, dtype=torch.bool)
            st.valid = pad
            st.content = pad[:, layout.protected :].sum(1)
            st.bias = key_bias(torch.ones(pad.shape, device=x.device), pad, self.prop_attn)
        self._st = st
        frac = sched.input_fraction
        if frac is not None:  # site "input", or a method that also resizes (Schedule.input_keep)
            H, W = x.shape[-2], x.shape[-1]
            p = a.input_patch
            hh, ww = self.method.input_size(H, W, p, frac)
            if (hh, ww) != (H, W):
                h, w = layout.grid
                P = a.num_protected
                st.source.start = grid_source(P, h, w, hh // p, ww // p, x.device).expand(st.batch, -1)
                st.pristine = False
                return a.shrink_input(args, kwargs, (hh, ww))
        return None

    def _make_pre(self, i: int):
        layer_input = self.adapter.layer_input

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            st = self._st
            if st is None:
                return
            one_frame(st, self.method.name)
            hs = layer_input(args, kwargs)
            st.tokens.append(hs.shape[1])
            st.layer_valid.append(st.valid)  # per-sample counts are read from it only when info() asks
            st.bias_at[i] = st.bias

        return pre

    def _make_sink(self, i: int):
        # a method that reads only the keys' head mean of its own point's layer gets it taken here, while the keys
        # are still in cache (read after the layer's MLP they come from memory: ~2x the time on CPU); timed as own
        m = self.method
        eager = m.signals == frozenset({"keys"}) and type(m).signal_layers is Method.signal_layers
        heads = self.adapter.num_heads

        def sink(which: str, out: torch.Tensor) -> None:
            st = self._st
            if st is None:
                return
            out = out.detach()
            (st.q if which == "q" else st.k)[i] = out
            if eager and which == "k" and i in st.schedule.points:
                t0 = self._tic(out)
                st.k_mean[i] = _Signals.head_mean(out, heads)
                self._toc(out, t0)

        return sink

    def _make_post(self, i: int):
        a = self.adapter

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            st = self._st
            if st is None or i not in st.schedule.points:
                return None
            x = a.layer_output(out)
            t0 = self._tic(x)
            with _cpu_threads(x.device, 1):
                x_new = self._reduce(st, i, x)
            self._toc(x, t0)
            one_frame(st, self.method.name)  # a graph break inside the reduction shows here
            return a.with_layer_output(out, x_new)

        return post

    def _make_block_pre(self, i: int):
        a = self.adapter

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self._st
            if st is None or i not in st.schedule.points:
                return None
            x = a.layer_input(args, kwargs)
            t0 = self._tic(x)
            with _cpu_threads(x.device, 1):
                xr = block_merge(self, st, i, x)
            self._toc(x, t0)
            return None if xr is None else a.with_layer_input(args, kwargs, xr)

        return pre

    def _make_block_post(self, i: int):
        a = self.adapter

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            st = self._st
            if st is None or i not in st.block:
                return None
            y = a.layer_output(out)
            t0 = self._tic(y)
            with _cpu_threads(y.device, 1):
                full = block_unmerge(st, i, y)
            self._toc(y, t0)
            return a.with_layer_output(out, full)

        return post

    def _tic(self, x: torch.Tensor) -> float:
        if not self.measure or torch.compiler.is_compiling():  # a compiled graph cannot be timed from inside
            return 0.0
        _sync(x.device)
        return self.clock()

    def _toc(self, x: torch.Tensor, t0: float) -> None:
        if self.measure and not torch.compiler.is_compiling():
            _sync(x.device)
            self.overhead_s += self.clock() - t0

    def assignment(
        self, st: CallState, i: int, x: torch.Tensor, signals: SignalSource, pristine: bool
    ) -> tuple[assign.Assignment, torch.Tensor] | None:
        """The method's plan at layer i as a sanitised assignment (protected tokens kept, padding neither kept nor
        merged), with the current token sizes; None when the budget keeps every token.

        The fixed-count case (no padding so far, a method that keeps the same count in every sample) is planned from
        the shapes alone: the keep count is a Python int, the method gets it as one and the output count is
        :meth:`Method.output_count`; nothing is read back from the data, so ``torch.compile`` traces it whole."""
        b, n, _ = x.shape
        P = self.adapter.num_protected
        fixed = st.valid is None and not self.method.dynamic and isinstance(st.content, int)
        size = st.size if st.size is not None else torch.ones(b, n, dtype=torch.float32, device=x.device)
        valid = st.valid if st.valid is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        inp = ReduceInput(
            x=x,
            size=size,
            valid=valid,
            num_protected=P,
            layer=i,
            num_layers=len(self.adapter.layers),
            grid=st.grid,
            pristine=pristine and st.layout.padding is None,
            signals=signals,
            calibrating=self.calibrating,
            layout=st.layout,
            fixed=n - P if fixed else None,
            order=st.order,
        )
        n_out: int | None = None
        if fixed:
            assert isinstance(st.content, int)
            k = st.schedule.keep_fixed(i, n - P, st.content)
            if st.schedule.site == "block" and k >= n - P:
                return None
            got = self.method.reduce(inp, k)
            n_out = P + self.method.output_count(k, inp)
        else:
            if torch.compiler.is_compiling():
                check_traceable(self.method.name, "the input is padded (its samples have different real-token counts)")
            keep_n = st.schedule.keep_at(i, inp.counts, st.content, self.method.dynamic)
            if st.schedule.site == "block" and bool((keep_n >= inp.counts).all()):
                return None
            got = plan_grouped(self.method, inp, keep_n, trim=pristine and st.layout.padding is not None)
        keep, target = got
        st.plan_order = ordered.parts(got)[0]
        keep = keep.clone()
        keep[:, :P] = True
        if not fixed:
            keep &= valid
        if target is not None:  # (fixed count: every token is valid)
            target = target.masked_fill(keep if fixed else keep | ~valid, -1)
            target[:, :P] = -1
        return assign.build(keep, target, n_out), size

    def _reduce(self, st: CallState, i: int, x: torch.Tensor) -> torch.Tensor:
        got = self.assignment(st, i, x, _Signals(self, st), st.pristine)
        assert got is not None
        plan, size = got
        x_new, size_new = assign.merge(x, size, plan)
        st.valid = assign.slot_valid(plan)  # None: every token is valid
        st.size = size_new
        st.n_cur = plan.n_out
        assert st.source is not None
        st.source.add(plan.dst)  # composed only if someone reads it (unmerge, info().source)
        st.order = ordered.ranks(plan, st.plan_order)  # an official mode's token order, for the next point
        st.pristine = False
        st.sized = st.sized or plan.merges  # some token stands for more than one (sizes stay > 1 once merged)
        needed = st.valid is not None or (st.sized and self.prop_attn)
        st.bias = key_bias(size_new, st.valid, self.prop_attn) if needed else None
        for d in (st.q, st.k, st.k_mean):  # signals of earlier layers are stale now
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
        reduced = st.source is not None and not st.source.empty
        self._out_bias = None if (self.unmerge and reduced) else st.bias
        self.last = TokenInfo(
            grid=st.grid,
            num_protected=P,
            tokens_per_layer=st.tokens,
            size=st.size,
            valid=st.valid,
            kept=kept,
            source_map=st.source if reduced else None,
            layer_valid=st.layer_valid,
            order=None if st.order is None else torch.argsort(st.order, dim=1),
            dims=self.adapter.dims,
        )
        if self.unmerge and reduced:
            assert st.source is not None
            return self.adapter.finish(out, st.source.compose(), True)
        return None

    def describe(self) -> dict[str, Any]:
        """The plan for the default input (explain()'s ``applied``)."""
        a, s = self.adapter, self.schedule
        lay = a.default_layout
        ip = None
        if s.input_fraction is not None:
            p = a.input_patch
            hh, ww = self.method.input_size(lay.grid[0] * p, lay.grid[1] * p, p, s.input_fraction)
            ip = (hh // p) * (ww // p)
        counts, n_out = tokens_per_layer(s, lay.content, lay.protected, ip)
        return {
            "method": self.method.name,
            "params": self.method.p,
            "schedule": s.describe(),
            "tokens_per_layer": counts,
            "tokens_out": n_out,
            "flops_fraction": flops_fraction(s, a.dims, lay.grid, ip),
            # plans are made per input shape: these are the default input's; dynamic methods (dtome) keep a
            # different count per image: the real counts of a call are in tokenthin.info(model).sample_tokens
            "planned_for": {"grid": lay.grid, "tokens": lay.tokens},
            "dynamic": self.method.dynamic,
            **({"calibration": self.method.calibration_info()} if hasattr(self.method, "calibration_info") else {}),
        }
