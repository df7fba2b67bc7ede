"""The denoiser runtime: block-local merge -> compute -> unmerge at a denoiser host's seams
(:mod:`tokenthin.adapters.denoiser`).

Per denoiser call (the root's pre-hook opens it): each chosen block's pre-hook plans one assignment from the
block's input tokens (the method's plan, :mod:`tokenthin.ops.assign`); the pre-hook of a chosen part's first
``enter`` module merges that module's input (later ``enter`` modules reuse the merged tensor when they receive the
same input), the hook on its ``exit`` module unmerges the output (every token gets its slot's value), and the
block's post-hook forgets the assignment. Where the parts see a joint sequence (the adapter's ``block_prefix``:
text tokens first), only the image tokens after the prefix are merged and unmerged. A block that merges nothing
(``int(N * ratio) == 0``), or too little to pay for planning the merge (:mod:`tokenthin.denoise.cost`), is left
alone.
Removing the hooks restores the model exactly. Nothing survives a call but the :class:`DenoiseInfo` summary (and,
in soft mode with ``reuse_steps > 1``, the reused plans, owned by this runtime and dropped by ``detach()``).

The method's ``block_mode`` picks how a plan acts (:class:`~tokenthin.denoise.state.BlockOptions`):

* ``"merge"``: as above; the merge itself is the method's ``block_merge`` (the mean per slot; ToFu: MLERP, or
  selection in the blocks where it prunes); the unmerge copies each token's slot;
* ``"kv"``: only the ``attn`` part, and only its key / value inputs (the adapter's ``kv_inputs``: ``to_k`` /
  ``to_v``) are reduced by the assignment; queries and the output keep every token, nothing is unmerged (ToDo);
* ``"soft"``: the plan is the method's ``soft_plan`` (:class:`~tokenthin.ops.soft.SoftPlan`, a many-to-many merge
  and unmerge: ToMA), applied at the same enter / exit seams as ``"merge"``.
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
from ..ops import assign, soft
from ..ops.soft import SoftPlan
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
        self.overhead_by: dict[str, float] = {}  # the same split by kind: "plan", "merge", "unmerge"
        self.clock = time.perf_counter  # benchmarks may set time.thread_time (one-thread CPU time)
        self._st: DenoiseCall | None = None
        self._calls = 0  # denoiser calls opened (soft-plan reuse counts them)
        # the default (mean) merge takes the precomputed row path; a method's own merge (ToFu's MLERP) does not
        self._mean_merge = type(method).block_merge is Method.block_merge
        self._soft_cache: dict[int, tuple[int, tuple, SoftPlan]] = {}  # block -> (call planned, input key, plan)

    # ----- hook management -----
    def attach(self) -> None:
        try:
            self._attach()
        except BaseException:  # a seam refused (e.g. a processor it cannot wrap): leave the model as it was
            self.detach()
            raise

    def _attach(self) -> None:
        a = self.adapter
        self.handles.append(a.root.register_forward_pre_hook(self._start, with_kwargs=True))
        self.handles.append(a.root.register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for i in self.options.blocks:
            blk = a.blocks[i]
            self.handles.append(blk.module.register_forward_pre_hook(self._make_block_pre(i), with_kwargs=True))
            self.handles.append(blk.module.register_forward_hook(self._make_block_post(i), always_call=True))
            for key, part in blk.parts.items():
                if part.role not in self.options.parts:
                    continue
                if self.options.mode == "kv":
                    for k, mod in enumerate(a.kv_inputs(part)):
                        self.handles.append(mod.register_forward_pre_hook(self._make_kv(i, key, first=k == 0)))
                    continue
                self.handles.extend(a.part_seams(i, key, part))
                for k, mod in enumerate(part.enter):
                    hook = self._make_enter(i, key, first=k == 0)
                    self.handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
                self.handles.append(part.exit.register_forward_hook(self._make_exit(i, key)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._st = None
        self._soft_cache.clear()

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
        self._calls += 1

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
            self._toc(x, t0, "plan")
            if merge is not None:
                merge.prefix = self.adapter.block_prefix(i, args, kwargs)
                st.active[i] = merge

        return pre

    def _make_block_post(self, i: int):
        def post(_m: nn.Module, _args: tuple, _out: Any) -> None:
            st = self._st
            merge = None if st is None else st.active.pop(i, None)
            if merge is None:
                return
            blk = self.adapter.blocks[i]
            missing = [k for k, p in blk.parts.items() if p.role in self.options.parts and k not in merge.done]
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
        reads = "keys" in self.method.signals
        if not cost.worth_merging(n, r, x.shape[-1], self.options.parts, reads, self.options.soft_tile):
            st.tokens.append(n)  # nothing to merge, or too little to pay for the planning (denoise/cost.py)
            return None
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        inp = ReduceInput(
            x=x,
            size=torch.ones(b, n, dtype=torch.float32, device=x.device),
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
        if self.options.mode == "soft":
            plan = self._soft(i, inp, keep_n)
            st.tokens.append(plan.k)
            return None if plan.k == n else BlockMerge(n=n, soft=plan)
        with torch.no_grad():
            keep, target = self.method.reduce(inp, keep_n)
            keep = keep & valid
            if target is not None:
                target = target.masked_fill(keep, -1)
            a = assign.build(keep, target)
            source = assign.compose_source(torch.arange(n, device=x.device).expand(b, n), a)
        if self.options.mode == "kv" and not a.uniform:
            raise TokenThinError(
                f"'{self.method.name}' reduced the keys of {self.adapter.blocks[i].name} to different counts per "
                "sample, which attention cannot take without a mask; run samples with different timesteps apart"
            )
        st.tokens.append(a.n_out)
        if a.n_out == n:
            return None
        return BlockMerge(n=n, a=a, source=source, rows=fast.plan(a, source) if self._mean_merge else None)

    def _soft(self, i: int, inp: ReduceInput, keep_n: torch.Tensor) -> SoftPlan:
        """Block i's soft plan: reused from an earlier call while ``reuse_steps`` allows, else planned now."""
        x = inp.x
        key = (tuple(x.shape), x.device, x.dtype)
        hit = self._soft_cache.get(i)
        if hit is not None and hit[1] == key and self._calls - hit[0] < self.options.reuse_steps:
            return hit[2]
        with torch.no_grad():
            plan = self.method.soft_plan(inp, keep_n)
        if self.options.reuse_steps > 1:
            self._soft_cache[i] = (self._calls, key, plan)
        return plan

    # ----- parts -----
    def _make_enter(self, i: int, role: str, first: bool):  # role: the part's key in the block's parts
        a = self.adapter

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self._st
            merge = None if st is None else st.active.get(i)
            if merge is None:
                return None
            t = a.layer_input(args, kwargs)
            if not first:  # q / k / v of one attention: merge only the tensor the first projection received
                memo = merge.memo.get(role)
                if memo is None or memo[0] is not t:
                    return None
                return a.enter_args(i, args, kwargs, memo[1], self._slots(merge))
            p = merge.prefix  # leading tokens that are not image tokens (text in a joint sequence): left alone
            if t.dim() != 3 or t.shape[1] != p + merge.n:
                raise TokenThinError(
                    f"the {role} part of {a.blocks[i].name} received {tuple(t.shape)}, not the block's "
                    f"{p + merge.n} tokens (forward chunking?); disable it or skip the part"
                )
            t0 = self._tic(t)
            xm = self._merge(i, t[:, p:] if p else t, merge)
            if p:
                xm = torch.cat([t[:, :p], xm], dim=1)
            self._toc(t, t0, "merge")
            merge.memo[role] = (t, xm)
            return a.enter_args(i, args, kwargs, xm, self._slots(merge))

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
            p = merge.prefix
            yi = y[:, p:] if p else y
            if merge.soft is not None:
                full = soft.unmerge(yi, merge.soft)
            elif merge.rows is not None:
                full = fast.unmerge(yi, merge.rows)
            else:
                full = assign.unmerge(yi, merge.source)
            if p:
                full = torch.cat([y[:, :p], full], dim=1)
            self._toc(y, t0, "unmerge")
            merge.done.add(role)
            del merge.memo[role]
            return a.with_layer_output(out, full)

        return post

    @staticmethod
    def _slots(merge: BlockMerge) -> torch.Tensor | None:
        """(B, N') the block-input token each merged slot is built around (None: a soft plan without one)."""
        if merge.a is not None:
            return merge.a.slot_src
        return None if merge.soft is None else merge.soft.dst

    def _merge(self, i: int, t: torch.Tensor, merge: BlockMerge) -> torch.Tensor:
        if merge.soft is not None:
            return soft.merge(t, merge.soft)
        if merge.rows is not None:  # the mean merge, precomputed per block call (denoise/fast.py)
            return fast.merge(t, merge.rows)
        assert merge.a is not None
        with torch.no_grad():
            return self.method.block_merge(t, merge.a, i, len(self.adapter.blocks))

    def _make_kv(self, i: int, role: str, first: bool):
        """Mode "kv": the pre-hook of a key / value projection reduces its input tokens (queries untouched)."""
        a = self.adapter

        def pre(_m: nn.Module, args: tuple) -> tuple | None:
            st = self._st
            merge = None if st is None else st.active.get(i)
            if merge is None:
                return None
            t = args[0]
            memo = merge.memo.get(role)
            if memo is not None and memo[0] is t:  # the value projection gets the tensor the key projection got
                return (memo[1], *args[1:])
            if t.dim() != 3 or t.shape[1] != merge.n:
                raise TokenThinError(
                    f"the keys of {a.blocks[i].name} come from {tuple(t.shape)}, not the block's {merge.n} tokens "
                    "(cross-attention or forward chunking?); this method reduces self-attention keys only"
                )
            t0 = self._tic(t)
            xm = self._merge(i, t, merge)
            self._toc(t, t0, "merge")
            if first:
                merge.memo[role] = (t, xm)
            merge.done.add(role)
            return (xm, *args[1:])

        return pre

    # ----- timing (benchmarks) -----
    def _tic(self, x: torch.Tensor) -> float:
        if not self.measure:
            return 0.0
        _sync(x.device)
        return self.clock()

    def _toc(self, x: torch.Tensor, t0: float, kind: str) -> None:
        if self.measure:
            _sync(x.device)
            dt = self.clock() - t0
            self.overhead_s += dt
            self.overhead_by[kind] = self.overhead_by.get(kind, 0.0) + dt

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
