"""Runtime for vision-language hosts: visual tokens reduced before the language model (``site="output"``),
inside it after decoder layer k (``site="llm:k"``), or both, at several layers (``"output+llm"``, two-stage
methods such as AIM), with ``generate()`` and its KV cache intact.

What happens in one call (see :mod:`tokenthin.adapters.hf_vlm` for the seams):

* **prefill** (an image in the prompt, an empty cache): the method sees the sample's visual tokens, padded across the
  batch, with the vision tower's signals and the prompt's text embeddings. Its plan (keep mask and merge targets,
  :mod:`tokenthin.ops.assign`) turns into a shorter sequence per sample: text tokens stay, each kept or merged
  visual slot takes the place of its representative token, and samples are re-padded on the **left** (generation
  reads the last column). The attention mask and positions are rebuilt to match.
* **decoding** (a cache this runtime filled): the caller's attention mask and positions still number the original
  prompt; they are translated to the shorter one.

Positions (choices): at ``output`` a 1-D rotary host numbers the shorter prompt 0..T'-1 (the language model sees
it as a prompt with fewer image tokens, which is what every pre-LLM method's reference code feeds it). Inside the
language model (``llm:k``) kept tokens keep their original positions: layers 0..k already used them, and their
keys in layers 0..k stay in the cache at full length; layers after k hold only the kept tokens. Hosts with
multimodal rotary positions (Qwen2-VL) never renumber.

Budgets: before the language model a fractional ``keep`` is a fraction of each prompt's visual tokens; inside it,
of the visual tokens that entered the language model. Samples whose counts or grids differ are planned one at a
time (a selection takes one k); otherwise the whole batch is planned at once.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .budget import keep_count
from .errors import BudgetError, InputMismatchError, SiteError, TokenThinError
from .methods.base import Method, ReduceInput, SignalSource
from .ops import assign
from .runtime import _sync
from .scores.attention import cls_attention, mean_attention


@dataclass(frozen=True)
class VLMSchedule:
    """Where a method reduces: before the language model (``output_keep``) and/or after language-model layers
    (``llm``: (k, keep) pairs, ascending k). A fractional keep inside the language model is a fraction of the visual
    tokens that entered it; a count is a count."""

    output_keep: float | int | None
    llm: tuple[tuple[int, float | int], ...] = ()
    keep: float | int | None = None  # what the caller asked for (describe())

    @property
    def site(self) -> str:
        parts = (["output"] if self.output_keep is not None else []) + [f"llm:{k}" for k, _ in self.llm]
        return "+".join(parts)

    def describe(self) -> str:
        return f"site={self.site} keep={self.keep}"


def parse_vlm_site(site: str | None, keep: float | int, num_lm_layers: int, method: Method) -> VLMSchedule:
    cls = type(method)
    if "output+llm" in cls.sites:  # a two-stage method (AIM, ToDRE): its own in-LLM schedule
        s = (site or "output+llm").strip().lower()
        if s != "output+llm":
            raise SiteError(
                f"method '{cls.name}' reduces before and inside the language model; its site is 'output+llm' "
                "(tune the in-LLM stage with its parameters)"
            )
        return VLMSchedule(output_keep=keep, llm=tuple(method.llm_points(num_lm_layers)), keep=keep)
    default = cls.default_site if cls.default_site.startswith("llm") else "output"
    s = (site or default).strip().lower()
    if s == "output":
        if not ({"output", "layer"} & set(cls.sites)):
            raise SiteError(f"method '{cls.name}' does not work before the language model; its sites: {cls.sites}")
        return VLMSchedule(output_keep=keep, keep=keep)
    if s.startswith("llm:"):
        generic = cls.kind in ("prune", "merge") and not cls.signals and "layer" in cls.sites
        if "llm" not in cls.sites and not generic:  # generic: reads only the tokens, so works anywhere
            raise SiteError(
                f"method '{cls.name}' does not work inside the language model; sites here: 'output' "
                f"(its sites: {', '.join(cls.sites)})"
            )
        try:
            k = int(s.split(":", 1)[1])
        except ValueError:
            raise SiteError(f"site '{site}': write llm:k with an integer k") from None
        if k < 0:
            k += num_lm_layers
        if not 0 <= k < num_lm_layers - 1:
            raise SiteError(f"site '{site}': k must be in 0..{num_lm_layers - 2} (a later layer must read the result)")
        return VLMSchedule(output_keep=None, llm=((k, keep),), keep=keep)
    raise SiteError(
        f"site '{site}' does not exist on a vision-language model; its sites are 'output' (between the vision "
        f"projector and the language model) and 'llm:k' (after language-model layer k, 0..{num_lm_layers - 2})"
    )


@dataclass
class VLMInfo:
    """What the last prefill did."""

    site: str
    visual_tokens: list[int]  # visual tokens per sample before (structure tokens such as row ends excluded)
    kept: list[int]  # visual tokens per sample after the last stage
    sequence: tuple[int, int]  # padded sequence length the language model would have read / its last layer read
    source: torch.Tensor  # (B, N_vis) visual token (in prompt order) -> its slot after the last stage, -1 dropped
    size: torch.Tensor  # (B, n_out) original visual tokens per output slot (0: padding)


@dataclass
class _Prefix:
    """How a cached prompt was shortened: lets decoding steps translate the caller's mask and positions."""

    t0: int  # prompt length as the caller numbers it
    mask: torch.Tensor  # (B, T1) bool, valid tokens of the prompt as the language model's input holds it
    shift: torch.Tensor | None  # (B,) positions to subtract from the caller's (output site, 1-D rope)
    last_pos: torch.Tensor | None  # (B,) position of the last prompt token after shortening
    deep: dict[int, torch.Tensor] = field(default_factory=dict)  # llm point k -> (B, T') valid tokens after it


