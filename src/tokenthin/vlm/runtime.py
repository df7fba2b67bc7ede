"""The vision-language runtime: hook wiring only. The work is done by functions that take the call's state
explicitly: :mod:`.prefill` (the ``output`` site), :mod:`.decode` (decoding steps), :mod:`.inllm` (``llm:k``),
:mod:`.tower` (sites inside the vision tower), :mod:`.plan` and :mod:`.signals`. Every Hugging Face name (module
attributes, call keywords, mask formats, rotary details) is the adapter's
(:class:`~tokenthin.adapters.hf_vlm.VLMAdapter`)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..adapters.hf_vlm import LMCall, VLMAdapter
from ..errors import TokenThinError
from ..methods.base import Method
from ..runtime import _sync
from .decode import deep_layer, translate
from .inllm import prefill_layer, reduce_at_point
from .prefill import keep_prompt, shorten_prompt, start_prefill
from .schedule import VLMSchedule
from .state import Call, Carry, Prefix, VLMInfo
from .tower import unmerge_features

T = TypeVar("T")


class VLMRuntime:
    """One application of one method to one vision-language model."""

    def __init__(
        self,
        model: nn.Module,
        adapter: VLMAdapter,
        method: Method,
        schedule: VLMSchedule,
        tower: Any = None,
        shown: Method | None = None,
    ) -> None:
        self.model, self.adapter, self.method, self.schedule = model, adapter, method, schedule
        # tower: an encoder runtime reducing inside the vision tower (sites 'layers' / 'layer:k'); then ``method``
        # only collapses its duplicated slots before the language model and ``shown`` is the user's method
        self.tower, self.shown = tower, shown or method
        self.handles: list[Any] = []
        self.last: VLMInfo | None = None
        self._call: Call | None = None
        self._prefixes: weakref.WeakKeyDictionary[Any, Prefix] = weakref.WeakKeyDictionary()
        self._carry = Carry()
        self.measure = False
        self.overhead_s = 0.0
        self.clock: Callable[[], float] = time.perf_counter  # benchmarks may count thread CPU time instead
        self.calibrating = False
        self.points = [k for k, _ in schedule.llm]
        self.point_keep = dict(schedule.llm)
        v = adapter.vision
        self.capture: set[int] = set()
        vision_signals = method.signals & {"keys", "cls_attn", "mean_attn"}
        if vision_signals and v is None:
            raise TokenThinError(
                f"method '{method.name}' reads the vision tower's attention or keys, which tokenthin does not "
                f"capture on {adapter.family} (a fused, packed vision tower); use a method that reads the visual "
                "tokens themselves (divprune, kcenter, coverage, random, pool) or the language model (fastv)"
            )
        if schedule.output_keep is not None and vision_signals and v is not None:
            for layer in method.signal_layers(adapter.feature_layer, len(v.layers)):
                self.capture.add(layer % len(v.layers))
        self.need_q = bool(method.signals & {"cls_attn", "mean_attn"})
        self.need_lm_attn = bool(self.points) and bool(method.signals & {"last_attn", "lm_attn"})

    def describe(self) -> dict[str, Any]:
        """explain()'s ``applied``: the user's method and its plan (inside the tower: the tower's schedule)."""
        plan = self.tower.schedule.describe() if self.tower is not None else self.schedule.describe()
        return {"method": self.shown.name, "params": self.shown.p, "schedule": plan}

    # ----- hooks -----
    def attach(self) -> None:
        """Install the hooks; a no-op when they are installed already (a second set would reduce twice)."""
        if self.handles:
            return
        a = self.adapter
        if self.tower is not None:
            self.tower.attach()
            self.handles.extend(a.hook_projector(pre=self._unmerge_features))
        self.handles.append(a.root.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self.handles.append(a.root.register_forward_hook(self._root_post, always_call=True))
        if a.top is not a.root:
            self.handles.append(a.top.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(a.vision_root.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        if a.needs_projected:
            self.handles.extend(a.hook_projector(post=self._projector_post))
        self.handles.append(a.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(a.lm.register_forward_hook(self._lm_post, with_kwargs=True))
        for i in sorted(self.capture):
            assert a.vision is not None  # capture is empty when the host has no ViT-like tower
            qm, km = a.vision.qk_modules(i)
            self.handles.append(km.register_forward_hook(self._capture(i, "k")))
            if self.need_q:
                self.handles.append(qm.register_forward_hook(self._capture(i, "q")))
        if not self.points:
            return
        for j in range(self.points[0], len(a.lm_layers)):
            layer = a.lm_layers[j]
            self.handles.append(layer.register_forward_pre_hook(self._layer_pre(j), with_kwargs=True))
            if j in self.point_keep:
                self.handles.append(layer.register_forward_hook(self._point_post(j)))
                if self.need_lm_attn:
                    qm, km = a.lm_qk_modules(j)
                    self.handles.append(qm.register_forward_hook(self._lm_capture(j, "q")))
                    self.handles.append(km.register_forward_hook(self._lm_capture(j, "k")))

    def detach(self) -> None:
        if self.tower is not None:
            self.tower.detach()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._call = None
        self._prefixes = weakref.WeakKeyDictionary()

    def _capture(self, i: int, which: str) -> Callable[..., None]:
        # generate() in transformers 5.24 runs the vision tower before the multimodal model's forward, so captures
        # are kept (in the carry) until the next prefill picks them up
        def cap(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            (self._carry.q if which == "q" else self._carry.k)[i] = out.detach()

        return cap

    def _lm_capture(self, j: int, which: str) -> Callable[..., None]:
        def cap(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            c = self._call
            if c is not None and c.prefill:
                (c.lm_q if which == "q" else c.lm_k)[j] = out.detach()

        return cap

    def _vision_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        self._carry.layout = self.adapter.layout(args, kwargs)

    def _unmerge_features(self, feats: torch.Tensor | None) -> torch.Tensor | None:
        """Scatter the tower's reduced features back over every patch, so the host's image-token count still
        matches; the slots are collapsed again before the language model."""
        info = self.tower.last if self.tower is not None else None
        self._carry.tower_source = info.source if info is not None else None
        if info is None or info.source is None or feats is None:
            return None  # nothing was reduced in the tower
        return unmerge_features(feats, info.source, self.adapter.drops_protected)

    def _projector_post(self, out: torch.Tensor) -> None:
        self._carry.projected = out.detach()

    def _top_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.adapter.labels_given(kwargs):
            raise TokenThinError(
                "tokenthin shortens the sequence the language model reads, so labels no longer line up; compute "
                "a loss on the unreduced model (tokenthin.remove) or from the returned logits yourself"
            )

    def _root_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        a = self.adapter
        rc = a.root_call(args, kwargs)
        if a.cache_len(rc.cache) > 0:
            self._call = Call(prefill=False, prefix=self._prefixes.get(rc.cache))
            return
        c = Call(prefill=True, vis=a.image_tokens(rc))
        self._call = c
        if rc.pixels is not None:  # the tower runs inside this call: drop what an earlier one left
            self._carry.q, self._carry.k, self._carry.layout, self._carry.projected = {}, {}, None, None
        c.q, c.k = self._carry.q, self._carry.k

    def _root_post(self, _m: nn.Module, _args: tuple, _out: Any) -> None:
        c, self._call = self._call, None
        if c is None or not c.prefill or c.src is None:
            return
        assert c.vis is not None and c.valid is not None and c.size is not None
        self.last = VLMInfo(
            site=self.schedule.site,
            visual_tokens=c.n_vis,
            kept=(c.vis & c.valid).sum(1).tolist(),
            sequence=(c.t0, c.valid.shape[1]),
            source=c.src,
            size=c.size,
        )

    def _timed(self, fn: Callable[[], T]) -> T:
        dev = self.adapter.lm_device
        t0 = 0.0
        if self.measure:
            _sync(dev)
            t0 = self.clock()
        out = fn()  # all threads: unlike the many small ops of per-layer merging, selections here are big matmuls
        if self.measure:
            _sync(dev)
            self.overhead_s += self.clock() - t0
        return out

    # ----- the language model: prefill shortens the prompt, decoding steps are translated -----
    def _lm_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        c = self._call
        if c is None:
            return None
        if args:
            raise TokenThinError("internal: the language model was called with positional arguments")
        a = self.adapter
        lc = a.lm_call(kwargs)
        if not c.prefill:
            if c.prefix is None or self.schedule.output_keep is None:
                return None
            return args, translate(c.prefix, a, lc, kwargs)
        if lc.embeds is None:
            raise TokenThinError("internal: the language model received no input embeddings")
        a.check_prefill_mask(lc.mask)
        return self._timed(lambda: self._prefill(c, lc, kwargs))

    def _prefill(self, c: Call, lc: LMCall, kwargs: dict) -> tuple[tuple, dict] | None:
        assert lc.embeds is not None
        start_prefill(c, self.adapter, self._carry, lc.embeds, lc.mask)
        if self.schedule.output_keep is None:
            keep_prompt(c)
            return None
        collapse = self.tower is not None
        out = shorten_prompt(c, self.adapter, self.method, self._carry, self.schedule, collapse, lc, kwargs)
        return (), out

    def _lm_post(self, _m: nn.Module, _args: tuple, kwargs: dict, out: Any) -> None:
        c = self._call
        if c is None or not c.prefill or c.prefix is None:
            return None
        cache = self.adapter.cache_of(kwargs, out)
        if self.adapter.is_cache(cache):
            self._prefixes[cache] = c.prefix
        return None

    # ----- inside the language model (llm:k) -----
    def _point_post(self, k: int) -> Callable[..., Any]:
        a = self.adapter

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            c = self._call
            if c is None or not c.prefill or c.prefix is None:
                return None
            hs = a.layer_output(out)
            new = self._timed(lambda: reduce_at_point(c, a, self.method, self._carry, k, self.point_keep[k], hs))
            return a.with_layer_output(out, new)

        return post

    def _layer_pre(self, j: int) -> Callable[..., tuple[tuple, dict] | None]:
        a = self.adapter

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            c = self._call
            if c is None:
                return None
            lc = a.layer_call(args, kwargs)
            out = prefill_layer(c, a, j, j in self.point_keep, lc, kwargs) if c.prefill else None
            if not c.prefill:
                out = deep_layer(c.prefix, a, j, lc, kwargs)
            return None if out is None else (args, out)

        return pre
