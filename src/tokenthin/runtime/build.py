"""Setting up the encoder runtime from a request: site checks against the method and the host, and the planner
that resolves the budget for each input layout (see :mod:`tokenthin.budget`)."""

from __future__ import annotations

from torch import nn

from ..adapters.contract import Adapter, Layout
from ..budget import Request, Schedule, resolve
from ..errors import SiteError, UnsupportedModelError
from ..methods.base import Method
from .core import Runtime


def build(model: nn.Module, adapter: Adapter, cls: type[Method], m: Method, req: Request) -> Runtime:
    """The encoder runtime for ``m`` on ``adapter``'s host, planned per input (not attached)."""
    if cls.runtimes and adapter.kind not in cls.runtimes:
        raise UnsupportedModelError(
            f"method '{cls.name}' is made for {'/'.join(sorted(cls.runtimes))}s, not {type(model).__name__}"
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
    missing = cls.signals & {"keys", "cls_attn", "mean_attn"} - adapter.signals
    if missing:
        raise UnsupportedModelError(
            f"method '{cls.name}' reads {', '.join(sorted(missing))}, which {adapter.family} cannot give (its "
            f"signals: {', '.join(sorted(adapter.signals)) or 'none'}); see tokenthin.support() for what works here"
        )
    if cls.resizes_input and "input" not in adapter.sites:
        raise SiteError(
            f"method '{cls.name}' also resizes the input image, which {adapter.family} cannot take (no site "
            "'input'); use 'tome' for merging alone"
        )
    sites = tuple(s for s in cls.sites if s in adapter.sites)
    if not sites:
        raise SiteError(
            f"method '{cls.name}' acts at {', '.join(cls.sites)}; {adapter.family} offers {', '.join(adapter.sites)}"
        )
    if req.image_size is not None:  # the size explain() and the checks below plan for
        adapter.default_layout = adapter.layout_for(req.image_size)

    def planner(layout: Layout) -> Schedule:
        def input_patches(frac: float) -> int:
            p = adapter.input_patch
            hh, ww = m.input_size(layout.grid[0] * p, layout.grid[1] * p, p, frac)
            return (hh // p) * (ww // p)

        if req.plan is not None:  # a calibrated schedule, re-solved for this input's grid (and resized patches)
            return req.plan(adapter.dims, (layout.grid[0], layout.grid[1] * layout.frames), input_patches)

        return resolve(
            kind=cls.kind,
            sites=sites,
            default_site=cls.default_site if cls.default_site.split(":")[0] in sites else sites[0],
            name=cls.name,
            site=req.site,
            r=req.r,
            keep=req.keep,
            flops=req.flops,
            dims=adapter.dims,
            grid=(layout.grid[0], layout.grid[1] * layout.frames),
            input_patches=input_patches if ("input" in sites or cls.resizes_input) else None,
            min_keep=float(m.p["min_keep"]) if cls.resizes_input else None,
        )

    schedule = planner(adapter.default_layout)
    if schedule.site == "block" and cls.signals - {"keys"}:
        raise SiteError(
            f"method '{cls.name}' reads attention, which a block site cannot give (the block has not run when its "
            "tokens are merged); use site='layer:k', or a method that matches on the tokens (tome, random, pool)"
        )
    return Runtime(
        model, adapter, m, schedule, planner=planner, unmerge=req.unmerge, prop_attn=req.prop_attn is not False
    )