@dataclass
class _Call:
    prefill: bool
    vis: torch.Tensor | None = None  # (B, T) visual tokens (candidates) of the current sequence
    valid: torch.Tensor | None = None  # (B, T) valid tokens of the current sequence
    struct: torch.Tensor | None = None  # (B, T) image-structure tokens (row ends): kept, neither visual nor text
    prefix: _Prefix | None = None
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # vision tower captures
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    lm_q: dict[int, torch.Tensor] = field(default_factory=dict)  # language-model captures at llm points
    lm_k: dict[int, torch.Tensor] = field(default_factory=dict)
    pos_emb: dict[int, Any] = field(default_factory=dict)  # rotary embeddings each llm point's layer applied
    tm: Any = None  # adapters.hf_vlm.TokenMap of the prompt's image tokens
    flat: torch.Tensor | None = None  # (B, T) vision-tower token index per prompt position (output stage)
    view: torch.Tensor | None = None  # (B, T) AnyRes view per prompt position
    vis_pos: torch.Tensor | None = None  # (B, N) sequence position of each visual token the method sees
    gather: torch.Tensor | None = None  # (B, T') positions in the language model's input that deep layers hold
    src: torch.Tensor | None = None  # (B, N_vis) original visual token -> current visual slot, -1 dropped
    size: torch.Tensor | None = None  # (B, n) sizes of the current visual slots
    n_vis: list[int] = field(default_factory=list)
    n_in: torch.Tensor | None = None  # (B,) visual tokens entering the language model
    t0: int = 0
    info: VLMInfo | None = None


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _cache_len(cache: Any, layer: int = 0) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        raise TokenThinError("tokenthin needs a transformers Cache object (e.g. DynamicCache), not legacy tuples")
    try:
        return int(cache.get_seq_length(layer))
    except (IndexError, KeyError):
        return 0


