"""Setting up a vision-language runtime from a request: sites before the language model (``output``), inside it
(``llm:k``, ``output+llm``) or inside the vision tower (``layers`` / ``layer:k``: the tower runs the encoder runtime
and its reduced features are collapsed per slot before the language model)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .. import budget as _budget
from ..adapters.hf_vlm import VLMAdapter
from ..budget import Request
from ..errors import BudgetError, SiteError, TokenThinError
from ..methods.base import Method
from ..runtime import Runtime
from .runtime import VLMRuntime
from .schedule import VLMSchedule, parse_vlm_site
from .tower import CollapseSlots


def build(model: nn.Module, adapter: VLMAdapter, cls: type[Method], m: Method, req: Request) -> VLMRuntime:
    """The vision-language runtime for ``m`` on ``adapter``'s host (not attached)."""
    kw = dataclasses.asdict(req)
    site = kw["site"]
    inside_tower = site is not None and site.strip().lower().startswith("layer")
    if inside_tower or (site is None and kw["r"] is not None):
        return _tower(model, adapter, cls, m, kw)
    if kw["r"] is not None or kw["flops"] is not None:
        raise BudgetError(
            "on a vision-language model give keep= (a fraction of each prompt's visual tokens, or a count) at "
            "'output' / 'llm:k', or r= (merging methods) inside the vision tower (site='layers'); flops= budgets "
            "a vision encoder alone. For a target fraction of the language model's prefill FLOPs, search the site "
            "and keep on your prompts: sched = tokenthin.calibrate(model, method, flops=0.5, samples=[processor "
            "outputs]), then apply(model, method, schedule=sched)"
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
    if kw["unmerge"] or kw["image_size"] is not None or cls.kind == "input":
        raise TokenThinError(
            f"unmerge=, calibration=, image_size= and input-site methods apply to vision encoders; "
            f"'{cls.name}' on {type(model).__name__} takes keep= and site= ('output' or 'llm:k')"
        )
    if hasattr(m, "calibrate"):
        raise TokenThinError(f"method '{cls.name}' calibrates on images and is not supported on VLMs yet")
    return VLMRuntime(model, adapter, m, parse_vlm_site(kw["site"], keep, len(adapter.lm_layers), m))


def _tower(model: nn.Module, adapter: VLMAdapter, cls: type[Method], m: Method, kw: dict[str, Any]) -> VLMRuntime:
    """Sites inside a VLM's vision tower: the tower runs the encoder runtime (merging with proportional attention,
    or pruning), its features are scattered back over the full grid before the projector (so the host's placeholder
    count still matches) and collapsed again before the language model, one token per reduced slot."""
    v = adapter.vision
    if v is None:
        raise SiteError(f"sites inside the vision tower are not available on {adapter.family}: use 'output' or 'llm:k'")
    if kw["unmerge"] or cls.kind == "input" or cls.resizes_input:
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
    return VLMRuntime(model, adapter, CollapseSlots(), VLMSchedule(output_keep=1.0, keep=None), tower=enc, shown=m)
