"""``tokenthin.calibrate``: search a per-layer schedule on calibration images with the frozen model.

The fidelity objective runs the model with a candidate schedule on the calibration images and compares its output
with the unreduced model's (computed once): ``"cls"`` the cosine of the pooled / [CLS] output (``pooler_output``;
a timm model's pooled features), ``"patch"`` the mean cosine of the patch tokens of ``last_hidden_state`` after
unmerge (the dense output a saliency / segmentation head reads), ``"cls+patch"`` their mean; ``"auto"`` (the
default) is ``"cls+patch"`` where the output has ``last_hidden_state`` and ``"cls"`` where it has not (a timm model's
pooled features). Measured on the real DINOv2-S (README "Calibrated schedules"): the patch term is what carries over
from the calibration images to the evaluation images; with ``"cls"`` alone the gain on the calibration images did
not carry over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import api
from ..adapters.contract import Adapter
from ..adapters.registry import find_adapter
from ..budget import Schedule, flops_fraction, resolve
from ..errors import BudgetError, InputMismatchError, SiteError, TokenThinError, UnsupportedModelError
from ..methods.base import get
from .joint import joint_candidates
from .schedule import CalibratedSchedule
from .search import best_site, greedy_layers, sigmoid_layers

OBJECTIVES = ("auto", "cls", "patch", "cls+patch")
SEARCHES = ("greedy", "sigmoid")


def _pooled(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 2 else out[:, 0]
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    return out.last_hidden_state[:, 0]


class _Objective:
    """Fidelity of a schedule on the calibration images, cached by schedule."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        method: str,
        params: dict,
        images: torch.Tensor,
        objective: str,
        batch_size: int,
        seed: int,
        bar: Any,
    ) -> None:
        self.model, self.adapter, self.method, self.params = model, adapter, method, params
        self.images, self.objective, self.batch_size, self.seed, self.bar = images, objective, batch_size, seed, bar
        self.size = (int(images.shape[-2]), int(images.shape[-1]))
        self.cache: dict[tuple, float] = {}
        self.forwards = 0
        # a resized schedule (resize-tome) is applied as a calibrated schedule (apply takes no input share)
        self.wrap: Callable[[Schedule], CalibratedSchedule] | None = None
        self.ref = self._run()

    @torch.no_grad()
    def _run(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled, patches = [], []
        p = self.adapter.num_protected
        for i in range(0, self.images.shape[0], self.batch_size):
            args, kwargs = self.adapter.call_args(self.images[i : i + self.batch_size])
            out = self.adapter.root(*args, **kwargs)
            pooled.append(_pooled(out).float())
            if self.objective == "auto":
                self.objective = "cls" if getattr(out, "last_hidden_state", None) is None else "cls+patch"
            if self.objective != "cls":
                lhs = getattr(out, "last_hidden_state", None)
                if lhs is None:
                    raise TokenThinError(
                        f"objective='{self.objective}' reads the patch tokens of last_hidden_state, which this model's "
                        "output does not have; use objective='cls'"
                    )
                patches.append(lhs[:, p:].float())
        return torch.cat(pooled), (torch.cat(patches) if patches else None)

    def budget(self, s: Schedule) -> dict[str, Any]:
        if s.input_keep is not None:
            assert self.wrap is not None, "resized schedules are scored by joint calibration"
            return {"schedule": self.wrap(s)}
        if s.site == "layers":
            return {"r": list(s.r or ())}
        return {"keep": s.keep, "site": f"layer:{s.layer}"}

    def __call__(self, s: Schedule, **budget: Any) -> float:
        key = (s.site, s.r, s.layer, s.keep, s.input_keep) if not budget else tuple(sorted(budget.items()))
        if key in self.cache:
            return self.cache[key]
        torch.manual_seed(self.seed)
        kw = budget or self.budget(s)
        unmerge = self.objective != "cls"
        params = {} if "schedule" in kw else self.params  # a schedule carries its parameters
        with api.applied(self.model, self.method, image_size=self.size, unmerge=unmerge, **kw, **params):
            pooled, patches = self._run()
        self.forwards += 1
        self.bar.update(1)
        cls = F.cosine_similarity(pooled, self.ref[0], dim=-1).mean().item()
        if self.objective == "cls":
            v = cls
        else:
            assert patches is not None and self.ref[1] is not None
            pat = F.cosine_similarity(patches, self.ref[1], dim=-1).mean().item()
            v = pat if self.objective == "patch" else (cls + pat) / 2
        self.cache[key] = v
        return v


def calibrate(
    model: nn.Module,
    method: str,
    *,
    flops: float | Sequence[float],
    images: torch.Tensor | None = None,
    samples: Any = None,
    search: str = "greedy",
    objective: str = "auto",
    steps: int = 16,
    batch_size: int = 16,
    tol: float = 0.02,
    seed: int = 0,
    progress: bool = True,
    **params: Any,
) -> CalibratedSchedule | list[CalibratedSchedule]:
    """Search the per-layer budget of ``method`` on ``model`` that keeps the output closest to the unreduced model's
    on the calibration ``images`` (pixel values, normalised as the model expects) at ``flops`` (a fraction of the
    unreduced encoder's analytic FLOPs at the images' size).

    Merging methods (site ``layers``: ``tome``, ``pitome``): the per-layer ``r``, by ``search="greedy"`` (from no
    reduction, add merging where it costs the least fidelity per FLOP saved, ``steps`` steps) or ``"sigmoid"`` (a
    parametric keep curve, 3 parameters, one solved for the target). ``resize-tome``: the input size and the merge
    schedule jointly (every candidate size with ToMe's ``smooth`` schedule for the target there, and plain
    downsampling; ``search`` / ``steps`` do not apply). Single-site pruning methods: the site ``k`` and its keep,
    every ``k`` tried. The method's default solve of ``flops=`` is evaluated too and returned instead where
    it is more faithful (within ``tol`` of the target). ``objective``: ``"auto"`` (default), ``"cls"``, ``"patch"``
    or ``"cls+patch"`` (see the module docstring). Returns a :class:`CalibratedSchedule` for ``apply(model, method,
    schedule=...)``; a list of them, one per target, where ``flops`` is a list (one greedy pass serves every target;
    the cost each reports is the whole call's).

    Vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; :mod:`tokenthin.calibration.vlm`): give
    ``samples=`` instead of ``images=``, a processor output or a list of them (``processor(images=..., text=...,
    return_tensors="pt")``, each fed as ``model(**sample)``); ``flops`` is a fraction of the language model's prefill
    FLOPs on those prompts; the site and keep (or a two-stage method's in-LLM schedule) are searched; ``objective``
    ``"auto"`` (= ``"logits"``), ``"logits"``, ``"kl"`` or ``"hidden"``; ``search`` / ``steps`` / ``batch_size`` /
    ``tol`` do not apply.
    """
    if api.is_applied(model):
        raise TokenThinError("tokenthin is applied to this model; tokenthin.remove(model) before calibrating")
    if search not in SEARCHES:
        raise TokenThinError(f"search must be one of {', '.join(SEARCHES)}; got {search!r}")
    targets = [flops] if not isinstance(flops, (list, tuple)) else list(flops)
    for f in targets:
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise BudgetError(f"flops={f!r} must be a fraction in (0, 1] (or a list of such fractions)")
    if not targets:
        raise BudgetError("flops=[] gives no target; give a fraction in (0, 1]")
    cls = get(method)
    cls(**params)  # checks the parameters now
    adapter = find_adapter(model)
    if adapter.kind == "vlm":
        from .vlm import calibrate_vlm

        found = calibrate_vlm(
            model,
            adapter,
            cls,
            params,
            targets,
            samples,
            images=images,
            search=search,
            objective=objective,
            seed=seed,
            progress=progress,
        )
        return found if isinstance(flops, (list, tuple)) else found[0]
    if samples is not None:
        raise InputMismatchError(
            "samples= (processor outputs) calibrates vision-language models; this model takes images= (pixel values)"
        )
    if objective not in OBJECTIVES:
        raise TokenThinError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise InputMismatchError("images must be a float (B, C, H, W) batch of calibration pixel values")
    if images.shape[0] < 1:
        raise InputMismatchError("give at least one calibration image (16-64 typical ones are a good choice)")
    if adapter.kind != "encoder":
        raise UnsupportedModelError(
            f"tokenthin.calibrate searches vision-encoder and vision-language schedules; {type(model).__name__} runs "
            f"a {adapter.kind} runtime, which calibration does not support yet"
        )
    if hasattr(cls, "calibrate"):
        raise TokenThinError(
            f"method '{method}' calibrates its own thresholds (apply(..., calibration=images)); its token counts "
            "vary per image, so there is no per-layer schedule to search"
        )
    if cls.resizes_input and "input" not in adapter.sites:
        raise SiteError(
            f"method '{method}' also resizes the input image, which {adapter.family} cannot take (no site 'input'); "
            "calibrate 'tome' there"
        )
    if cls.resizes_input and cls.kind == "merge" and "layers" in adapter.sites:
        site = "resize"  # joint: input size x merge schedule (run_joint)
    elif cls.kind == "merge" and "layers" in cls.sites and "layers" in adapter.sites:
        site = "layers"
    elif cls.kind == "prune" and "layer" in cls.sites and "layer" in adapter.sites:
        site = "layer"
        if search == "sigmoid":
            raise TokenThinError(
                f"search='sigmoid' shapes a per-layer curve; '{method}' prunes once (site layer:k), where every site "
                "is tried: use search='greedy' (the default)"
            )
    else:
        raise SiteError(
            f"tokenthin.calibrate searches merging at every layer (site 'layers') or one pruning site ('layer:k'); "
            f"method '{method}' ({cls.kind}, sites {', '.join(cls.sites)}) has neither on this model"
        )
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    layout = adapter.layout_for(size)
    grid, N, L, dims = layout.grid, layout.content, adapter.dims.num_layers, adapter.dims
    m = cls(**params)

    def input_patches(frac: float) -> int:
        p = adapter.input_patch
        hh, ww = m.input_size(grid[0] * p, grid[1] * p, p, frac)
        return (hh // p) * (ww // p)

    def flops_of(s: Schedule) -> float:
        f = s.input_fraction
        return flops_fraction(s, dims, grid, None if f is None else input_patches(f))

    def make(s: Schedule, target: float, fidelity: float, how: str, **extra: Any) -> CalibratedSchedule:
        keep = None
        if s.site == "layer":
            keep = float(s.keep) if isinstance(s.keep, float) else float(s.keep) / N  # type: ignore[arg-type]
        return CalibratedSchedule(
            method=method,
            site=s.site,
            num_layers=L,
            grid=(int(grid[0]), int(grid[1])),
            protected=adapter.num_protected,
            flops_target=float(target),
            flops=flops_of(s),
            objective=fid.objective,
            fidelity=fidelity,
            search=how,
            r=s.r,
            layer=s.layer,
            keep=keep,
            params=dict(params),
            image_size=size,
            host=adapter.family,
            hidden=dims.hidden,
            input_keep=s.input_keep,
            resized_patches=None if s.input_keep is None else input_patches(s.input_keep),
            **extra,
        )

    t0 = time.perf_counter()
    if site == "resize":
        cands = {float(t): joint_candidates(float(t), N, L, input_patches, flops_of) for t in targets}
        total = sum(len(c) for c in cands.values())
    else:
        per = steps * (L - 1) if search == "greedy" else 33
        total = per if site == "layers" and search == "greedy" else (per if site == "layers" else L) * len(targets)
    what = ", ".join(f"{t:g}" for t in targets)
    bar = tqdm(total=total + 1, desc=f"calibrate {method} @ {what} FLOPs", unit="fwd", disable=not progress)
    try:
        with torch.no_grad():
            fid = _Objective(model, adapter, method, params, images, objective, batch_size, seed, bar)
        fid.wrap = lambda s: make(s, 1.0, 0.0, "candidate")

        def show(s: Schedule, f: float, v: float) -> None:
            bar.set_postfix(flops=f"{f:.3f}", fidelity=f"{v:.4f}")

        if site == "resize":
            found = [best_site(cands[float(t)], fid, show, flops_of) for t in targets]
        elif site == "layers" and search == "greedy":
            found = greedy_layers(N, L, targets, flops_of, fid, steps=steps, on_step=show)
        elif site == "layers":
            found = [sigmoid_layers(N, L, float(t), flops_of, fid, on_step=show) for t in targets]
        else:
            found = [best_site(_sites(cls, dims, grid, float(t), flops_of, tol), fid, show, flops_of) for t in targets]
        out = []
        for t, best in zip(targets, found):
            best_fid = fid(best)
            baseline, base_fid = _baseline(model, method, params, float(t), images, fid, flops_of, tol)
            if base_fid is not None and baseline is not None and base_fid > best_fid:
                best, best_fid = baseline, base_fid
            out.append((t, best, best_fid, baseline, base_fid))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    how = "joint" if site == "resize" else search if site == "layers" else "sites"
    scheds = [
        make(
            best,
            t,
            best_fid,
            how,
            baseline=None if baseline is None else baseline.describe(),
            baseline_fidelity=base_fid,
            seconds=seconds,
            images=int(images.shape[0]),
            forwards=fid.forwards + 1,
        )
        for t, best, best_fid, baseline, base_fid in out
    ]
    return scheds if isinstance(flops, (list, tuple)) else scheds[0]


def _sites(cls: Any, dims: Any, grid: tuple[int, int], target: float, flops_of: Any, tol: float) -> list[Schedule]:
    """One single-site schedule per layer that can meet the target, each with the keep solved for it there."""
    cands = []
    for k in range(dims.num_layers):
        try:
            s = resolve(
                kind=cls.kind,
                sites=cls.sites,
                default_site=cls.default_site,
                name=cls.name,
                site=f"layer:{k}",
                r=None,
                keep=None,
                flops=target,
                dims=dims,
                grid=grid,
            )
        except BudgetError:
            continue
        if flops_of(s) <= target + tol:
            cands.append(s)
    return cands


def _baseline(
    model: nn.Module,
    method: str,
    params: dict,
    flops: float,
    images: torch.Tensor,
    fid: _Objective,
    flops_of: Any,
    tol: float,
) -> tuple[Schedule | None, float | None]:
    """The method's default solve of ``flops=`` (its schedule for the calibration size, and its fidelity)."""
    size = (int(images.shape[-2]), int(images.shape[-1]))
    try:
        with api.applied(model, method, flops=flops, image_size=size, **params):
            s = api.runtime_of(model).schedule
    except BudgetError:
        return None, None
    if flops_of(s) > flops + tol:
        return s, None
    return s, fid(s)