def pack(mask: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of ``mask`` (B, T) in order, padded to the largest count: (idx, valid), both
    (B, T'). ``left``: padding goes first (generation layout); else last. Padding indices point at position 0."""
    b, t = mask.shape
    counts = mask.sum(1)
    n = int(counts.max()) if b else 0
    rank = mask.long().cumsum(1) - 1
    if left:
        rank = rank + (n - counts).unsqueeze(1)
    slot = torch.where(mask, rank, torch.full_like(rank, n))
    buf = torch.zeros(b, n + 1, dtype=torch.long, device=mask.device)
    buf.scatter_(1, slot, torch.arange(t, device=mask.device).expand(b, t))
    ar = torch.arange(n, device=mask.device).unsqueeze(0)
    valid = ar >= (n - counts).unsqueeze(1) if left else ar < counts.unsqueeze(1)
    return buf[:, :n], valid


def _gather_last(x: torch.Tensor, idx: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """Gather along the last-but-feature sequence axis of positions / rotary tensors for each sample."""
    if x.dim() == 2:  # (B|1, T) positions
        return x.expand(idx.shape[0], -1).gather(1, idx)
    if x.dim() == 3 and batch_dim == 0:  # (B|1, T, d) rotary cos/sin
        x = x.expand(idx.shape[0], -1, -1)
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    # (S, B|1, T[, d]): multimodal positions / rotary (sections first)
    x = x.expand(x.shape[0], idx.shape[0], *x.shape[2:])
    g = idx.unsqueeze(0).expand(x.shape[0], -1, -1)
    if x.dim() == 4:
        g = g.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, g)


def _mask_like(valid_kv: torch.Tensor, q: int, like: Any, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, KV) causal mask over keys ``valid_kv`` (B, KV) for the last ``q`` positions, in the host's format:
    bool (True attends) unless the incoming mask is float or the host runs eager attention (additive)."""
    _b, kv = valid_kv.shape
    qi = torch.arange(q, device=valid_kv.device).unsqueeze(1) + (kv - q)
    causal = torch.arange(kv, device=valid_kv.device).unsqueeze(0) <= qi  # (q, KV)
    m = valid_kv[:, None, None, :] & causal[None, None]
    m = m | (torch.arange(kv, device=valid_kv.device).unsqueeze(0) == qi)[None, None]  # a token always sees itself
    floaty = (isinstance(like, torch.Tensor) and like.is_floating_point()) or (like is None and impl == "eager")
    if floaty:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
    return m


_PER_TOKEN = frozenset({"view", "vis_pos", "group"})  # extras laid out like the visual tokens (B, N)


class CollapseSlots:
    """The language model's side of a reduction inside the vision tower: one token per reduced slot."""

    name = "collapse"
    kind = "prune"
    sites = ("output",)
    signals: frozenset[str] = frozenset()
    dynamic = False
    p: dict[str, Any] = {}

    def signal_layers(self, point_layer: int, num_layers: int) -> list[int]:
        return []

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = inp.extras["group"]  # (B, N) reduced slot of every visual token, -1 dropped
        if group is None:  # nothing was reduced in the tower
            return inp.valid.clone(), None
        b, n = group.shape
        first = torch.full((b, int(group.max()) + 2), n, dtype=torch.long, device=group.device)
        pos = torch.arange(n, device=group.device).expand(b, n)
        first.scatter_reduce_(1, group + 1, pos, "amin")
        keep_mask = (first.gather(1, group + 1) == pos) & (group >= 0) & inp.valid
        return keep_mask, None


class _VLMSignals(SignalSource):
    """Signals of one reduction point, laid out like the method's padded visual tokens (B, N)."""

    def __init__(
        self, rt: VLMRuntime, call: _Call, flat: torch.Tensor, rows: torch.Tensor | None = None, n: int | None = None
    ) -> None:
        self.rt, self.call, self.flat = rt, call, flat  # flat: (B, N) index into the tower's image-major tokens
        self.rows, self.n = rows, n  # planning one sample: its row, and its own token count
        v = rt.adapter.vision
        self.has_cls = v is not None and v.num_protected >= 1

    def _sel(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows][:, : self.n]

    def _pick(self, per_image: torch.Tensor) -> torch.Tensor:
        per_image = per_image[:, self.rt.adapter.drops_protected :]
        flat = per_image.reshape(-1, *per_image.shape[2:])
        return flat[self.flat.clamp(max=flat.shape[0] - 1)]

    def _qk(self, layer: int, need_q: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        c = self.call
        if layer not in c.k or (need_q and layer not in c.q):
            raise TokenThinError(
                f"no vision-tower keys at layer {layer}: the vision tower's signals exist before the language "
                "model only (site 'output')"
            )
        return c.q.get(layer), c.k[layer]

    def keys(self, layer: int) -> torch.Tensor:
        _, k = self._qk(layer, False)
        b, n, _ = k.shape
        return self._pick(k.view(b, n, self.rt.adapter.vision.num_heads, -1).mean(2))

    def cls_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        v = self.rt.adapter.vision
        return self._pick(cls_attention(q, k, v.num_heads, v.scale))

    def mean_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        v = self.rt.adapter.vision
        return self._pick(mean_attention(q, k, v.num_heads, v.scale))

    def last_token_attention(self, layer: int) -> torch.Tensor:
        """(B, N) attention the last prompt token pays each visual token in language-model layer ``layer``,
        averaged over heads (the softmax runs over the whole prompt)."""
        logits = self.rt.lm_logits(self.call, layer, last_only=True)[:, :, 0]  # (B, H, T)
        att = logits.softmax(-1).mean(1)
        assert self.call.vis_pos is not None
        return self._sel(att.gather(1, self.call.vis_pos))

    def lm_attention_logits(self, layer: int) -> torch.Tensor:
        """(B, H, T, T) attention logits of language-model layer ``layer`` over the current sequence (scaled,
        causal and padding masked with -inf); ``extras["vis_pos"]`` says where the visual tokens are."""
        logits = self.rt.lm_logits(self.call, layer, last_only=False)
        return logits if self.rows is None else logits[self.rows]


class VLMRuntime:
    """One application of one method to one vision-language model."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Any,
        method: Method,
        schedule: VLMSchedule,
        tower: Any = None,
        shown: Method | None = None,
    ) -> None:
        self.model, self.adapter, self.method, self.schedule = model, adapter, method, schedule
        # tower: an encoder runtime reducing inside the vision tower (sites 'layers' / 'layer:k'); then ``method``
        # only collapses its duplicated slots before the language model and ``shown`` is the user's method
        self.tower, self.shown = tower, shown or method
        self._tower_source: torch.Tensor | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.last: VLMInfo | None = None
        self._call: _Call | None = None
        self._prefixes: weakref.WeakKeyDictionary[Any, _Prefix] = weakref.WeakKeyDictionary()
        self._vq: dict[int, torch.Tensor] = {}
        self._vk: dict[int, torch.Tensor] = {}
        self._layout: list[tuple[int, tuple[int, int]]] | None = None  # of the last vision-tower call
        self._projected: torch.Tensor | None = None  # the projector's last output, for hosts that re-pack it
        self.measure = False
        self.overhead_s = 0.0
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
        a = self.adapter
        if self.tower is not None:
            self.tower.attach()
            self.handles.append(a.root.multi_modal_projector.register_forward_pre_hook(self._unmerge_features))
        self.handles.append(a.root.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self.handles.append(a.root.register_forward_hook(self._root_post, always_call=True))
        if a.top is not a.root:
            self.handles.append(a.top.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(a.vision_root.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        if a.needs_projected:
            self.handles.append(a.root.multi_modal_projector.register_forward_hook(self._projector_post))
        self.handles.append(a.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(a.lm.register_forward_hook(self._lm_post, with_kwargs=True))
        for i in sorted(self.capture):
            qm, km = a.vision.qk_modules(i)  # capture is empty when the host has no ViT-like tower
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

    def _capture(self, i: int, which: str):
        # generate() in transformers 5.24 runs the vision tower before the multimodal model's forward (it passes
        # mm_encoder_outputs), so captures are kept until the next prefill picks them up
        def cap(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            (self._vq if which == "q" else self._vk)[i] = out.detach()

        return cap

    def _lm_capture(self, j: int, which: str):
        def cap(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            c = self._call
            if c is not None and c.prefill:
                (c.lm_q if which == "q" else c.lm_k)[j] = out.detach()

        return cap

    def _vision_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        self._layout = self.adapter.layout(args, kwargs)

    def _unmerge_features(self, _m: nn.Module, args: tuple) -> tuple | None:
        """Scatter the tower's reduced features back over every patch (merged patches share their slot's
        features), so the host's image-token count still matches; the slots are collapsed again before the
        language model."""
        info = self.tower.last if self.tower is not None else None
        self._tower_source = info.source if info is not None else None
        if info is None or info.source is None or not args:
            return None  # nothing was reduced in the tower
        feats = args[0]  # (B_img, n_reduced - dropped, D): the host dropped its leading [CLS]
        drop = self.adapter.drops_protected
        src = info.source[:, drop:]  # (B_img, N0 - drop) reduced slot of every original token
        idx = (src - drop).clamp(min=0)
        full = assign.rows(feats, idx).masked_fill((src < 0).unsqueeze(-1), 0)
        return (full, *args[1:])

    def _projector_post(self, _m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        self._projected = out.detach()

    def _top_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise TokenThinError(
                "tokenthin shortens the sequence the language model reads, so labels no longer line up; compute "
                "a loss on the unreduced model (tokenthin.remove) or from the returned logits yourself"
            )

    def _root_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        a = self.adapter
        ids = kwargs.get("input_ids", args[0] if args else None)
        pv = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        cache = _cache_of(kwargs)
        if _cache_len(cache) > 0:
            self._call = _Call(prefill=False, prefix=self._prefixes.get(cache))
            return
        if ids is None:
            raise TokenThinError(
                "pass input_ids (not inputs_embeds) while tokenthin is applied: it finds the image tokens by their id"
            )
        vis = ids == a.image_token_id
        per = vis.sum(1)
        mm = kwargs.get("mm_encoder_outputs") or {}
        has_image = pv is not None or (isinstance(mm, dict) and mm.get("image") is not None)
        if not has_image or not bool((per > 0).all()):
            which = "the prompt has" if ids.shape[0] == 1 else f"sample(s) {(per == 0).nonzero().flatten().tolist()}"
            raise TokenThinError(
                f"prompt without image: {which} no image token (id {a.image_token_id})"
                + ("" if has_image else " and no pixel_values were given")
                + "; tokenthin reduces visual tokens, so every prompt of a call needs an image. Run text-only "
                "prompts with tokenthin.remove(model), or outside a `with tokenthin.applied(...)` block"
            )
        param = next(a.root.parameters())
        if pv is not None and not pv.is_floating_point():
            raise InputMismatchError(f"pixel_values has dtype {pv.dtype}; use the processor's float pixel values")
        if pv is not None and pv.device != param.device:
            raise InputMismatchError(f"pixel_values is on {pv.device} but the model is on {param.device}; move them")
        c = _Call(prefill=True, vis=vis)
        self._call = c
        if pv is not None:  # the tower runs inside this call: drop what an earlier one left
            self._vq, self._vk, self._layout, self._projected = {}, {}, None, None
        c.q, c.k = self._vq, self._vk

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

    def _timed(self, fn):
        dev = self.adapter.lm_layers[0].self_attn.q_proj.weight.device
        t0 = 0.0
        if self.measure:
            _sync(dev)
            t0 = time.perf_counter()
        out = fn()  # all threads: unlike the many small ops of per-layer merging, selections here are big matmuls
        if self.measure:
            _sync(dev)
            self.overhead_s += time.perf_counter() - t0
        return out

    # ----- prefill: the prompt as the language model receives it -----
    def _lm_pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        c = self._call
        if c is None:
            return None
        if args:
            raise TokenThinError("internal: the language model was called with positional arguments")
        if not c.prefill:
            if c.prefix is None or self.schedule.output_keep is None:
                return None
            return args, self._translate(c.prefix, kwargs)
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            raise TokenThinError("internal: the language model received no inputs_embeds")
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise TokenThinError(
                "tokenthin needs a 2-D attention_mask (a dynamic cache); static or compiled caches, which get a 4-D "
                "mask, are not supported"
            )
        return self._timed(lambda: self._start_prefill(c, emb, am, kwargs))

    def _start_prefill(self, c: _Call, emb: torch.Tensor, am: torch.Tensor | None, kwargs: dict):
        assert c.vis is not None
        b, t = c.vis.shape
        c.t0 = t
        c.valid = am.bool() if am is not None else torch.ones_like(c.vis)
        img = c.vis & c.valid
        tm = self.adapter.token_map(emb[img], img.sum(1).tolist(), self)
        c.tm = tm
        c.flat = torch.zeros(b, t, dtype=torch.long, device=emb.device)
        c.view = torch.zeros_like(c.flat)
        c.flat[img] = tm.flat
        c.view[img] = tm.view
        c.struct = torch.zeros_like(img)
        if bool(tm.newline.any()):  # structure tokens (LLaVA-NeXT row ends) stay, like text
            c.struct[img] = tm.newline
            img = img & ~c.struct
        c.vis = img
        per = img.sum(1)
        c.n_vis = per.tolist()
        n = int(per.max())
        c.src = (
            torch.arange(n, device=emb.device)
            .expand(b, n)
            .masked_fill(torch.arange(n, device=emb.device).unsqueeze(0) >= per.unsqueeze(1), -1)
        )
        c.size = (c.src >= 0).float()
        if self.schedule.output_keep is None:
            c.n_in = per
            c.prefix = _Prefix(t0=t, mask=c.valid, shift=None, last_pos=None)
            return None
        return self._shorten_prompt(c, kwargs)

    def _plan(
        self, c: _Call, x_seq: torch.Tensor, layer: int, num_layers: int, spec: float | int, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the method on the current visual tokens of ``x_seq`` (B, T, D); returns the new sequence (merged
        slots written at their representatives' places) and ``keep_seq`` (B, T), the positions that stay."""
        assert c.vis is not None and c.valid is not None and c.src is not None and c.size is not None
        vis = c.vis & c.valid
        vpos, vvalid = pack(vis, left=False)  # (B, N) sequence position of each visual token
        c.vis_pos = vpos
        x = assign.rows(x_seq, vpos)
        b = vvalid.shape[0]
        per = vvalid.sum(1)
        out_stage = stage == "output"
        if out_stage:
            assert c.flat is not None and c.view is not None and c.tm is not None
            flat = c.flat.gather(1, vpos).masked_fill(~vvalid, 0)
            view = c.view.gather(1, vpos).masked_fill(~vvalid, -1)
            grids = c.tm.grids
            keep_n = self._keep_counts(per, spec, None) if self.tower is None else per
        else:
            flat = torch.zeros_like(vpos)
            view = torch.zeros_like(vpos).masked_fill(~vvalid, -1)
            grids = [(0, 0)] * b
            keep_n = self._keep_counts(per, spec, c.n_in)
        size = c.size if c.size.shape[1] == vvalid.shape[1] else vvalid.float()
        assert c.struct is not None
        tpos, tvalid = pack(c.valid & ~c.vis & ~c.struct, left=False)
        extras = {
            "group": self._groups(flat, vvalid) if self._tower_source is not None and out_stage else None,
            "text": assign.rows(x_seq, tpos),
            "text_valid": tvalid,
            "view": view,
            "vis_pos": vpos,
            "site": stage,
        }

        def run(i: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
            rows = None if i is None else torch.tensor([i], device=x.device)
            n_i = vvalid.shape[1] if i is None else int(per[i])

            def sel(t: torch.Tensor, visual: bool = True) -> torch.Tensor:
                # one sample: its row, and for per-visual-token tensors its own tokens only (grid-based methods
                # need exactly its h x w of them)
                if rows is None:
                    return t
                return t[rows][:, :n_i] if visual else t[rows]

            inp = ReduceInput(
                x=sel(x),
                size=sel(size),
                valid=sel(vvalid),
                num_protected=0,
                layer=layer,
                num_layers=num_layers,
                grid=grids[0] if i is None else grids[i],
                pristine=out_stage,
                signals=_VLMSignals(self, c, sel(flat), rows, None if i is None else int(per[i])),
                extras={k: sel(v, k in _PER_TOKEN) if isinstance(v, torch.Tensor) else v for k, v in extras.items()},
            )
            return self.method.reduce(inp, keep_n if i is None else keep_n[rows])

        if bool((keep_n == keep_n[0]).all()) and bool((per == per[0]).all()) and len(set(grids)) == 1:
            keep, target = run(None)
        else:  # samples keep different counts: plan each alone (a selection takes one k)
            n = vvalid.shape[1]
            keep = torch.zeros_like(vvalid)
            target = None
            for i in range(b):
                kk, tt = run(i)
                keep[i, : kk.shape[1]] = kk[0]
                if tt is not None:
                    if target is None:
                        target = torch.full((b, n), -1, dtype=torch.long, device=x.device)
                    target[i, : tt.shape[1]] = tt[0]
        keep = keep & vvalid
        if target is not None:
            target = target.masked_fill(keep | ~vvalid, -1)
        plan = assign.build(keep, target)
        x_new, size_new = assign.merge(x, size, plan)
        slot_valid = torch.arange(plan.n_out, device=x.device).unsqueeze(0) < plan.counts.unsqueeze(1)
        rep = vpos.gather(1, plan.slot_src)  # (B, n_out) sequence position of each slot's representative
        seq = x_seq
        bi = torch.arange(b, device=x.device).unsqueeze(1).expand_as(rep)
        if plan.merges:
            seq = x_seq.clone()
            seq[bi[slot_valid], rep[slot_valid]] = x_new[slot_valid].to(seq.dtype)
        is_rep = torch.zeros_like(vis)
        is_rep[bi[slot_valid], rep[slot_valid]] = True
        keep_seq = c.valid & (~vis | is_rep)  # text, structure tokens and the slots' representatives
        dst = plan.dst.masked_fill(~vvalid, -1)
        c.src = torch.where(c.src >= 0, dst.gather(1, c.src.clamp(min=0)), c.src)
        c.size = size_new.masked_fill(~slot_valid, 0)
        return seq, keep_seq

    def _groups(self, flat: torch.Tensor, vvalid: torch.Tensor) -> torch.Tensor:
        """(B, N) tower slot of each visual token, unique per image (-1: dropped in the tower)."""
        src = self._tower_source
        assert src is not None
        drop = self.adapter.drops_protected
        n_img, n0 = src.shape
        per_img = n0 - drop
        slot = src[:, drop:].reshape(-1)[flat.clamp(max=n_img * per_img - 1)]
        image = flat // per_img
        return torch.where((slot >= 0) & vvalid, image * n0 + slot, torch.full_like(slot, -1))

    def _keep_counts(self, per: torch.Tensor, spec: float | int, entered: torch.Tensor | None) -> torch.Tensor:
        """Visual tokens each sample keeps. Before the language model a fraction is of the sample's visual tokens;
        inside it, of those that entered it (and may round to 0)."""
        out = []
        for i, n in enumerate(per.tolist()):
            if entered is None:
                k = keep_count(spec, n)
            elif isinstance(spec, float):
                k = min(n, round(spec * int(entered[i])))
            else:
                k = int(spec)
            if k > n:
                raise BudgetError(
                    f"keep={spec} asks for {k} visual tokens but a prompt holds only {n} here; use a smaller count "
                    "or a fraction"
                )
            out.append(k)
        return torch.tensor(out, dtype=torch.long, device=per.device)

    def _shorten_prompt(self, c: _Call, kwargs: dict) -> tuple[tuple, dict]:
        a = self.adapter
        emb = kwargs["inputs_embeds"]
        b, t, _ = emb.shape
        assert self.schedule.output_keep is not None and c.valid is not None and c.vis is not None
        seq, keep_seq = self._plan(c, emb, a.feature_layer, a.vision_layers, self.schedule.output_keep, "output")
        idx, valid = pack(keep_seq, left=True)
        out = dict(kwargs)
        out["inputs_embeds"] = assign.rows(seq, idx).masked_fill(~valid.unsqueeze(-1), 0)
        am = kwargs.get("attention_mask")
        padded = not bool(valid.all())
        out["attention_mask"] = valid.to(am.dtype) if am is not None else (valid.long() if padded else None)
        pos0 = kwargs.get("position_ids")
        if pos0 is None:
            pos0 = torch.arange(t, device=emb.device).unsqueeze(0)
        dropped = c.valid & ~keep_seq
        shift = last = None
        if pos0.dim() == 2 and a.shift_positions:
            before = dropped.long().cumsum(1) - dropped.long()
            pos = _gather_last(pos0.expand(b, -1) - before, idx, 0).masked_fill(~valid, 0)
            shift = dropped.sum(1)
            last = pos[:, -1]
        else:
            pos = _gather_last(pos0, idx, 0 if pos0.dim() == 2 else 1)
        out["position_ids"] = pos
        if kwargs.get("cache_position") is not None:
            out["cache_position"] = torch.arange(idx.shape[1], device=emb.device)
        c.vis = c.vis.gather(1, idx) & valid
        c.struct = c.struct.gather(1, idx) & valid if c.struct is not None else None
        c.valid = valid
        c.n_in = c.vis.sum(1)
        c.prefix = _Prefix(t0=t, mask=valid, shift=shift, last_pos=last)
        return (), out

    # ----- decoding steps -----
    def _translate(self, p: _Prefix, kwargs: dict) -> dict:
        out = dict(kwargs)
        emb = kwargs["inputs_embeds"]
        b, q = emb.shape[0], emb.shape[1]
        t1 = p.mask.shape[1]
        past = _cache_len(_cache_of(kwargs))
        am = kwargs.get("attention_mask")
        if am is not None:
            if am.dim() != 2 or am.shape[1] < p.t0:
                raise TokenThinError("tokenthin needs the 2-D attention_mask generate() keeps, covering the prompt")
            out["attention_mask"] = torch.cat([p.mask.to(am.dtype), am[:, p.t0 :]], 1)
        elif not bool(p.mask.all()):
            out["attention_mask"] = torch.cat(
                [p.mask.long(), torch.ones(b, past - t1 + q, dtype=torch.long, device=p.mask.device)], 1
            )
        pos = kwargs.get("position_ids")
        if p.shift is not None:
            if pos is not None:
                out["position_ids"] = pos.expand(b, -1) - p.shift.unsqueeze(1)
            elif p.last_pos is not None:
                out["position_ids"] = p.last_pos.unsqueeze(1) + 1 + (past - t1) + torch.arange(q, device=emb.device)
        if kwargs.get("cache_position") is not None:
            out["cache_position"] = kwargs["cache_position"] - (p.t0 - t1)
        return out

    def _lm_post(self, _m: nn.Module, _args: tuple, kwargs: dict, out: Any) -> None:
        c = self._call
        if c is None or not c.prefill or c.prefix is None:
            return None
        cache = _cache_of(kwargs)
        if cache is None and isinstance(out, dict):  # ModelOutput; the key is "cache" from transformers 5.24
            cache = out.get("cache")
            if cache is None:
                cache = out.get("past_key_values")
        if cache is not None and not isinstance(cache, (tuple, list)):
            self._prefixes[cache] = c.prefix
        return None

    # ----- inside the language model (llm:k) -----
    def _point_post(self, k: int):
        a = self.adapter

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            c = self._call
            if c is None or not c.prefill or c.prefix is None:
                return None
            hs = out[0] if isinstance(out, tuple) else out

            def work() -> torch.Tensor:
                assert c.valid is not None and c.vis is not None and c.prefix is not None
                seq, keep_seq = self._plan(c, hs, k, len(a.lm_layers), self.point_keep[k], "llm")
                idx, valid = pack(keep_seq, left=True)
                c.gather = idx if c.gather is None else c.gather.gather(1, idx)
                c.vis = c.vis.gather(1, idx) & valid
                c.struct = c.struct.gather(1, idx) & valid if c.struct is not None else None
                c.valid = valid
                c.prefix.deep[k] = valid
                return assign.rows(seq, idx).masked_fill(~valid.unsqueeze(-1), 0)

            new = self._timed(work)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return post

    def _layer_pre(self, j: int):
        impl = getattr(self.adapter.lm_config, "_attn_implementation", None) or "eager"

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            c = self._call
            if c is None:
                return None
            hs = args[0] if args else kwargs["hidden_states"]
            out = None
            if c.prefill:
                if c.gather is not None:
                    idx, valid = c.gather, c.valid
                    assert valid is not None
                    out = dict(kwargs)
                    pe = kwargs.get("position_embeddings")
                    if pe is not None:
                        bd = 0 if pe[0].dim() == 3 else 1
                        out["position_embeddings"] = tuple(_gather_last(t, idx, bd) for t in pe)
                    pid = kwargs.get("position_ids")
                    if pid is not None:
                        out["position_ids"] = _gather_last(pid, idx, 0 if pid.dim() == 2 else 1)
                    if kwargs.get("cache_position") is not None:
                        out["cache_position"] = torch.arange(idx.shape[1], device=idx.device)
                    am = kwargs.get("attention_mask")
                    out["attention_mask"] = _mask_like(valid, idx.shape[1], am, impl, hs.dtype)
                if j in self.point_keep:
                    c.pos_emb[j] = (out or kwargs).get("position_embeddings")
                return None if out is None else (args, out)
            p = c.prefix
            done = [k for k in (p.deep if p is not None else {}) if k < j]
            if p is None or not done:
                return None
            deep = p.deep[max(done)]
            q = hs.shape[1]
            past = _cache_len(_cache_of(kwargs), j)
            gen = past - deep.shape[1]
            am = kwargs.get("attention_mask")
            out = dict(kwargs)
            if am is not None or not bool(deep.all()):
                tail = torch.ones(hs.shape[0], gen + q, dtype=torch.bool, device=hs.device)
                out["attention_mask"] = _mask_like(torch.cat([deep, tail], 1), q, am, impl, hs.dtype)
            if kwargs.get("cache_position") is not None:
                out["cache_position"] = torch.arange(past, past + q, device=hs.device)
            return args, out

        return pre

    def lm_logits(self, c: _Call, layer: int, last_only: bool) -> torch.Tensor:
        """Attention logits of language-model layer ``layer`` at prefill, (B, H, R, T) for R query rows (the last
        one, or all), recomputed from the layer's captured queries and keys with its rotary embedding (no eager
        pass); causal and padding entries are -inf."""
        a = self.adapter
        lq, lk, pe = c.lm_q.get(layer), c.lm_k.get(layer), c.pos_emb.get(layer)
        if lq is None or lk is None or pe is None:
            raise TokenThinError("internal: language-model queries/keys were not captured")
        assert c.valid is not None
        b, t, _ = lk.shape
        h, kv, d = a.lm_heads, a.lm_kv_heads, a.lm_head_dim
        rows = slice(t - 1, t) if last_only else slice(0, t)
        q = lq[:, rows].reshape(b, -1, h, d).transpose(1, 2)
        k = lk.view(b, t, kv, d).transpose(1, 2)
        cos, sin = pe
        q = a.rope(layer, q, cos[..., rows, :], sin[..., rows, :], "q")
        k = a.rope(layer, k, cos, sin, "k")
        k = k.repeat_interleave(h // kv, dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) * a.lm_scale  # (B, H, R, T)
        r = logits.shape[2]
        qi = torch.arange(t - r, t, device=logits.device).unsqueeze(1)
        allowed = (torch.arange(t, device=logits.device).unsqueeze(0) <= qi).unsqueeze(0) & c.valid[:, None, :]
        return logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
