"""The denoiser runtime: block-local merge -> compute -> unmerge at a denoiser host's seams
(:mod:`tokenthin.adapters.denoiser`).

Per denoiser call (the root's pre-hook opens it): each chosen block's pre-hook plans one assignment from the
block's input tokens (the method's plan, :mod:`tokenthin.ops.assign`); the pre-hook of a chosen part's first
``enter`` module merges that module's input (later ``enter`` modules reuse the merged tensor when they receive the
same input), the hook on its ``exit`` module unmerges the output (every token gets its slot's value), and the
block's post-hook forgets the assignment. A block that merges nothing (``int(N * ratio) == 0``), or too little to
pay for planning the merge (:mod:`tokenthin.denoise.cost`), is left alone.
Removing the hooks restores the model exactly. Nothing survives a call but the :class:`DenoiseInfo` summary.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..adapters.denoiser import DenoiserAdapter
from ..errors import InputMismatchError, TokenThinError
from ..layout import Layout
from ..methods.base import Method, ReduceInput
from ..ops import assign
from ..runtime.block import BlockSignals
from ..runtime.state import _sync
from . import cost, fast
from .state import BlockMerge, BlockOptions, DenoiseCall, DenoiseInfo


class DenoiserRuntime:
    """One application of one method to one denoiser."""

    def __init__(self, model: nn.Module, adapter: DenoiserAdapter, method: Method, options: BlockOptions) -> None:
        self.model, self.adapter, self.method, self.options = model, adapter, method, options
        self.handles: list[Any] = []
        self.last: DenoiseInfo | None = None
        self.calibrating = False
        self.measure = False  # accumulate the time spent planning, merging and unmerging into ``overhead_s``
        self.overhead_s = 0.0
        self._st: DenoiseCall | None = None

    # ----- hook management -----
    def attach(self) -> None:
        a = self.adapter
        self.handles.append(a.root.register_forward_pre_hook(self._start, with_kwargs=True))
        self.handles.append(a.root.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for i in self.options.blocks:
            blk = a.blocks[i]
            self.handles.append(blk.module.register_forward_pre_hook(self._make_block_pre(i), with_kwargs=True))
            self.handles.append(blk.module.register_forward_hook(self._make_block_post(i), always_call=True))
            for role in self.options.parts:
                part = blk.parts.get(role)
                if part is None:
                    continue
                for k, mod in enumerate(part.enter):
                    hook = self._make_enter(i, role, first=k == 0)
                    self.handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
                self.handles.append(part.exit.register_forward_hook(self._make_exit(i, role)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._st = None

    # ----- the call -----
    def _start(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        a = self.adapter
        cg = a.call_grid(args, kwargs)
        param = next(a.root.parameters())
        if cg.x.device != param.device:
            raise InputMismatchError(
                f"the input is on {cg.x.device} but the denoiser is on {param.device}; move one of them"
            )
        self._st = DenoiseCall(latent=cg.latent, batch=cg.batch, step=a.timestep(args, kwargs, cg.batch))

    def _finish(self, _m: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
        st, self._st = self._st, None
        if st is None:
            return
        self.last = DenoiseInfo(
            latent=st.latent,
            blocks=st.blocks,
            grids=st.grids,
            tokens_in=st.tokens_in,
            tokens_per_layer=st.tokens,
            parts=self.options.parts,
        )

    # ----- blocks -----
    def _make_block_pre(self, i: int):
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            st = self._st
            if st is None:  # the block was called outside a denoiser call: leave it alone
                return
            x = self.adapter.block_tokens(i, args, kwargs)
            t0 = self._tic(x)
            merge = self._plan(st, i, x)
            self._toc(x, t0)
            if merge is not None:
                st.active[i] = merge

        return pre

    def _make_block_post(self, i: int):
        def post(_m: nn.Module, _args: tuple, _out: Any) -> None:
            st = self._st
            merge = None if st is None else st.active.pop(i, None)
            if merge is None:
                return
            blk = self.adapter.blocks[i]
            missing = [r for r in self.options.parts if r in blk.parts and r not in merge.done]
            if missing:
                raise TokenThinError(
                    f"the {', '.join(missing)} part of {blk.name} never ran on its tokens through the hooked modules "
                    "(fused projections, forward chunking or a custom processor bypass them); undo that, or pass "
                    "merge_attn/merge_crossattn/merge_mlp to skip the part"
                )

        return post

    def _plan(self, st: DenoiseCall, i: int, x: torch.Tensor) -> BlockMerge | None:
        b, n, _ = x.shape
        r = int(n * self.options.ratio)
        grid = self.adapter.block_grid(i, st.latent, n)
        st.blocks.append(i)
        st.grids.append(grid)
        st.tokens_in.append(n)
        if not cost.worth_merging(n, r, x.shape[-1], self.options.parts, "keys" in self.method.signals):
            st.tokens.append(n)  # nothing to merge, or too little to pay for the planning (denoise/cost.py)
            return None
        ones = torch.ones(b, n, dtype=torch.float32, device=x.device)
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        inp = ReduceInput(
            x=x,
            size=ones,
            valid=valid,
            num_protected=0,
            layer=i,
            num_layers=len(self.adapter.blocks),
            grid=grid,
            pristine=True,
            signals=BlockSignals(x),
            calibrating=self.calibrating,
            layout=Layout(protected=0, grid=grid),
            step=st.step,
        )
        keep_n = torch.full((b,), n - r, dtype=torch.long, device=x.device)
        with torch.no_grad():
            keep, target = self.method.reduce(inp, keep_n)
            keep = keep & valid
            if target is not None:
                target = target.masked_fill(keep, -1)
            a = assign.build(keep, target)
            source = assign.compose_source(torch.arange(n, device=x.device).expand(b, n), a)
        st.tokens.append(a.n_out)
        if a.n_out == n:
            return None
        return BlockMerge(a=a, source=source, n=n, ones=ones, rows=fast.plan(a, source))

    # ----- parts -----
    def _make_enter(self, i: int, role: str, first: bool):
        a = self.adapter

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self._st
            merge = None if st is None else st.active.get(i)
            if merge is None:
                return None
            t = a.layer_input(args, kwargs)
            if not first:  # q / k / v of one attention: merge only the tensor the first projection received
                memo = merge.memo.get(role)
                return None if memo is None or memo[0] is not t else a.with_layer_input(args, kwargs, memo[1])
            if t.dim() != 3 or t.shape[1] != merge.n:
                raise TokenThinError(
                    f"the {role} part of {a.blocks[i].name} received {tuple(t.shape)}, not the block's "
                    f"{merge.n} tokens (forward chunking?); disable it or skip the part"
                )
            t0 = self._tic(t)
            xm = fast.merge(t, merge.rows) if merge.rows is not None else fast.general_merge(t, merge.ones, merge.a)
            self._toc(t, t0)
            merge.memo[role] = (t, xm)
            return a.with_layer_input(args, kwargs, xm)

        return pre

    def _make_exit(self, i: int, role: str):
        a = self.adapter

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            st = self._st
            merge = None if st is None else st.active.get(i)
            if merge is None or role not in merge.memo or role in merge.done:
                return None
            y = a.layer_output(out)
            t0 = self._tic(y)
            full = fast.unmerge(y, merge.rows) if merge.rows is not None else assign.unmerge(y, merge.source)
            self._toc(y, t0)
            merge.done.add(role)
            del merge.memo[role]
            return a.with_layer_output(out, full)

        return post

    # ----- timing (benchmarks) -----
    def _tic(self, x: torch.Tensor) -> float:
        if not self.measure:
            return 0.0
        _sync(x.device)
        return time.perf_counter()

    def _toc(self, x: torch.Tensor, t0: float) -> None:
        if self.measure:
            _sync(x.device)
            self.overhead_s += time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        """The plan (explain()'s ``applied``)."""
        o, blocks = self.options, self.adapter.blocks
        return {
            "method": self.method.name,
            "params": self.method.p,
            "schedule": o.describe(),
            "blocks": [blocks[i].name for i in o.blocks],
            "levels": sorted({blocks[i].level for i in o.blocks}),
            "parts": list(o.parts),
            # each block call merges int(N * ratio) of its N tokens, N as fed: tokenthin.info(model) has the counts
            "ratio": o.ratio,
        }
