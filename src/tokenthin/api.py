"""Public API: apply(), remove(), applied(), info(), methods(), explain()."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import budget as _budget
from .adapters.base import find_adapter
from .errors import (
    AlreadyAppliedError,
    BudgetError,
    InputMismatchError,
    NotAppliedError,
    SiteError,
    TokenThinError,
    UnsupportedModelError,
)
from .methods.base import all_methods, get
from .runtime import Runtime, TokenInfo

_APPLIED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()  # Runtime | VLMRuntime


def apply(
    model: nn.Module,
    method: str,
    *,
    r: int | list[int] | tuple[int, float] | None = None,
    keep: float | int | None = None,
    flops: float | None = None,
    site: str | None = None,
    unmerge: bool = False,
    prop_attn: bool = True,
    calibration: torch.Tensor | None = None,
    image_size: int | tuple[int, int] | None = None,
    replace: bool = False,
    **params: Any,
) -> nn.Module:
    """Apply a token-reduction method to ``model`` in place and return it.

    Budgets (exactly one): ``r`` tokens merged after every layer (int, per-layer list, or ToMe's ``(r, inflect)``),
    ``keep`` patch tokens kept at a single site (fraction in (0, 1] or count), or ``flops`` a target fraction of
    the encoder's analytic FLOPs. ``site``: ``"layers"``, ``"layer:k"``, ``"output"`` or ``"input"`` (default: the
    method's). ``unmerge=True`` returns a full per-patch ``last_hidden_state`` (dense tasks). ``calibration``:
    pixel values for methods that calibrate (``dtome``). ``image_size``: the input size budgets are planned for
    (default: the model config's; pass it when you feed other sizes, e.g. 224 to a DINOv2 configured for 518).
    Other keyword arguments are the method's parameters.
    """
    if model in _APPLIED:
        if not replace:
            cur = _APPLIED[model]
            raise AlreadyAppliedError(
                f"tokenthin is already applied to this model (method '{cur.method.name}'); call "
                "tokenthin.remove(model) first, or pass replace=True to re-configure"
            )
        remove(model)
    cls = get(method)
    m = cls(**params)
    adapter = find_adapter(model)
    if getattr(adapter, "kind", "") == "vlm":
        return _apply_vlm(
            model,
            adapter,
            cls,
            m,
            r=r,
            keep=keep,
            flops=flops,
            site=site,
            unmerge=unmerge,
            calibration=calibration,
            image_size=image_size,
        )
    if cls.needs_prompt:
        raise UnsupportedModelError(
            f"method '{cls.name}' reads the prompt's text tokens; {type(model).__name__} has no prompt. Apply it to a "
            "vision-language model (LLaVA, LLaVA-NeXT, Qwen2-VL), or use 'coverage' / 'divprune' on a vision encoder"
        )
    if not ({"layers", "layer", "output", "input"} & set(cls.sites)):
        raise UnsupportedModelError(
            f"method '{cls.name}' works inside a language model; {type(model).__name__} has none. Apply it to a "
            "vision-language model (e.g. LlavaForConditionalGeneration)"
        )
    if image_size is not None:
        adapter.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    grid = (adapter.image_size[0] // adapter.patch[0], adapter.image_size[1] // adapter.patch[1])

    def input_patches(frac: float) -> int:
        hh, ww = m.input_size(adapter.image_size[0], adapter.image_size[1], adapter.patch[0], frac)
        return (hh // adapter.patch[0]) * (ww // adapter.patch[1])

    schedule = _budget.resolve(
        kind=cls.kind,
        sites=cls.sites,
        default_site=cls.default_site,
        name=cls.name,
        site=site,
        r=r,
        keep=keep,
        flops=flops,
        dims=adapter.dims,
        grid=grid,
        input_patches=input_patches if "input" in cls.sites else None,
    )
    rt = Runtime(model, adapter, m, schedule, unmerge=unmerge, prop_attn=prop_attn)
    rt.attach()
    _APPLIED[model] = rt
    try:
        if hasattr(m, "calibrate"):
            if calibration is None:
                raise TokenThinError(
                    f"method '{cls.name}' calibrates on images: pass calibration=pixel_values "
                    "(a batch of typical inputs, e.g. 16-64 images)"
                )
            _check_input(model, calibration)
            m.calibrate(lambda: _run_calibration(model, rt, calibration))
        elif calibration is not None:
            raise TokenThinError(f"method '{cls.name}' does not calibrate; drop calibration=")
    except BaseException:
        remove(model)
        raise
    return model


def _apply_vlm(model: nn.Module, adapter: Any, cls: type, m: Any, **kw: Any) -> nn.Module:
    from .vlm import VLMRuntime, parse_vlm_site

    site = kw["site"]
    inside_tower = site is not None and site.strip().lower().startswith("layer")
    if inside_tower or (site is None and kw["r"] is not None):
        return _apply_vlm_tower(model, adapter, cls, m, **kw)
    if kw["r"] is not None or kw["flops"] is not None:
        raise BudgetError(
            "on a vision-language model give keep= (a fraction of each prompt's visual tokens, or a count) at "
            "'output' / 'llm:k', or r= (merging methods) inside the vision tower (site='layers'); flops= budgets "
            "a vision encoder alone"
        )
    if kw["keep"] is None:
        raise BudgetError("give a budget: keep= (a fraction in (0, 1] of each prompt's visual tokens, or a count)")
    keep = kw["keep"]
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise BudgetError(f"keep={keep!r}: give a fraction in (0, 1] or a positive count")
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise BudgetError(f"keep={keep} is out of range: a fraction must be in (0, 1] (or give a count)")
    if isinstance(keep, int) and keep < 1:
        raise BudgetError(f"keep={keep}: a count must be at least 1")
    if kw["unmerge"] or kw["calibration"] is not None or kw["image_size"] is not None or cls.kind == "input":
        raise TokenThinError(
            f"unmerge=, calibration=, image_size= and input-site methods apply to vision encoders; "
            f"'{cls.name}' on {type(model).__name__} takes keep= and site= ('output' or 'llm:k')"
        )
    if hasattr(m, "calibrate"):
        raise TokenThinError(f"method '{cls.name}' calibrates on images and is not supported on VLMs yet")
    rt = VLMRuntime(model, adapter, m, parse_vlm_site(kw["site"], keep, len(adapter.lm_layers), m))
    rt.attach()
    _APPLIED[model] = rt
    return model


def _apply_vlm_tower(model: nn.Module, adapter: Any, cls: type, m: Any, **kw: Any) -> nn.Module:
    """Sites inside a VLM's vision tower: the tower runs the encoder runtime (merging with proportional attention,
    or pruning), its features are scattered back over the full grid before the projector (so the host's placeholder
    count still matches) and collapsed again before the language model, one token per reduced slot."""
    import dataclasses

    from .vlm import CollapseSlots, VLMRuntime, VLMSchedule

    v = adapter.vision
    if v is None:
        raise SiteError(f"sites inside the vision tower are not available on {adapter.family}: use 'output' or 'llm:k'")
    if kw["unmerge"] or kw["calibration"] is not None or cls.kind == "input":
        raise TokenThinError(
            f"'{cls.name}' inside a vision-language model's tower takes r=, keep= or flops= and site= only"
        )
    if hasattr(m, "calibrate"):
        raise TokenThinError(f"method '{cls.name}' calibrates on images and is not supported on VLMs yet")
    if kw["flops"] is not None:
        raise BudgetError(
            "flops= targets a vision encoder's FLOPs, a small share of a vision-language model's; inside its tower "
            "give r= (tokens merged per layer) or keep= with site='layer:k'"
        )
    if kw["r"] is not None and cls.kind != "merge":
        raise BudgetError(
            f"r= merges tokens after every layer; '{cls.name}' prunes once: give keep= and site='layer:k'"
        )
    grid = (v.image_size[0] // v.patch[0], v.image_size[1] // v.patch[1])
    schedule = _budget.resolve(
        kind=cls.kind,
        sites=tuple(s for s in cls.sites if s in ("layers", "layer")),
        default_site="layers" if "layers" in cls.sites else "layer",
        name=cls.name,
        site=kw["site"],
        r=kw["r"],
        keep=kw["keep"],
        flops=kw["flops"],
        dims=v.dims,
        grid=grid,
    )
    f = adapter.feature_layer  # the language model reads this layer's output: nothing after it may reduce
    if schedule.site == "layers":
        assert schedule.r is not None
        schedule = dataclasses.replace(schedule, r=tuple(r if i < f else 0 for i, r in enumerate(schedule.r)))
    elif schedule.layer is not None and schedule.layer >= f:
        raise SiteError(
            f"site 'layer:{schedule.layer}' is at or after the vision layer the language model reads ({f}); use "
            f"k < {f}, or site='output'"
        )
    enc = Runtime(model, v, m, schedule)
    rt = VLMRuntime(model, adapter, CollapseSlots(), VLMSchedule(output_keep=1.0, keep=None), tower=enc, shown=m)
    rt.attach()
    _APPLIED[model] = rt
    return model


def _explain_vlm(a: Any, rt: Any) -> dict[str, Any]:
    n = len(a.lm_layers)
    out: dict[str, Any] = {
        "adapter": type(a).__name__,
        "family": a.family,
        "vision_layers": a.vision_layers,
        "vision_feature_layer": a.feature_layer,
        "vision_signals": a.vision is not None,
        "language_layers": n,
        "sites": ["output", *[f"llm:{i}" for i in range(n - 1)]],
        "touched_modules": a.touched(),
    }
    if rt is not None:
        shown = rt.shown if rt.tower is not None else rt.method
        plan = rt.tower.schedule.describe() if rt.tower is not None else rt.schedule.describe()
        out["applied"] = {"method": shown.name, "params": shown.p, "schedule": plan}
    return out


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    p = next(model.parameters())
    if x.device != p.device:
        raise InputMismatchError(f"calibration images are on {x.device}, the model on {p.device}; move them")
    if not x.is_floating_point():
        raise InputMismatchError("calibration images must be float pixel values (normalised as the model expects)")


def _run_calibration(model: nn.Module, rt: Runtime, pixel_values: torch.Tensor) -> None:
    rt.calibrating = True
    try:
        with torch.no_grad():
            rt.adapter.root(pixel_values=pixel_values.to(next(model.parameters()).dtype))
    finally:
        rt.calibrating = False


def remove(model: nn.Module) -> nn.Module:
    """Remove tokenthin from ``model``; its outputs are exactly those of the untouched model again."""
    rt = _APPLIED.pop(model, None)
    if rt is None:
        raise NotAppliedError("tokenthin is not applied to this model; nothing to remove")
    rt.detach()
    return model


@contextmanager
def applied(model: nn.Module, method: str, **kwargs: Any) -> Iterator[nn.Module]:
    """``with tokenthin.applied(model, "tome", r=8): ...`` applies on entry and removes on exit."""
    apply(model, method, **kwargs)
    try:
        yield model
    finally:
        if model in _APPLIED:
            remove(model)


def is_applied(model: nn.Module) -> bool:
    return model in _APPLIED


def runtime_of(model: nn.Module) -> Runtime:
    """The applied :class:`~tokenthin.runtime.Runtime` (advanced: its ``method``, ``schedule``, ``detach()`` /
    ``attach()`` to time the unreduced model in place, ``measure``/``overhead_s`` for tokenthin's own time)."""
    rt = _APPLIED.get(model)
    if rt is None:
        raise NotAppliedError("tokenthin is not applied to this model")
    return rt


def info(model: nn.Module) -> TokenInfo:
    """What the last forward call did: token counts per layer, sizes, padding mask and source map."""
    rt = _APPLIED.get(model)
    if rt is None:
        raise NotAppliedError("tokenthin is not applied to this model")
    if rt.last is None:
        raise TokenThinError("no forward call has run since tokenthin was applied")
    return rt.last


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, paper, arXiv id, sites, parameters, one-line description."""
    out = []
    for name, cls in all_methods().items():
        out.append(
            {
                "name": name,
                "paper": cls.title,
                "arxiv": cls.arxiv,
                "kind": cls.kind,
                "sites": [{"layer": "layer:k", "llm": "llm:k"}.get(s, s) for s in cls.sites],
                "default_site": cls.default_site,
                "parameters": {k: {"default": p.default, "doc": p.doc} for k, p in cls.params.items()},
                "description": cls.summary,
            }
        )
    return out


def explain(model: nn.Module) -> dict[str, Any]:
    """Which modules would be touched, which sites exist and, if applied, the plan and its analytic FLOPs."""
    rt = _APPLIED.get(model)
    a = rt.adapter if rt is not None else find_adapter(model)
    if getattr(a, "kind", "") == "vlm":
        return _explain_vlm(a, rt)
    L = len(a.layers)
    grid = (a.image_size[0] // a.patch[0], a.image_size[1] // a.patch[1])
    out: dict[str, Any] = {
        "adapter": type(a).__name__,
        "family": a.family,
        "layers": L,
        "protected_tokens": a.num_protected,
        "patch_grid": grid,
        "tokens": a.num_protected + grid[0] * grid[1],
        "sites": ["input", "layers", *[f"layer:{i}" for i in range(L)], "output"],
        "touched_modules": a.touched(),
    }
    if rt is not None:
        s = rt.schedule
        ip = None
        if s.site == "input":
            hh, ww = rt.method.input_size(a.image_size[0], a.image_size[1], a.patch[0], s.keep)  # type: ignore[arg-type]
            ip = (hh // a.patch[0]) * (ww // a.patch[1])
        counts, n_out = _budget.tokens_per_layer(s, grid[0] * grid[1], a.num_protected, ip)
        out["applied"] = {
            "method": rt.method.name,
            "params": rt.method.p,
            "schedule": s.describe(),
            "tokens_per_layer": counts,
            "tokens_out": n_out,
            "flops_fraction": _budget.flops_fraction(s, a.dims, grid, ip),
            # dynamic methods (dtome) keep a different count per image: the figures above are the planned r
            # schedule's, the real counts of a call are in tokenthin.info(model).sample_tokens
            "dynamic": rt.method.dynamic,
        }
    return out
